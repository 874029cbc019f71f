"""Hostile command lines (issue #19): exit 2 with one ``error:`` line, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery.cli import build_parser, main
from surgery.random_models import random_model
from surgery.tokenizers import byte_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny.yaml"


def run_cli(*args: str, code: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "surgery", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def one_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("content", [b"name: caf\xe9\n", b"a: " + b"[" * 3000 + b"]" * 3000 + b"\n", b"seed: 1\nseed: 2\n"],
                         ids=["latin-1", "deep", "duplicate"])
def test_bad_yaml_files_exit_2_in_a_fresh_process(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {path}") and "Traceback" not in proc.stderr


def test_quiet_and_verbose_go_after_the_command_too(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    for argv in (["apply", "r.yaml", "-q"], ["-q", "apply", "r.yaml"], ["plan", "r.yaml", "seed=1", "--quiet"]):
        assert parser.parse_args(argv).quiet is True, argv
    assert parser.parse_args(["eval", "random:llama", "-v"]).verbose == 1
    assert parser.parse_args(["apply", "r.yaml"]).quiet is False
    assert main(["validate", str(TINY), "-q"]) == 0 and "ok  " in capsys.readouterr().out


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_override_without_equals_is_named_as_such(capsys: pytest.CaptureFixture[str], command: str) -> None:
    err = one_error(capsys, [command, str(TINY), "stages.stage1.lr"])
    assert "'stages.stage1.lr' is neither a recipe file nor an override: an override needs '='" in err


@pytest.mark.parametrize(
    "out,expected",
    [
        ("/", "'/' names no new directory"),
        ("", "the output directory is empty"),
        ("afile/sub/out", "is a file, so the output directory afile/sub/out cannot be created under it"),
        ("afile", "output afile exists and is not a directory"),
    ],
)
def test_bad_out_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                            out: str, expected: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("x")
    err = one_error(capsys, ["-q", "apply", str(TINY), "--out", out])
    assert expected in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs Linux /proc")
def test_unwritable_out_is_refused_before_torch_is_imported(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from surgery.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "print('TORCH', 'torch' in sys.modules)\n"
        "sys.exit(rc)\n"
    )
    proc = run_cli("apply", str(TINY), "--out", "/proc/no-such-dir/out", code=code)
    assert proc.returncode == 2, proc.stderr
    assert "cannot create the output directory /proc/no-such-dir/out: /proc is not writable here" in proc.stderr
    assert "TORCH False" in proc.stdout  # refused before the teacher, the data or even torch was loaded


@pytest.fixture
def pickle_only_dir(tmp_path: Path) -> Path:
    """A plain Hugging Face directory whose only weights are a pickle ``pytorch_model.bin``."""
    d = tmp_path / "hf"
    model = random_model("llama")
    model.config.save_pretrained(d)
    byte_tokenizer().save_pretrained(d)
    torch.save(model.state_dict(), d / "pytorch_model.bin")
    return d


@pytest.mark.parametrize("command", [["generate", "{d}", "hello", "--max-new-tokens", "2"], ["eval", "{d}"]],
                         ids=["generate", "eval"])
def test_pickle_only_model_directory_is_refused(pickle_only_dir: Path, capsys: pytest.CaptureFixture[str],
                                               command: list[str]) -> None:
    err = one_error(capsys, [w.format(d=pickle_only_dir) for w in command] + ["--device", "cpu"])
    assert "holds only pickle weights (pytorch_model.bin), which surgery never loads" in err
    assert "weights_only" not in err


def test_eval_on_a_small_heldout_split_names_seq_len(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(30):
        (tmp_path / f"doc{i}.txt").write_text(f"document {i} " + "the quick brown fox jumps over the lazy dog " * 2)
    err = one_error(capsys, ["eval", "random:llama", "--data", str(tmp_path / "*.txt"), "--device", "cpu"])
    assert "fewer than one sequence of --seq-len 512: pass --seq-len" in err and "heldout_fraction" not in err
    held = int(err.split("only ")[1].split(" held-out")[0])
    assert main(["eval", "random:llama", "--data", str(tmp_path / "*.txt"), "--device", "cpu",
                 "--seq-len", str(held), "--tokens", str(held)]) == 0  # the advice works


@pytest.mark.parametrize("flag,value", [("--seed", "99999999999999999999"), ("--temperature", "nan")])
def test_out_of_range_flags_name_the_flag(capsys: pytest.CaptureFixture[str], flag: str, value: str) -> None:
    err = one_error(capsys, ["generate", "random:llama", "hi", flag, value, "--device", "cpu"])
    assert err.startswith(f"error: {flag}: ")


@pytest.mark.parametrize("checkpointed", [False, True])
def test_interrupted_apply_says_whether_resume_can_continue(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch, checkpointed: bool) -> None:
    import surgery.pipeline as pipeline

    def interrupted(*args: object, **kwargs: object) -> None:
        if checkpointed:
            (tmp_path / "out.partial" / "checkpoint").mkdir(parents=True)
            (tmp_path / "out.partial" / "checkpoint" / "state.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "apply", interrupted)
    assert main(["-q", "apply", str(TINY), "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    if checkpointed:
        assert "the same command with --resume continues from the last checkpoint" in err
    else:
        assert "nothing was checkpointed yet: run the same command again" in err and "--resume" not in err
