"""fopru_kernels.integrations.settings: the settings dict integrations take from users (vLLM's
hf_overrides["fopru"]), its defaults (the paper's), and one ValueError naming the key for each bad value."""
import pytest

import fopru_kernels as F
from fopru_kernels.integrations.settings import FoPruSettings, parse_settings, settings_from_arguments


def test_defaults_follow_the_paper():
    s = parse_settings({"keep": 144})
    assert s == FoPruSettings(keep=144, ratio=None, strategy="rank", score="focal", kind="logit", layer=None,
                              backend="auto")


def test_every_key_is_taken():
    raw = {"ratio": 0.5, "strategy": "row", "score": "cls", "kind": "prob", "layer": -3, "backend": "reference"}
    assert parse_settings(raw) == FoPruSettings(ratio=0.5, strategy="row", score="cls", kind="prob", layer=-3,
                                                backend="reference")
    assert parse_settings({"ratio": 1}).ratio == 1.0  # an int ratio is a number too


@pytest.mark.parametrize(
    "raw, message",
    [
        ({}, "^fopru: give exactly one of 'keep'"),
        ({"keep": 4, "ratio": 0.5}, "^fopru: give exactly one of 'keep'"),
        ({"keep": 0}, r"fopru.keep must be an int >= 1"),
        ({"keep": -3}, r"fopru.keep must be an int >= 1"),
        ({"keep": 2.0}, r"fopru.keep must be an int >= 1"),
        ({"keep": True}, r"fopru.keep must be an int >= 1"),
        ({"ratio": 0}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"ratio": 1.5}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"ratio": float("nan")}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"ratio": "0.5"}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"keep": 4, "strategy": "top"}, r"fopru.strategy must be one of 'rank', 'row', got 'top'"),
        ({"keep": 4, "score": "mean"}, r"fopru.score must be one of 'focal', 'received', 'cls', got 'mean'"),
        ({"keep": 4, "kind": "softmax"}, r"fopru.kind must be one of 'prob', 'logit', got 'softmax'"),
        ({"keep": 4, "backend": "gpu"}, r"fopru.backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference'"),
        ({"keep": 4, "layer": "-2"}, r"fopru.layer must be an int"),
        ({"keep": 4, "keeep": 3}, r"fopru.keeep is not a setting; allowed keys: 'keep', 'ratio'"),
        ([("keep", 4)], r"fopru must be a dict of settings"),
    ],
)
def test_bad_settings_name_the_key_and_the_allowed_values(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(raw)


@pytest.mark.parametrize(
    "raw, n, grid, kept",
    [
        ({"keep": 144}, 576, None, 144),
        ({"keep": 576}, 576, None, 576),
        ({"ratio": 0.25}, 576, None, 144),
        ({"ratio": 0.25, "strategy": "row"}, 576, None, 144),
        ({"ratio": 0.3, "strategy": "row"}, 576, None, 7 * 24),
        ({"keep": 12, "strategy": "row"}, 24, (2, 12), 12),
        ({"ratio": 0.5}, 7, None, 3),  # rank ignores the grid: any N
    ],
)
def test_kept_count_is_retained_count(raw, n, grid, kept):
    s = parse_settings(raw)
    assert s.kept_count(n, grid) == kept
    if s.ratio is not None:
        assert kept == F.retained_count(n, s.ratio, strategy=s.strategy, grid=grid)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"keep": 577}, r"fopru.keep must be in \[1, 576\]"),
        ({"keep": 100, "strategy": "row"}, r"multiple of the grid's 24 columns.*nearest allowed: 96, 120"),
        ({"keep": 10, "strategy": "row"}, r"multiple of the grid's 24 columns.*nearest allowed: 24$"),
        ({"ratio": 0.001}, r"fopru.ratio=0.001 keeps no token of an image's 576 patches"),
        ({"ratio": 0.04, "strategy": "row"}, r"fopru.ratio=0.04 keeps no token.*allowed: a ratio in \[0.0416667, 1\]"),
    ],
)
def test_kept_count_refuses_what_the_image_cannot_give(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_settings(raw).kept_count(576)


@pytest.mark.parametrize("raw, n, kept", [({"keep": 144}, 2000, 144), ({"keep": 144}, 100, 100),
                                         ({"ratio": 0.25}, 2001, 500)])
def test_budget_never_exceeds_the_sequence(raw, n, kept):
    assert parse_settings(raw).budget(n) == kept


def test_arguments_are_checked_by_the_same_rules_and_named_as_arguments():
    """The transformers adapters' keyword arguments go through parse_settings too; None means left out."""
    s = settings_from_arguments(keep=4, ratio=None, strategy="row", score=None, kind=None, layer=None, backend=None)
    assert s == FoPruSettings(keep=4, strategy="row")
    for kwargs, message in [
        (dict(keep=0), r"^keep must be an int >= 1"),
        (dict(keep=4, ratio=0.5), r"^give exactly one of 'keep'"),
        (dict(keep=4, kind="softmax"), r"^kind must be one of 'prob', 'logit', got 'softmax'"),
        (dict(keep=4, backend="gpu"), r"^backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got 'gpu'"),
    ]:
        with pytest.raises(ValueError, match=message):
            settings_from_arguments(**kwargs)
    with pytest.raises(ValueError, match=r"^keep must be in \[1, 16\]"):
        settings_from_arguments(keep=17).kept_count(16, (4, 4))  # model-specific checks name the argument too


def test_require_names_the_key_the_value_and_why():
    s = parse_settings({"keep": 4, "score": "cls"})
    s.require("strategy", ("rank",), "no grid")
    with pytest.raises(ValueError, match=r"^fopru.score must be one of 'focal', 'received' \(no CLS token\), got 'cls'$"):
        s.require("score", ("focal", "received"), "no CLS token")
