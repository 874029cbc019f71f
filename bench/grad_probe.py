"""Per-parameter gradient norms at the first optimizer step of every stage: plain run vs ``torchrun``.

    python bench/grad_probe.py record runs/probe-plain.json recipes/tiny.yaml device=cuda precision=auto
    torchrun --standalone --nproc-per-node 1 bench/grad_probe.py record runs/probe-tr1.json recipes/tiny.yaml device=cuda precision=auto
    python bench/grad_probe.py compare runs/probe-plain.json runs/probe-tr1.json

``record`` runs ``surgery apply RECIPE [KEY=VALUE...]`` (into a temporary directory unless ``--out``
is among the arguments) and, at each stage's first step, just before clipping, writes every
trainable parameter's gradient norm twice: as the stage runner would read it, and again after
``torch.cuda.synchronize()``. ``compare`` lists the parameters whose norms differ between two
records, and whether a record changed across the synchronisation (a gradient still being written
by another CUDA stream when the step reads it). This is the check that localises a difference
between a single-process run and ``torchrun --nproc-per-node 1`` (docs/benchmarks.md, the
torchrun section): the same stage, same data and same weights must give the same gradients.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def gradient_norms(names: list[str], params: list[Any]) -> dict[str, float | None]:
    """``{name: ||grad||}`` in float64 (a sharded gradient gathered in full); None where there is none."""
    from verify.parallel import is_sharded

    out: dict[str, float | None] = {}
    for name, p in zip(names, params, strict=True):
        g = p.grad
        if g is not None and is_sharded(g):
            g = g.full_tensor()
        out[name] = None if g is None else float(g.double().norm())
    return out


@contextmanager
def probing(record: dict[str, Any]) -> Iterator[None]:
    """While active, the first clip of each stage runner's step fills ``record[stage]``."""
    import torch

    import verify.runner as runner

    init = runner.StageRunner.__init__

    def probed_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        names = [n for n, _ in self.objective.trainable()]
        stage, strategy, clip = self.stage, self.parallel, self.parallel.clip

        def probed_clip(params: list[Any], max_norm: float) -> Any:
            if str(stage) not in record:
                before = gradient_norms(names, params)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                record[str(stage)] = {"before_sync": before, "after_sync": gradient_norms(names, params),
                                      "world_size": strategy.world_size, "accumulation": self.plan.accumulation}
            return clip(params, max_norm)

        strategy.clip = probed_clip  # this runner's strategy object only

    runner.StageRunner.__init__ = probed_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        runner.StageRunner.__init__ = init  # type: ignore[method-assign]


def cmd_record(path: Path, apply_args: list[str]) -> int:
    from surgery.cli import main as surgery_main

    record: dict[str, Any] = {}
    with probing(record), tempfile.TemporaryDirectory() as tmp:
        args = apply_args if "--out" in apply_args else [*apply_args, "--out", str(Path(tmp) / "student")]
        rc = surgery_main(["-q", "apply", *args])
    if os.environ.get("RANK", "0") == "0":  # torchrun: rank 0 writes
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1))
        print(f"{path}: stages {', '.join(record) or 'none'} recorded")
    return rc


def differences(a: dict[str, Any], b: dict[str, Any], rel: float = 0.0) -> list[str]:
    """Lines naming each stage's parameters whose recorded norms differ by more than ``rel`` (relative)."""
    lines = []
    for stage in sorted(set(a) | set(b)):
        if stage not in a or stage not in b:
            lines.append(f"stage {stage}: recorded in only one file")
            continue
        for label, rec in (("a", a[stage]), ("b", b[stage])):
            moved = [n for n in rec["before_sync"] if rec["before_sync"][n] != rec["after_sync"][n]]
            if moved:
                lines.append(f"stage {stage} {label}: {len(moved)} gradients changed across a device sync, e.g. {moved[:3]}")
        na, nb = a[stage]["after_sync"], b[stage]["after_sync"]
        for name in na:
            x, y = na[name], nb.get(name)
            if (x is None) != (y is None) or (x is not None and abs(x - y) > rel * max(abs(x), abs(y), 1e-30)):
                lines.append(f"stage {stage}: {name}: {x!r} vs {y!r}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="run surgery apply and record the first step's gradient norms")
    r.add_argument("json", type=Path)
    r.add_argument("apply_args", nargs=argparse.REMAINDER, help="RECIPE [KEY=VALUE...] [--out DIR], as for surgery apply")
    c = sub.add_parser("compare", help="list the parameters whose first-step gradients differ")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    c.add_argument("--rel", type=float, default=0.0, help="relative tolerance (default 0: bitwise)")
    args = p.parse_args(argv)
    if args.cmd == "record":
        return cmd_record(args.json, args.apply_args)
    lines = differences(json.loads(args.a.read_text()), json.loads(args.b.read_text()), args.rel)
    print("\n".join(lines) if lines else "identical first-step gradients in every stage")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
