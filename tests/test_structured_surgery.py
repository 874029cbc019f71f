"""The structured mixers end to end: ``surgery apply recipes/tiny.yaml`` with each, load, cached generate.

The recipe's mixer is overridden on the command line as a user would (``replace.0.mixer=...``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from surgery.cache import SurgeryCache
from surgery.hf_conventions import output_cache
from surgery.pipeline import apply
from surgery.recipe import Recipe
from surgery.student import load

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {  # case -> (mixer, params); low_rank_plain has SSD factors: stage 1 takes the factored distance
    "toeplitz": ("toeplitz", "{kernel_size: 48}"),
    "low_rank": ("low_rank", "{rank: 8, chunk_size: 16}"),
    "low_rank_plain": ("low_rank", "{rank: 8, chunk_size: 16, feature_map: identity, normalize: false}"),
    "semiseparable": ("semiseparable", "{d_state: 8, chunk_size: 16}"),
}


@pytest.mark.parametrize("case", sorted(PARAMS))
def test_apply_load_and_cached_generation(tmp_path: Path, case: str) -> None:
    mixer, params = PARAMS[case]
    overrides = [
        f"output.dir={tmp_path / 'out'}", f"replace.0.mixer={mixer}", f"replace.0.params={params}",
        "stages.stage1.tokens=1024", "stages.stage2.tokens=256", "stages.stage3.tokens=256", "verify.tokens=128",
    ]
    out = apply(Recipe.load(ROOT / "recipes" / "tiny.yaml", overrides))
    report = json.loads((out / "report.json").read_text())
    stage1 = report["stage1"]["mean"]
    assert math.isfinite(stage1["before"]) and stage1["after"] < stage1["before"]  # stage 1 moved the matrices
    model = load(out)
    mixers = [m for m in model.modules() if type(m).__name__.lower().replace("_", "") == mixer.replace("_", "")]
    assert len(mixers) == 4
    ids = torch.randint(4, 260, (2, 9), generator=torch.Generator().manual_seed(0))
    gen = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True)
    assert isinstance(output_cache(gen), SurgeryCache)
    full = model(gen.sequences, use_cache=False).logits  # (b, L + 6, V): no cache at all
    step = torch.stack(gen.logits, 1)  # (b, 6, V)
    ref = full[:, ids.shape[1] - 1 : -1]
    assert ((step - ref).norm() / ref.norm()).item() < 1e-5
    fresh = model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, use_cache=False)
    assert torch.equal(fresh, gen.sequences)
