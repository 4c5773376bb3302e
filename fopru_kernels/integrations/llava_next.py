"""FoPru in Hugging Face LLaVA-NeXT (`LlavaNextForConditionalGeneration`, `LlavaNextModel`): each image's
packed feature sequence (base crop + anyres tiles + newlines) pruned after the model's own packing, in one
`prune_tokens_varlen` call. Made by `integrations.transformers.apply_fopru`."""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..ops import prune_tokens_varlen, significance_qk
from .llava import check_scored_features, scored_prefix
from .prompts import compact_inputs, keep_placeholder_runs
from .settings import FoPruSettings
from .towers import QKCapture, vision_transformer

# Significance of LLaVA-NeXT's image_newline tokens: above any fx sum (|sig| <= H * 2^36 for H heads),
# so 'rank' keeps every newline before any patch token; far from the int64 limits so no kernel's key
# transform can overflow.
NEWLINE_SIG = 2**62
NEWLINE_SOURCE = -1  # the source index packed in place of a newline (no crop token)


def require_rank(settings: FoPruSettings) -> None:
    """LLaVA-NeXT takes strategy 'rank' only: an image's packed sequence (base grid, then the unpadded
    tile grid with newlines) is no single grid."""
    settings.require("strategy", ("rank",), "LLaVA-NeXT's packed image sequence is no single grid")


