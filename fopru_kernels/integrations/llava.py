"""FoPru in Hugging Face LLaVA (`LlavaForConditionalGeneration`, `LlavaModel`): the patch features fed to
the projector are pruned with the q/k of the layer they come from (`towers.QKCapture`). Made by
`integrations.transformers.apply_fopru`."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..ops import prune_tokens_qk
from .prompts import compact_inputs, keep_placeholders
from .settings import FoPruSettings
from .towers import QKCapture, num_prefix_tokens, vision_transformer


class FoPruLlava:
    """FoPru hooks on a LLaVA model; made by `apply_fopru`, undone by `remove_fopru` (or `.remove()`).

    Mechanism: `QKCapture` records q / k / output of the vision layer `config.vision_feature_layer`,
    and a forward pre-hook on `multi_modal_projector` replaces its input, the (B, N, D) patch features
    `LlavaModel.get_image_features` selected from that layer, by the `keep` tokens
    `prune_tokens_qk` keeps. Everything downstream then sees `keep` features per image, so
    `get_placeholder_mask` needs `keep` image placeholder tokens per image: `prepare_inputs` shortens
    the processor's N placeholders per image (`<image>` x N) to their first `keep` (the kept features
    fill them in their original order) and re-pads the batch.
    `last_idx` holds the (num_images, keep) patch indices kept by the latest image encoding.
    Inference only: the pruned features carry no gradient back into the vision tower.
    """

    def __init__(self, inner: nn.Module, settings: FoPruSettings):
        self.num_prefix = scored_prefix(inner, settings)
        tower = vision_transformer(inner.vision_tower)
        self.tokens_per_image = tower.embeddings.num_patches
        side = tower.config.image_size // tower.config.patch_size
        self.keep = settings.kept_count(self.tokens_per_image, (side, side))
        self.settings = settings
        self.image_token_id = inner.config.image_token_id
        self.pad_token_id = inner.config.text_config.pad_token_id or 0
        self.last_idx: torch.Tensor | None = None
        self.capture = QKCapture(inner.vision_tower, inner.config.vision_feature_layer)
        self._projector_hook = inner.multi_modal_projector.register_forward_pre_hook(self._prune)

    def _prune(self, module, args):
        (features,) = args
        cap, p = self.capture, self.num_prefix
        check_scored_features(features, cap, p)
        pruned, idx = prune_tokens_qk(
            features, cap.q, cap.k, self.keep, strategy=self.settings.strategy, score=self.settings.score, num_prefix=p,
            scale=cap.scale, kind=self.settings.kind, layout="bshd", backend=self.settings.backend,
        )
        cap.clear()
        self.last_idx = idx
        return (pruned,)

    def prepare_inputs(self, inputs: Mapping, padding_side: str = "left") -> dict:
        """Tokenised inputs with `keep` image placeholders per image instead of the processor's N.

        inputs: the processor's output (input_ids (B, T), attention_mask (B, T), pixel_values, ...).
        Every (B, T) tensor is compacted alike; input_ids is padded with the pad token and the other
        (B, T) tensors with 0, on `padding_side` ('left' for generate()). Other entries pass through.
        """
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        kept = keep_placeholders(ids, valid, self.image_token_id, self.tokens_per_image, self.keep)
        return compact_inputs(inputs, kept, self.pad_token_id, padding_side)

    def remove(self) -> None:
        """Removes the hooks: the model computes all N image features again."""
        self._projector_hook.remove()
        self.capture.remove()


def scored_prefix(inner: nn.Module, settings: FoPruSettings) -> int:
    """Prefix tokens of a LLaVA(-NeXT) model's tower, checked against what its feature selection drops
    and against the settings (score 'cls' needs CLIP's CLS token)."""
    config, tower = inner.config, inner.vision_tower
    if not isinstance(config.vision_feature_layer, int):
        raise ValueError(
            "apply_fopru needs one vision_feature_layer (FoPru scores one layer's attention), got "
            f"{config.vision_feature_layer}"
        )
    prefix = num_prefix_tokens(tower)
    drops = 1 if config.vision_feature_select_strategy == "default" else 0
    if drops != prefix:
        raise ValueError(
            f"vision_feature_select_strategy='{config.vision_feature_select_strategy}' drops {drops} leading "
            f"token(s) but the {type(tower).__name__} tower has {prefix} prefix token(s); FoPru prunes "
            "patch tokens only ('default' for CLIP towers, 'full' for SigLIP)"
        )
    if not prefix:
        settings.require("score", ("focal", "received"), f"the {type(tower).__name__} tower has no CLS token")
    return prefix


def check_scored_features(features: torch.Tensor, cap: QKCapture, num_prefix: int) -> None:
    """The projector must be fed hidden_states[vision_feature_layer][:, P:] of this very pass; a call
    that overrides vision_feature_layer (or the select strategy) would otherwise get another layer's scores."""
    hidden = cap.hidden
    if (
        hidden is None
        or features.shape != hidden[:, num_prefix:].shape
        or features.data_ptr() != hidden[:, num_prefix:].data_ptr()
    ):
        raise ValueError(
            f"FoPru scores vision layer hidden_states[{cap.layer}] with its prefix of {num_prefix} token(s) dropped, "
            "but the projector got other features; do not override vision_feature_layer / "
            "vision_feature_select_strategy in the call, or re-apply FoPru"
        )

