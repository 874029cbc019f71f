"""The selector language: globs, regexes, layers, types, exclude, first-match-wins, errors."""

from __future__ import annotations

from collections.abc import Iterator

import re

import pytest

import placeholder_mixer
from surgery.errors import RecipeError, SelectionError
from surgery.random_models import random_model
from surgery.recipe import ReplaceRule
from surgery.selector import glob_to_regex, parse_layers, preview, select



@pytest.fixture(autouse=True)
def _placeholder() -> Iterator[None]:
    """The test mixer is registered for each test only (other modules parametrise over MIXERS)."""
    with placeholder_mixer.registered():
        yield

MIX = placeholder_mixer.NAME


@pytest.fixture(scope="module")
def llama8():  # noqa: ANN201
    return random_model("llama", num_hidden_layers=8)


def _layers(matches) -> list[int]:  # noqa: ANN001
    return [m.layer for m in matches]


@pytest.mark.parametrize(
    ("glob", "path", "hit"),
    [
        ("model.layers.*.self_attn", "model.layers.3.self_attn", True),
        ("model.*.self_attn", "model.layers.3.self_attn", False),  # '*' is one segment
        ("model.**.self_attn", "model.layers.3.self_attn", True),
        ("**.self_attn", "model.layers.3.self_attn", True),
        ("self_attn", "model.layers.3.self_attn", True),  # dotted suffix, like peft
        ("layers.3.self_attn", "model.layers.3.self_attn", True),
        ("attn", "model.layers.3.self_attn", False),  # suffixes stop at dots
        ("layers.1?.self_attn", "model.layers.12.self_attn", True),
        ("layers.1?.self_attn", "model.layers.1.self_attn", False),
    ],
)
def test_glob(glob: str, path: str, hit: bool) -> None:
    assert bool(re.fullmatch(glob_to_regex(glob), path)) is hit


@pytest.mark.parametrize(
    ("spec", "want"),
    [(None, None), (3, {3}), (-1, {7}), ([0, -1], {0, 7}), ("2", {2}), ("0:8:2", {0, 2, 4, 6}), ("-4:", {4, 5, 6, 7}), ("::4", {0, 4}), ("1::3", {1, 4, 7})],
)
def test_parse_layers(spec, want) -> None:  # noqa: ANN001
    assert parse_layers(spec, 8, "x") == want


def test_compose_and_first_match_wins(llama8) -> None:  # noqa: ANN001
    rules = [
        ReplaceRule(layers="::4", mixer="keep"),
        ReplaceRule(modules="model.layers.*.self_attn", layers="0:6", exclude="re:.*\\.5\\..*", mixer=MIX),
        ReplaceRule(type="LlamaAttention", mixer=MIX),
    ]
    got = {m.layer: m.rule_index for m in select(llama8, rules)}
    assert got == {0: 0, 4: 0, 1: 1, 2: 1, 3: 1, 5: 2, 6: 2, 7: 2}


def test_regex_and_dicts(llama8) -> None:  # noqa: ANN001
    got = select(llama8, [{"modules": r"re:model\.layers\.[13]\.self_attn", "mixer": MIX}])
    assert _layers(got) == [1, 3]


def test_preview_like_peft(llama8) -> None:  # noqa: ANN001
    sel = preview(llama8, [{"layers": [0, 1], "mixer": MIX}])
    d = sel.to_dict()
    assert set(d["matched"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert len(d["unmatched"]) == 6
    assert "(unchanged)" in sel.to_text() and "2 of 8" in sel.to_text()


def _err(model, *rules) -> str:  # noqa: ANN001, ANN002
    with pytest.raises(SelectionError) as info:
        select(model, list(rules))
    return str(info.value)


def test_matches_nothing_lists_nearest(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"modules": "model.layer.*.self_attention", "mixer": MIX})
    assert "replace[0]" in msg and "matches no attention module" in msg
    assert "model.layers.0.self_attn" in msg


def test_claimed_by_earlier_rule(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"mixer": "keep"}, {"layers": "0:2", "mixer": MIX})
    assert "replace[1]" in msg and "already taken by replace[0]" in msg


def test_out_of_range_layer(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"layers": 12, "mixer": MIX})
    assert "layer 12 is out of range" in msg and "8 decoder layers" in msg
    assert "out of range" in _err(llama8, {"layers": "0:48", "mixer": MIX})


def test_bad_slice(llama8) -> None:  # noqa: ANN001
    # the recipe schema rejects malformed slices ...
    with pytest.raises(RecipeError, match="layer slice"):
        select(llama8, [{"layers": "0:2:3:4", "mixer": MIX}])
    # ... and the selector rejects what slips past it (objects built without validation)
    rule = ReplaceRule.model_construct(layers="a:b", mixer=MIX, params={}, init={})
    with pytest.raises(SelectionError, match="not a slice"):
        select(llama8, [rule])
    with pytest.raises(SelectionError, match="selects no layer"):
        select(llama8, [{"layers": "5:2", "mixer": MIX}])


def test_unknown_type_lists_known(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"type": "LlamaAtention", "mixer": MIX})
    assert "unknown type 'LlamaAtention'" in msg and "LlamaAttention" in msg and "attention" in msg


def test_bad_regex(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"modules": "re:model.layers.(", "mixer": MIX})
    assert "not a valid regular expression" in msg


def test_exclude_everything(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"layers": [1, 2], "exclude": ["**.1.*", "**.2.*"], "mixer": MIX})
    assert "exclude" in msg and "removes every node" in msg


def test_layers_select_none_of_modules(llama8) -> None:  # noqa: ANN001
    msg = _err(llama8, {"modules": "layers.3.self_attn", "layers": [4], "mixer": MIX})
    assert "selects none of the layers" in msg and "(3)" in msg


def test_non_strict_allows_empty(llama8) -> None:  # noqa: ANN001
    got = select(llama8, [{"mixer": "keep"}, {"layers": 0, "mixer": MIX}], strict=False)
    assert len(got) == 8 and {m.rule_index for m in got} == {0}
