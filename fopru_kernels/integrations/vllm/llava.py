"""FoPru for vLLM's LLaVA-1.5 (`LlavaForConditionalGeneration` with a CLIP tower).

- Processing info: `get_num_image_tokens` reports the kept count K, so vLLM expands each `<image>`
  to K placeholders (and sizes its encoder budget with K) before anything runs.
- Model: a forward hook on the scored CLIP layer's `qkv_proj` captures q and k; the tower's patch
  features (the layer LLaVA feeds to its projector, CLS dropped) are pruned to K with our q/k ops
  *before* the projector, which then runs on K tokens per image.
- Image embeddings given directly (`image_embeds`, precomputed projector outputs) pass through
  unpruned with their own length: there is no encoder attention to score them with.
Without a `fopru` key in the config both classes behave exactly as vLLM's own.
"""
from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, PixtralVisionConfig
from vllm.distributed import get_tp_group
from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    PixtralHFMultiModalProcessor,
    PixtralHFProcessingInfo,
)
from vllm.model_executor.models.utils import get_layer_index
from vllm.multimodal import MULTIMODAL_REGISTRY

from ..settings import FoPruSettings, parse_settings
from .common import PrunePlan, QKVCapture, check_device_backend, prune_patches, scored_layer_index


def clip_tower_plan(hf_config, settings: FoPruSettings, keep) -> PrunePlan:
    """The plan of a LLaVA-family config (LLaVA-1.5, LLaVA-NeXT): a CLIP tower whose CLS token is
    dropped before the projector, one vision feature layer. keep(patches, grid) -> kept count of one
    image (or crop). ValueError naming the key for a bad setting or a variant FoPru does not handle."""
    vision = hf_config.vision_config
    if not isinstance(vision, CLIPVisionConfig):
        raise ValueError(
            f"fopru: {type(hf_config).__name__} is supported with a CLIP vision tower, got a {type(vision).__name__}"
        )
    if hf_config.vision_feature_select_strategy != "default":
        raise ValueError(
            "fopru: the model must drop CLIP's CLS token before its projector "
            f"(vision_feature_select_strategy 'default'), got {hf_config.vision_feature_select_strategy!r}"
        )
    feature_layer = hf_config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(f"fopru: the model must feed one vision layer to its projector, got {feature_layer}")
    num_layers = vision.num_hidden_layers
    layer = feature_layer if settings.layer is None else settings.layer
    index = scored_layer_index(layer, num_layers, get_layer_index(feature_layer, num_layers))
    side = vision.image_size // vision.patch_size
    grid = (side, side)
    return PrunePlan(settings, keep(side * side, grid), side * side, grid, 1, index)


def llava_plan(hf_config) -> PrunePlan | None:
    """The prune plan of a LLaVA-1.5 config (None without a `fopru` key): every image keeps K."""
    raw = getattr(hf_config, "fopru", None)
    if raw is None:
        return None
    settings = parse_settings(raw)
    return clip_tower_plan(hf_config, settings, settings.kept_count)


def capture_scored_layer(model, plan: PrunePlan, device) -> QKVCapture:
    """Checks the backend for the model's device and hooks the scored CLIP layer's qkv projection."""
    check_device_backend(plan.settings, torch.device(device))
    attn = model.vision_tower.vision_model.encoder.layers[plan.layer_index].self_attn
    return QKVCapture(attn.qkv_proj, attn.scale)


def tp_group(capture: QKVCapture):
    """The process group the scored layer's heads are split over (vLLM's TP group), or None."""
    return get_tp_group().device_group if capture.split else None


class FoPruLlavaProcessingInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing info, reporting K placeholders per image when FoPru is on."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.fopru = llava_plan(self.get_hf_config())  # checked when vLLM builds its processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        count = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return count if self.fopru is None else self.fopru.keep


def _processing_info(ctx):
    if isinstance(ctx.get_hf_config().vision_config, PixtralVisionConfig):
        return PixtralHFProcessingInfo(ctx)
    return FoPruLlavaProcessingInfo(ctx)


def _processor(info, dummy_inputs):
    if isinstance(info, PixtralHFProcessingInfo):
        return PixtralHFMultiModalProcessor(info, dummy_inputs)
    return LlavaMultiModalProcessor(info, dummy_inputs)


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_processing_info, dummy_inputs=LlavaDummyInputsBuilder)
class FoPruLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA; with `hf_config.fopru` it hands the projector K of each image's patch tokens.

    `fopru_last_idx` holds the (num_images, K) patch indices kept by the latest encoder batch.
    """

    @classmethod
    def fopru_plan(cls, hf_config) -> PrunePlan | None:
        return llava_plan(hf_config)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fopru = llava_plan(self.config)
        self.fopru_last_idx: torch.Tensor | None = None
        if self.fopru is None:
            return
        self.fopru_capture = capture_scored_layer(self, self.fopru, vllm_config.device_config.device)

    def _image_pixels_to_features(self, vision_tower, pixel_values):
        features = super()._image_pixels_to_features(vision_tower, pixel_values)
        if self.fopru is None:
            return features
        q, k = self.fopru_capture.take()
        pruned, idx = prune_patches(features, q, k, self.fopru, self.fopru_capture.scale, tp_group(self.fopru_capture))
        self.fopru_last_idx = idx
        return pruned
