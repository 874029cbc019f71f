"""How far apart two student directories are: weights tensor by tensor, and their reports.

    python bench/compare_students.py runs/plain runs/torchrun-1     # e.g. a plain run vs torchrun --nproc-per-node 1

Prints the largest absolute difference over all weights, the largest norm-relative difference of
one tensor (``||a - b|| / ||b||``) and which tensor has it, and each report's stage metrics and
held-out perplexity side by side. Exits 1, naming them, when the two hold different tensors (names or shapes).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def weight_differences(a_dir: Path, b_dir: Path) -> dict[str, Any]:
    """Largest absolute and norm-relative difference between the two students' tensors."""
    from safetensors.torch import load_file

    a, b = load_file(str(a_dir / "model.safetensors")), load_file(str(b_dir / "model.safetensors"))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise SystemExit(f"different tensors: only in {a_dir}: {sorted(a.keys() - b.keys())[:5]}, "
                         f"only in {b_dir}: {sorted(b.keys() - a.keys())[:5]}")
    worst_abs, worst_rel, where = 0.0, 0.0, ""
    for k in a:
        d = a[k].double() - b[k].double()
        worst_abs = max(worst_abs, d.abs().max().item())
        r = (d.norm() / b[k].double().norm().clamp_min(1e-30)).item()
        if r > worst_rel:
            worst_rel, where = r, k
    identical = all(a[k].dtype == b[k].dtype and bool((a[k] == b[k]).all()) for k in a)
    return {"tensors": len(a), "identical": identical, "max_abs": worst_abs, "max_rel": worst_rel, "max_rel_tensor": where}


def report_summary(directory: Path) -> dict[str, Any]:
    report = json.loads((directory / "report.json").read_text())
    return {"stage1": report["stage1"]["mean"]["after"], "stage2": report["stage2"]["mean"]["after"],
            "stage3_kl": report["stage3"]["kl"]["after"], "perplexity": report["perplexity"]["student_final"],
            "teacher_perplexity": report["perplexity"]["teacher"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args(argv)
    result = {"weights": weight_differences(args.a, args.b),
              "reports": {str(args.a): report_summary(args.a), str(args.b): report_summary(args.b)}}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
