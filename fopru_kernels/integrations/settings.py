"""FoPru settings as integrations take them from users: one dict, checked once, before any work.

A serving engine gets its settings as a plain mapping (vLLM: `hf_overrides={"fopru": {...}}`, so
`hf_config.fopru`); `parse_settings` turns it into a frozen `FoPruSettings` or raises one ValueError
that names the key (`fopru.<key>`) and its allowed values. The model-specific checks (patch count,
grid, layer range, CLS token) need the model's config and live in `FoPruSettings.kept_count` and
in the integration that knows the model.

Defaults follow the paper (arXiv 2411.14164): FoPru's own significance (`score="focal"`) on the
scaled logits (`kind="logit"`) of the layer the model feeds to its projector (`layer=None`), and the
global `rank` strategy.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .._checks import SCORES, STRATEGIES, resolve_grid
from ..ops import BACKENDS
from ..reference import retained_count

KINDS = ("logit", "prob")
KEYS = ("keep", "ratio", "strategy", "score", "kind", "layer", "backend")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FoPruSettings:
    """What to prune and how. Exactly one of `keep` (tokens per image) or `ratio` (share of each
    image's patches, via `retained_count`) is set. `layer` counts like `hidden_states` /
    `vision_feature_layer` (None: the layer the model feeds to its projector)."""

    keep: int | None = None
    ratio: float | None = None
    strategy: str = "rank"
    score: str = "focal"
    kind: str = "logit"
    layer: int | None = None
    backend: str = "auto"

    def kept_count(self, n_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens kept of an image with `n_tokens` patches on `grid` (rows, cols; None: square).

        Raises ValueError naming `fopru.keep` / `fopru.ratio` when the setting keeps no token, more
        than the image has, or (strategy 'row') no whole number of grid rows.
        """
        rows, cols = resolve_grid(n_tokens, grid, required=self.strategy == "row")
        if self.ratio is not None:
            kept = retained_count(n_tokens, self.ratio, strategy=self.strategy, grid=(rows, cols))
            if kept < 1:
                unit = cols if self.strategy == "row" else 1
                smallest = unit / n_tokens
                raise ValueError(
                    f"fopru.ratio={self.ratio} keeps no token of an image's {n_tokens} patches "
                    f"(strategy {self.strategy!r}); allowed: a ratio in [{smallest:.6g}, 1]"
                )
            return kept
        if not 1 <= self.keep <= n_tokens:
            raise ValueError(f"fopru.keep must be in [1, {n_tokens}] (the image's patches), got {self.keep}")
        if self.strategy == "row" and self.keep % cols:
            low = self.keep // cols * cols
            valid = [v for v in (low, low + cols) if 1 <= v <= n_tokens]
            raise ValueError(
                f"fopru.keep={self.keep} with strategy 'row' must be a multiple of the grid's {cols} columns "
                f"(whole rows); nearest allowed: {', '.join(map(str, valid))}"
            )
        return self.keep

    def budget(self, n_tokens: int) -> int:
        """Tokens kept of a sequence of n_tokens that may be shorter than `keep` (LLaVA-NeXT's
        images vary in size): min(keep, n_tokens), or retained_count(n_tokens, ratio) (strategy 'rank')."""
        return min(self.keep, n_tokens) if self.ratio is None else retained_count(n_tokens, self.ratio)


def parse_settings(raw: Mapping) -> FoPruSettings:
    """The user's FoPru dict -> FoPruSettings. Raises ValueError naming the key and its allowed values.

    raw: {"keep": int >= 1 | "ratio": float in (0, 1], "strategy": "rank" | "row",
          "score": "focal" | "received" | "cls", "kind": "logit" | "prob", "layer": int,
          "backend": "auto" | "cpu" | "cuda" | "triton" | "reference"}; every key but one of
          keep / ratio may be left out.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"fopru must be a dict of settings with keys {_choices(KEYS)}, got {type(raw).__name__}: {raw!r}"
        )
    unknown = [key for key in raw if key not in KEYS]
    if unknown:
        raise ValueError(f"fopru.{unknown[0]} is not a setting; allowed keys: {_choices(KEYS)}")
    keep, ratio = raw.get("keep"), raw.get("ratio")
    if (keep is None) == (ratio is None):
        raise ValueError(
            f"fopru needs exactly one of 'keep' (an int >= 1: tokens per image) or 'ratio' (a number in "
            f"(0, 1]), got keep={keep!r}, ratio={ratio!r}"
        )
    if keep is not None and (not _is_int(keep) or keep < 1):
        raise ValueError(f"fopru.keep must be an int >= 1 (tokens kept per image), got {keep!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or math.isnan(ratio):
            raise ValueError(f"fopru.ratio must be a number in (0, 1] (share of patches kept), got {ratio!r}")
        ratio = float(ratio)
    for key, allowed in (("strategy", STRATEGIES), ("score", SCORES), ("kind", KINDS), ("backend", BACKENDS)):
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"fopru.{key} must be one of {_choices(allowed)}, got {raw[key]!r}")
    layer = raw.get("layer")
    if layer is not None and not _is_int(layer):
        raise ValueError(
            f"fopru.layer must be an int counting like hidden_states (e.g. -2), or left out for the layer "
            f"the model feeds to its projector; got {layer!r}"
        )
    return FoPruSettings(
        keep=keep,
        ratio=ratio,
        strategy=raw.get("strategy", "rank"),
        score=raw.get("score", "focal"),
        kind=raw.get("kind", "logit"),
        layer=layer,
        backend=raw.get("backend", "auto"),
    )
