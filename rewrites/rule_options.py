"""The built-in rules' option models, declared without torch so that a recipe validates without it.

The same classes are the rules' ``params``/``init`` models once :mod:`rewrites.rules` registers
them (``tests/test_hostile_recipes.py`` checks that the two agree).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from surgery.mixer_options.discrete_mamba2 import DiscreteMamba2Init, DiscreteMamba2Params
from surgery.mixer_options.low_rank import LowRankInit, LowRankParams
from surgery.mixer_options.mamba2 import Mamba2Init, Mamba2Params
from surgery.mixer_options.semiseparable import SemiseparableInit, SemiseparableParams
from surgery.mixer_options.toeplitz import ToeplitzInit, ToeplitzParams

from .registry import declare_rule_options


class KeepParams(BaseModel):
    """``keep`` takes no parameters."""

    model_config = ConfigDict(extra="forbid")


class KeepInit(BaseModel):
    """``keep`` takes no init options."""

    model_config = ConfigDict(extra="forbid")


declare_rule_options("discrete_mamba2", params=DiscreteMamba2Params, init=DiscreteMamba2Init)
declare_rule_options("mamba2", params=Mamba2Params, init=Mamba2Init)
declare_rule_options("toeplitz", params=ToeplitzParams, init=ToeplitzInit)
declare_rule_options("low_rank", params=LowRankParams, init=LowRankInit)
declare_rule_options("semiseparable", params=SemiseparableParams, init=SemiseparableInit)
declare_rule_options("keep", params=KeepParams, init=KeepInit, replaces=False)
