"""builtin:python-packages: installed third-party source, never the package quality is scored on."""

from __future__ import annotations

from pathlib import Path

import pytest

from surgery.data import site_packages
from surgery.data.sources import open_source
from surgery.errors import DataError
from surgery.recipe import DataSource


def write(path: Path, text: str = "def f():\n    return 1\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site-packages"
    write(root / "alpha" / "__init__.py")
    write(root / "alpha" / "core.py", "class Graph:\n    pass\n")
    write(root / "alpha" / "tests" / "test_core.py")          # a test directory: skipped
    write(root / "alpha" / "big.py", "x = 1\n" * 60_000)       # above MAX_FILE_BYTES: skipped
    write(root / "networkx" / "__init__.py")                   # the held-out package: skipped
    write(root / "networkx" / "algorithms.py")
    write(root / "surgery" / "__init__.py")                    # our own code: skipped
    write(root / "loose_module.py")                            # not a package directory: skipped
    write(root / "undeclared" / "__init__.py")                 # no installed distribution owns it: skipped
    monkeypatch.setattr(site_packages, "site_roots", lambda: [root])
    monkeypatch.setattr(site_packages, "_distributions", lambda: {
        "alpha": ("alpha-dist", "1.2", "MIT"), "networkx": ("networkx", "3.4", "BSD-3-Clause"),
        "surgery": ("surgery", "0.1", "Apache-2.0")})
    return root


def test_reads_third_party_code_but_not_the_held_out_package(fake_site: Path) -> None:
    source = open_source(DataSource(source="builtin:python-packages"))
    assert source.doc_ids() == ["alpha-dist/alpha/__init__.py", "alpha-dist/alpha/core.py"]
    assert source.read("alpha-dist/alpha/core.py") == "class Graph:\n    pass\n"
    identity = source.identity()
    assert identity["distributions"] == [{"name": "alpha-dist", "version": "1.2", "licence": "MIT"}]
    assert identity["held_out"] == ["networkx"]
    assert [d for d, _ in source.documents(seed=0)]  # walks in a seeded order


def test_no_packages_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(site_packages, "site_roots", lambda: [tmp_path])
    monkeypatch.setattr(site_packages, "_distributions", lambda: {})
    with pytest.raises(DataError, match="no third-party package source found"):
        open_source(DataSource(source="builtin:python-packages")).doc_ids()


def test_this_environment_has_package_code_and_licences() -> None:
    source = open_source(DataSource(source="builtin:python-packages"))
    ids = source.doc_ids()
    assert ids and not any(i.split("/", 1)[1].startswith("networkx/") for i in ids)
    assert all(d["licence"] for d in source.identity()["distributions"])
