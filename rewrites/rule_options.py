"""The built-in rules' option models, declared without torch so that a recipe validates without it.

The same classes are the rules' ``params``/``init`` models once :mod:`rewrites.rules` registers
them (``tests/test_hostile_recipes.py`` checks that the two agree).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from surgery.mixer_options.discrete_mamba2 import DiscreteMamba2Init, DiscreteMamba2Params
from surgery.mixer_options.mamba2 import Mamba2Init, Mamba2Params

from .registry import declare_rule_options


class KeepParams(BaseModel):
    """``keep`` takes no parameters."""

    model_config = ConfigDict(extra="forbid")


class KeepInit(BaseModel):
    """``keep`` takes no init options."""

    model_config = ConfigDict(extra="forbid")


declare_rule_options("discrete_mamba2", params=DiscreteMamba2Params, init=DiscreteMamba2Init)
declare_rule_options("mamba2", params=Mamba2Params, init=Mamba2Init)
declare_rule_options("keep", params=KeepParams, init=KeepInit, replaces=False)
