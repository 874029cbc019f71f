"""CPU code paths never import triton or mamba_ssm, even where they are installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, os, sys

    # Record every attempt to locate triton / mamba_ssm made from surgery's own code (the libraries
    # may probe for them; we must not), then answer "not installed".
    ROOT = os.path.join(os.getcwd(), "surgery")
    attempts = []

    class Spy(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("triton", "mamba_ssm"):
                frame = sys._getframe(1)  # the code that asked: first frame outside importlib
                while frame is not None and ("importlib" in frame.f_code.co_filename):
                    frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(ROOT):
                    attempts.append((name, frame.f_code.co_filename, frame.f_lineno))
            return None

    sys.meta_path.insert(0, Spy())

    import torch
    import surgery, surgery.mixers, surgery.ops, surgery.cache
    from surgery.mixers.testing import naive_student
    from surgery.random_models import random_model

    for mixer in ("discrete_mamba2", "mamba2"):
        student = naive_student(random_model("llama"), mixer=mixer, layers=[0, 2])
        ids = torch.randint(3, 300, (2, 6))
        student(ids).logits.sum().backward()
        student.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0)
        student.model.layers[0].self_attn.materialize(torch.randn(1, 5, 64))
    bad = sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "mamba_ssm"))
    print("IMPORTED", bad, "ATTEMPTS", attempts)
    """
)


def test_cpu_paths_never_import_triton_or_mamba_ssm() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run, also on the GPU machine
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "IMPORTED [] ATTEMPTS []" in out.stdout, out.stdout
