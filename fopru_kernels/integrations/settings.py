"""FoPru settings, checked once, before any work: the one validator of the keys every integration takes.

Two spellings, one check:
- a serving engine gets a plain mapping (vLLM: `hf_overrides={"fopru": {...}}`, so `hf_config.fopru`);
  `parse_settings(raw)` turns it into a frozen `FoPruSettings` or raises one ValueError naming the key
  as `fopru.<key>` and its allowed values;
- the transformers adapters take keyword arguments; `settings_from_arguments(keep=..., ...)` runs the
  same checks and names the argument (`keep`, `ratio`, ...).
The model-specific checks (patch count, grid, layer range, CLS token) need the model's config: they
live in `FoPruSettings.kept_count` / `require` and in the integration that knows the model, and name
the key the same way (`FoPruSettings.key`).

Defaults follow the paper (arXiv 2411.14164): FoPru's own significance (`score="focal"`) on the
scaled logits (`kind="logit"`) of the layer the model feeds to its projector (`layer=None`), and the
global `rank` strategy.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .._checks import KINDS, SCORES, STRATEGIES, resolve_grid
from ..backends import check_backend
from ..reference import retained_count

KEYS = ("keep", "ratio", "strategy", "score", "kind", "layer", "backend")
ENGINE_PREFIX = "fopru."  # how an engine's errors name a key: fopru.keep


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class FoPruSettings:
    """What to prune and how. Exactly one of `keep` (tokens per image) or `ratio` (share of each
    image's patches, via `retained_count`) is set. `layer` counts like `hidden_states` /
    `vision_feature_layer` (None: the layer the model feeds to its projector). `prefix` is how errors
    name a key (`key("keep")`): 'fopru.' for an engine's settings dict, '' for keyword arguments."""

    keep: int | None = None
    ratio: float | None = None
    strategy: str = "rank"
    score: str = "focal"
    kind: str = "logit"
    layer: int | None = None
    backend: str = "auto"
    prefix: str = field(default=ENGINE_PREFIX, compare=False, repr=False)

    def key(self, name: str) -> str:
        """The setting `name` as errors spell it (fopru.keep, or keep for an argument)."""
        return f"{self.prefix}{name}"

    def require(self, name: str, allowed: tuple, why: str) -> None:
        """Refuses a value a model cannot take although it is valid in general; why: the reason
        (e.g. "Qwen-VL towers have no CLS token")."""
        value = getattr(self, name)
        if value not in allowed:
            raise ValueError(f"{self.key(name)} must be one of {_choices(allowed)} ({why}), got {value!r}")

    def kept_count(self, n_tokens: int, grid: tuple[int, int] | None = None) -> int:
        """Tokens kept of an image with `n_tokens` patches on `grid` (rows, cols; None: square).

        Raises ValueError naming `keep` / `ratio` (see `key`) when the setting keeps no token, more
        than the image has, or (strategy 'row') no whole number of grid rows.
        """
        rows, cols = resolve_grid(n_tokens, grid, required=self.strategy == "row")
        if self.ratio is not None:
            kept = retained_count(n_tokens, self.ratio, strategy=self.strategy, grid=(rows, cols))
            if kept < 1:
                unit = cols if self.strategy == "row" else 1
                smallest = unit / n_tokens
                raise ValueError(
                    f"{self.key('ratio')}={self.ratio} keeps no token of an image's {n_tokens} patches "
                    f"(strategy {self.strategy!r}); allowed: a ratio in [{smallest:.6g}, 1]"
                )
            return kept
        if not 1 <= self.keep <= n_tokens:
            raise ValueError(f"{self.key('keep')} must be in [1, {n_tokens}] (the image's patches), got {self.keep}")
        if self.strategy == "row" and self.keep % cols:
            low = self.keep // cols * cols
            valid = [v for v in (low, low + cols) if 1 <= v <= n_tokens]
            raise ValueError(
                f"{self.key('keep')}={self.keep} with strategy 'row' must be a multiple of the grid's {cols} columns "
                f"(whole rows); nearest allowed: {', '.join(map(str, valid))}"
            )
        return self.keep

    def budget(self, n_tokens: int) -> int:
        """Tokens kept of a sequence of n_tokens that may be shorter than `keep` (LLaVA-NeXT's
        images vary in size): min(keep, n_tokens), or retained_count(n_tokens, ratio) (strategy 'rank')."""
        return min(self.keep, n_tokens) if self.ratio is None else retained_count(n_tokens, self.ratio)


def parse_settings(raw: Mapping, prefix: str = ENGINE_PREFIX) -> FoPruSettings:
    """The user's FoPru dict -> FoPruSettings. Raises ValueError naming the key (prefix + key, e.g.
    `fopru.keep`) and its allowed values.

    raw: {"keep": int >= 1 | "ratio": float in (0, 1], "strategy": "rank" | "row",
          "score": "focal" | "received" | "cls", "kind": "logit" | "prob", "layer": int,
          "backend": "auto" | "cpu" | "cuda" | "triton" | "reference"}; every key but one of
          keep / ratio may be left out.
    """
    name = prefix.rstrip(".")
    if not isinstance(raw, Mapping):
        raise ValueError(
            f"{name or 'settings'} must be a dict of settings with keys {_choices(KEYS)}, got {type(raw).__name__}: {raw!r}"
        )
    unknown = [key for key in raw if key not in KEYS]
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]} is not a setting; allowed keys: {_choices(KEYS)}")
    keep, ratio = raw.get("keep"), raw.get("ratio")
    if (keep is None) == (ratio is None):
        raise ValueError(
            f"{name + ': ' if name else ''}give exactly one of 'keep' (an int >= 1: tokens per image) or 'ratio' (a number in "
            f"(0, 1]), got keep={keep!r}, ratio={ratio!r}"
        )
    if keep is not None and (not _is_int(keep) or keep < 1):
        raise ValueError(f"{prefix}keep must be an int >= 1 (tokens kept per image), got {keep!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1 or math.isnan(ratio):
            raise ValueError(f"{prefix}ratio must be a number in (0, 1] (share of patches kept), got {ratio!r}")
        ratio = float(ratio)
    for key, allowed in (("strategy", STRATEGIES), ("score", SCORES), ("kind", KINDS)):
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"{prefix}{key} must be one of {_choices(allowed)}, got {raw[key]!r}")
    if "backend" in raw:
        check_backend(raw["backend"], f"{prefix}backend")
    layer = raw.get("layer")
    if layer is not None and not _is_int(layer):
        raise ValueError(
            f"{prefix}layer must be an int counting like hidden_states (e.g. -2), or left out for the layer "
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
        prefix=prefix,
    )


def settings_from_arguments(**arguments) -> FoPruSettings:
    """The adapters' keyword arguments (keep, ratio, strategy, score, kind, layer, backend; None: left
    out, so the default applies) -> FoPruSettings whose errors name the argument (`keep`, not `fopru.keep`)."""
    return parse_settings({key: value for key, value in arguments.items() if value is not None}, prefix="")
