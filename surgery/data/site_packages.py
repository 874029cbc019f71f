"""``builtin:python-packages``: the ``.py`` files of the third-party packages installed beside surgery.

Third-party library code is what users' code looks like more than the standard library does
(other conventions, typing, docstring styles), and every machine that runs surgery has some:
torch, transformers, numpy, pydantic and their dependencies. The package that
``bench/quality.py`` scores third-party code on (networkx, :data:`HELD_OUT_PACKAGES`) is never
read, nor are test directories, surgery's own code, or files above :data:`MAX_FILE_BYTES`
(generated tables). Document ids are ``<distribution>/<path in site-packages>``; the identity
(cache key and provenance) lists each distribution read with its version and licence, so a
machine with other packages builds, and records, another corpus.
"""

from __future__ import annotations

import importlib.metadata as metadata
import os
import sysconfig
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..recipe import DataSource
from .sources import TextSource, library_files

HELD_OUT_PACKAGES = frozenset({"networkx"})  # bench/quality.py's third-party code set: never trained on
OWN_PACKAGES = frozenset({"surgery", "rewrites", "verify", "bench", "tests"})
MAX_FILE_BYTES = 256 * 1024


def site_roots() -> list[Path]:
    """The directories third-party packages are installed in (purelib and platlib, deduplicated)."""
    paths = sysconfig.get_paths()
    return sorted({Path(paths[k]).resolve() for k in ("purelib", "platlib") if Path(paths[k]).is_dir()})


def _distributions() -> dict[str, tuple[str, str, str]]:
    """Top-level import name -> (distribution, version, licence) for every installed distribution."""
    out: dict[str, tuple[str, str, str]] = {}
    for top, dists in metadata.packages_distributions().items():
        try:
            meta = metadata.metadata(dists[0])
        except metadata.PackageNotFoundError:
            continue
        licence = meta.get("License-Expression") or meta.get("License") or ""
        if not licence or len(licence) > 80:  # some wheels put the whole licence text in the field
            classifiers = [c.rsplit(" :: ", 1)[-1] for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
            licence = ", ".join(classifiers) or "unknown"
        out[top] = (dists[0], meta.get("Version", "?"), licence)
    return out


class PackagesSource(TextSource):
    """``builtin:python-packages``: installed third-party Python source, one document per file."""

    def __init__(self, spec: DataSource) -> None:
        super().__init__(spec)
        self.roots = site_roots()

    @cached_property
    def _dists(self) -> dict[str, tuple[str, str, str]]:
        return _distributions()

    @cached_property
    def _files(self) -> dict[str, Path]:
        """doc id -> file, over every readable package directory of every site root."""
        dists = self._dists
        files: dict[str, Path] = {}
        for root in self.roots:
            for top in sorted(os.listdir(root)):
                pkg = root / top
                if (top in HELD_OUT_PACKAGES or top in OWN_PACKAGES or top not in dists or top.startswith((".", "_"))
                        or not (pkg / "__init__.py").is_file()):
                    continue
                for path in library_files(pkg):
                    if path.stat().st_size <= MAX_FILE_BYTES:
                        files[f"{dists[top][0]}/{path.relative_to(root).as_posix()}"] = path
        if not files:
            raise DataError(f"{self.spec.source}: no third-party package source found under {', '.join(map(str, self.roots))}; "
                            "use builtin:python-stdlib or a glob of local files instead")
        return files

    def identity(self) -> dict[str, Any]:
        read = sorted({doc_id.split("/", 1)[0] for doc_id in self._files})
        by_name = {d: (v, lic) for d, v, lic in self._dists.values()}
        return {"distributions": [{"name": d, "version": by_name[d][0], "licence": by_name[d][1]} for d in read],
                "held_out": sorted(HELD_OUT_PACKAGES)}

    def doc_ids(self) -> list[str]:
        return sorted(self._files)

    def read(self, doc_id: str) -> str:
        return self._files[doc_id].read_text(encoding="utf-8", errors="replace")