class FoPruLlavaNext:
    """FoPru hooks on a LLaVA-NeXT model; made by `apply_fopru`, undone by `remove_fopru` (or `.remove()`).

    Mechanism: LLaVA-NeXT encodes every crop of an image (the base image plus its anyres tiles) as one
    tower sequence, projects all crop tokens, then `pack_image_features` reshapes each image's tiles
    into one grid, unpads it to the image's aspect ratio and appends an `image_newline` token to every
    row: image i becomes a sequence of n_i tokens (the count of `<image>` placeholders the processor
    emits). FoPru therefore prunes *after* the packing. `QKCapture` records q / k of the vision layer
    `config.vision_feature_layer`; an instance attribute overrides `pack_image_features` so that it
    1. packs the features with the model's own method (unchanged),
    2. scores every crop token with `significance_qk` on the (num_crops, S) tower batch,
    3. packs the *source index* of every crop token with the same method (a 1-wide int64 "feature",
       newline = -1), so each packed token knows its crop token and its significance, bit for bit the
       same layout as the features, whatever the transformers version does inside the packing,
    4. keeps `keep_i` tokens per image with one `prune_tokens_varlen(packed, sig, cu_seqlens, keep, 'rank')`.
    Newlines: every newline is kept (significance `NEWLINE_SIG`), and the budget counts patch tokens
    only: keep_i = newlines_i + min(keep, patches_i), or + retained_count(patches_i, ratio). Why: the
    newlines are the language model's only cue of the unpadded grid's rows, cost one token per row,
    and since kept tokens stay in order each newline still closes its row's kept tokens.
    Only strategy 'rank': a packed sequence (base grid + unpadded grid with newlines) is no single grid.

    After each image encoding: `last_idx` (T',) int64 indices into the packed sequence (the
    concatenation of the unpatched model's per-image features), `last_cu_seqlens` (num_images + 1,) the
    kept counts' prefix sums, `last_source` (T',) the crop token of each kept token (crop * N + patch,
    crops numbered over the batch) or -1 for a newline. Inference only.
    """

    def __init__(self, inner: nn.Module, settings: FoPruSettings):
        require_rank(settings)
        self.num_prefix = scored_prefix(inner, settings)
        self.settings = settings
        self.config = inner.config
        self.image_token_id = inner.config.image_token_id
        self.pad_token_id = inner.config.text_config.pad_token_id or 0
        self.tokens_per_crop = vision_transformer(inner.vision_tower).embeddings.num_patches
        self.last_idx: torch.Tensor | None = None
        self.last_cu_seqlens: torch.Tensor | None = None
        self.last_source: torch.Tensor | None = None
        self._inner = inner
        self._pack = inner.pack_image_features  # the class's bound method
        self.capture = QKCapture(inner.vision_tower, inner.config.vision_feature_layer)
        self._projector_hook = inner.multi_modal_projector.register_forward_pre_hook(self._check_projector_input)
        inner.pack_image_features = self._pack_and_prune  # instance attribute: shadows the method

    def _check_projector_input(self, module, args) -> None:
        check_scored_features(args[0], self.capture, self.num_prefix)

    def _sources(self, crops: list[int], image_sizes, select_strategy: str, newline: bool) -> list[torch.Tensor]:
        """Per image, (n_i,) int64 on the CPU: the crop token (crop * N + patch) each packed token comes from,
        -1 for a newline. Packs indices with the model's own pack_image_features, so the layout is its."""
        n = self.tokens_per_crop
        source = torch.arange(sum(crops) * n, dtype=torch.int64).view(sum(crops), n, 1)
        sentinel = torch.tensor([NEWLINE_SOURCE]) if newline else None
        packed, _ = self._pack(list(source.split(crops)), image_sizes, select_strategy, image_newline=sentinel)
        return [p.reshape(-1) for p in packed]

    def _budget(self, sources: list[torch.Tensor]) -> list[int]:
        """Tokens kept per image: all newlines, plus min(keep, patches) or retained_count(patches, ratio)."""
        out = []
        for src in sources:
            newlines = int((src == NEWLINE_SOURCE).sum())
            patches = src.numel() - newlines
            out.append(newlines + self.settings.budget(patches))
        return out

    def _pack_and_prune(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        """pack_image_features, then keep keep_i of each image's packed tokens. image_features: per image
        (crops_i, N, D) projected crop tokens. Returns (per-image (keep_i, D) list, keep (num_images,) int64)."""
        packed, _ = self._pack(image_features, image_sizes, vision_feature_select_strategy, image_newline=image_newline)
        cap = self.capture
        crops = [f.shape[0] for f in image_features]
        if cap.q is None or cap.q.shape[0] != sum(crops):
            raise ValueError(
                "FoPru packs the features of the latest vision tower pass; pack_image_features got features "
                "of no such pass (call the model, or get_image_features, rather than pack_image_features)"
            )
        sig = significance_qk(
            cap.q, cap.k, score=self.settings.score, num_prefix=self.num_prefix, scale=cap.scale, kind=self.settings.kind,
            layout="bshd", backend=self.settings.backend,
        )  # (num_crops, N): the _check_projector_input hook has tied q / k to these features
        cap.clear()
        sources = self._sources(crops, image_sizes, vision_feature_select_strategy, image_newline is not None)
        keep = self._budget(sources)
        device = packed[0].device
        source = torch.cat(sources).to(device)
        packed_sig = torch.where(source == NEWLINE_SOURCE, NEWLINE_SIG, sig.reshape(-1)[source.clamp(min=0)])
        lengths = torch.tensor([0] + [s.numel() for s in sources], dtype=torch.int64)
        cu_seqlens = lengths.cumsum(0).to(device)
        pruned, idx, cu_out = prune_tokens_varlen(
            torch.cat(packed), packed_sig, cu_seqlens, keep, strategy="rank", backend=self.settings.backend
        )
        self.last_idx, self.last_cu_seqlens, self.last_source = idx, cu_out, source[idx]
        return list(pruned.split(keep)), torch.tensor(keep, dtype=torch.long, device=device)

    def image_token_counts(self, image_sizes) -> tuple[list[int], list[int]]:
        """(n_i, keep_i) per image: the processor's placeholder count and the kept count, from the
        image sizes (num_images, 2) (H, W) alone, through the model's own packing."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        config = self.config
        crops = [
            image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
            for size in image_sizes
        ]
        sources = self._sources(crops, image_sizes, config.vision_feature_select_strategy, newline=True)
        return [s.numel() for s in sources], self._budget(sources)

    def prepare_inputs(self, inputs: Mapping, padding_side: str = "left") -> dict:
        """Tokenised inputs with keep_i image placeholders for image i instead of the processor's n_i.

        inputs: the processor's output (input_ids (B, T), attention_mask (B, T), pixel_values,
        image_sizes (num_images, 2), ...). Images own the placeholder runs in row-major order (the order
        the model fills them). Every (B, T) tensor is compacted alike, padded as in `FoPruLlava.prepare_inputs`.
        """
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        lengths, keep = self.image_token_counts(inputs["image_sizes"])
        kept = keep_placeholder_runs(ids, valid, self.image_token_id, lengths, keep)
        return compact_inputs(inputs, kept, self.pad_token_id, padding_side)

    def remove(self) -> None:
        """Removes the hooks and the pack_image_features override: all n_i image tokens again."""
        del self._inner.pack_image_features
        self._projector_hook.remove()
        self.capture.remove()
