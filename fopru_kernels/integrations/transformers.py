"""FoPru for Hugging Face transformers: the one entry point `apply_fopru` / `remove_fopru`, for LLaVA,
LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, and the CLIP / SigLIP tower tools.

Defaults follow the paper: FoPru's own significance, `score="focal"` (the column or row means,
whichever has the larger variance) of the scaled logits (`kind="logit"`, no softmax) of the layer the
model feeds to its projector; `score="cls"` (CLIP's CLS row, FasterVLM / VisionZip style) and
`kind="prob"` stay options. The defaults need no CLS token, so SigLIP towers work with them as they
are. Every setting (keep / ratio, strategy, score, kind, layer, backend) is checked when the adapter
is applied, by the validator every integration shares (`settings.settings_from_arguments`).

Where the pieces live (this module re-exports their public names):
- `towers`: `QKCapture(vision_model, layer)` (the hooks alone) and `prune_vision_features(vision_model,
  pixel_values, keep, ...)` (one tower pass -> pruned features), on CLIP / SigLIP towers;
- `llava`: `FoPruLlava`: LLaVA (`LlavaForConditionalGeneration`, `LlavaModel`) prunes its image
  features before the projector;
- `llava_next`: `FoPruLlavaNext`: LLaVA-NeXT (`LlavaNextForConditionalGeneration`, `LlavaNextModel`)
  prunes each image's packed feature sequence after `pack_image_features`, in one
  `prune_tokens_varlen` call;
- `qwen_vl`: `FoPruQwenVL`: Qwen2-VL, Qwen2.5-VL and Qwen3-VL;
- `prompts`: placeholder editing. Each handle's `prepare_inputs` shortens the image placeholders of
  tokenised inputs to the kept count per image for `generate()`.
"""
from __future__ import annotations

from torch import nn

from .llava import FoPruLlava
from .llava_next import FoPruLlavaNext
from .prompts import compact_inputs, compact_rows, keep_placeholder_runs, keep_placeholders
from .settings import settings_from_arguments
from .towers import QKCapture, num_prefix_tokens, patch_grid, prune_vision_features

__all__ = [
    "FoPruLlava", "FoPruLlavaNext", "QKCapture", "apply_fopru", "compact_inputs", "compact_rows",
    "keep_placeholder_runs", "keep_placeholders", "num_prefix_tokens", "patch_grid", "prune_vision_features",
    "remove_fopru",
]


def _llava_model(model: nn.Module) -> nn.Module:
    """The LlavaModel / LlavaNextModel of a model (the inner model itself, or its ...ForConditionalGeneration)."""
    from transformers import (
        LlavaForConditionalGeneration,
        LlavaModel,
        LlavaNextForConditionalGeneration,
        LlavaNextModel,
    )

    if isinstance(model, (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)):
        model = model.model
    if not isinstance(model, (LlavaModel, LlavaNextModel)):
        raise ValueError(
            "FoPru for transformers supports LlavaForConditionalGeneration, LlavaModel, "
            "LlavaNextForConditionalGeneration, LlavaNextModel and the Qwen2-VL, Qwen2.5-VL and Qwen3-VL models, "
            f"got {type(model).__name__}"
        )
    return model


def apply_fopru(
    model: nn.Module,
    keep: int | None = None,
    *,
    ratio: float | None = None,
    strategy: str = "rank",
    score: str = "focal",
    kind: str = "logit",
    backend: str = "auto",
    layer: int | None = None,
):
    """Makes a LLaVA, LLaVA-NeXT or Qwen-VL model hand fewer image tokens per image to its language model.

    model: LlavaForConditionalGeneration / LlavaModel, or LlavaNextForConditionalGeneration /
    LlavaNextModel, with a CLIP or SigLIP vision tower and one int vision_feature_layer; or a
    Qwen2-VL / Qwen2.5-VL / Qwen3-VL model (...ForConditionalGeneration or ...Model), served by
    `integrations.qwen_vl` (see there; `layer` picks the scored vision block). Give exactly one of keep
    (tokens per image, >= 1) or ratio (in (0, 1], via `retained_count`). LLaVA keeps `keep` of its N patches per image; LLaVA-NeXT keeps every image_newline
    token plus min(keep, patches_i) or retained_count(patches_i, ratio) of image i's packed patch tokens
    (see FoPruLlavaNext).
    strategy 'rank' | 'row' (LLaVA only; row needs keep to be a multiple of the grid width), score
    'focal' (FoPru's, the default) | 'received' | 'cls' (CLIP), kind 'logit' (FoPru's, the default) |
    'prob' (SPEC.md), backend 'auto' (FOPRU_BACKEND's choice) | 'cpu' | 'cuda' | 'triton' | 'reference'.
    Returns the handle; shorten the processor's placeholders with `handle.prepare_inputs(inputs)`
    before `model.generate(**...)` or `model(**...)`. Raises ValueError naming the argument for a bad
    setting (checked before the model is touched), or if FoPru is already applied.
    """
    from transformers import LlavaNextModel

    from . import qwen_vl

    settings = settings_from_arguments(keep=keep, ratio=ratio, strategy=strategy, score=score, kind=kind,
                                       layer=layer, backend=backend)
    if qwen_vl.qwen_vl_model(model) is not None:
        return qwen_vl.apply_settings(model, settings)
    if layer is not None:
        raise ValueError("layer is a Qwen-VL setting; LLaVA scores the layer of config.vision_feature_layer")
    inner = _llava_model(model)
    if getattr(inner, "_fopru", None) is not None:
        raise ValueError("FoPru is already applied to this model; call remove_fopru(model) first")
    handle_cls = FoPruLlavaNext if isinstance(inner, LlavaNextModel) else FoPruLlava
    inner._fopru = handle_cls(inner, settings)
    return inner._fopru


def remove_fopru(model: nn.Module) -> None:
    """Undoes apply_fopru: the model keeps all image tokens again. A no-op if FoPru is not applied."""
    from . import qwen_vl

    if qwen_vl.qwen_vl_model(model) is not None:
        qwen_vl.remove_fopru(model)
        return
    inner = _llava_model(model)
    handle = getattr(inner, "_fopru", None)
    if handle is not None:
        handle.remove()
        del inner._fopru

