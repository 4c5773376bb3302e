"""FoPru for vLLM's LLaVA-NeXT (`LlavaNextForConditionalGeneration` with a CLIP tower).

Same rule as the transformers adapter (`FoPruLlavaNext`): every crop of an image (the base image and
its anyres tiles) is one tower sequence; the model projects all crop tokens, then packs each image
into one sequence (base grid, then the unpadded tile grid with an `image_newline` token closing each
row). FoPru prunes *after* that packing: every `image_newline` is kept, and of the image's patch tokens
it keeps `settings.budget(patches)` (min(keep, patches) or retained_count(patches, ratio)), ranked
together by significance from the scored layer's q/k (strategy 'rank' only: the packed sequence is
no single grid). Each packed token's significance is its crop token's, found by packing the crop
tokens' indices with the model's own packing method, so the layout is vLLM's whatever it does.
- Processing info: reports newlines + budget(patches) placeholders for an image of that size.
- Image embeddings given directly pass through unpruned, as for LLaVA-1.5.
Without a `fopru` key both classes behave exactly as vLLM's own.
"""
from __future__ import annotations

import types

import torch
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
    get_anyres_image_grid_shape,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

import fopru_kernels as fopru

from ..llava_next import NEWLINE_SIG, NEWLINE_SOURCE, require_rank
from ..settings import parse_settings
from .common import PrunePlan, significance
from .llava import capture_scored_layer, clip_tower_plan, tp_group

def llava_next_plan(hf_config) -> PrunePlan | None:
    """The prune plan of a LLaVA-NeXT config (None without a `fopru` key); ValueError naming the key."""
    raw = getattr(hf_config, "fopru", None)
    if raw is None:
        return None
    settings = parse_settings(raw)
    require_rank(settings)

    def base_crop_budget(patches: int, grid) -> int:  # every image has at least its base crop's patches
        kept = settings.budget(patches)
        if kept < 1:
            raise ValueError(
                f"fopru.ratio={settings.ratio} keeps no token of an image's {patches} base patches; allowed: "
                f"a ratio in [{1 / patches:.6g}, 1]"
            )
        return kept

    return clip_tower_plan(hf_config, settings, base_crop_budget)


class FoPruLlavaNextProcessingInfo(LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing info, reporting each image's kept count when FoPru is on."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.fopru = llava_next_plan(self.get_hf_config())  # checked when vLLM builds its processor

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        count = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        if self.fopru is None:
            return count
        encoder = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(image_height, image_width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=encoder.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=image_height, original_width=image_width, npatches=encoder.get_patch_grid_length(),
            num_patch_height=rows, num_patch_width=cols,
        )
        return newlines + self.fopru.settings.budget(count - newlines)


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=FoPruLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FoPruLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with `hf_config.fopru` each image's packed sequence keeps its newlines and
    budget(patches) of its patch tokens.

    After each encoder batch: `fopru_last_source` (T',) int64, per kept token its crop token within
    its image (crop * N + patch, the base crop first) or -1 for a newline, and `fopru_last_cu_seqlens`
    (num_images + 1,), the kept counts' prefix sums.
    """

    @classmethod
    def fopru_plan(cls, hf_config) -> PrunePlan | None:
        return llava_next_plan(hf_config)

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.fopru = llava_next_plan(self.config)
        self.fopru_last_source: torch.Tensor | None = None
        self.fopru_last_cu_seqlens: torch.Tensor | None = None
        if self.fopru is None:
            return
        self.fopru_capture = capture_scored_layer(self, self.fopru, vllm_config.device_config.device)

    def _sources(self, image_size: torch.Tensor, first_crop: int, crops: int) -> torch.Tensor:
        """(n,) int64: the crop token each packed token of one image comes from, NEWLINE_SOURCE for a newline,
        packed by vLLM's own `_merge_image_patch_embeddings` (on 1-wide int64 'features')."""
        n = self.fopru.patches
        source = torch.arange(first_crop * n, (first_crop + crops) * n, dtype=torch.int64).view(crops, n, 1)
        packer = types.SimpleNamespace(config=self.config, image_newline=torch.tensor([NEWLINE_SOURCE]))
        merge = LlavaNextForConditionalGeneration._merge_image_patch_embeddings
        return merge(packer, image_size.cpu(), source, strategy="spatial_unpad").reshape(-1)

    def _process_image_input(self, image_input):
        packed = super()._process_image_input(image_input)
        if self.fopru is None or isinstance(image_input, LlavaNextImageEmbeddingInputs):
            return packed
        q, k = self.fopru_capture.take()  # (all crops of the batch, S, H, d)
        sig = significance(q, k, self.fopru, self.fopru_capture.scale, tp_group(self.fopru_capture)).reshape(-1)
        pixel_values = image_input["pixel_values"]
        crops = [p.shape[0] for p in pixel_values]  # crops run through the tower per image, padding included
        firsts = torch.tensor([0] + crops[:-1]).cumsum(0).tolist()
        sources = [self._sources(image_input["image_sizes"][i], firsts[i], crops[i]) for i in range(len(packed))]
        budget = self.fopru.settings.budget
        keep = [int((s == NEWLINE_SOURCE).sum()) + budget(int((s != NEWLINE_SOURCE).sum())) for s in sources]
        source = torch.cat(sources).to(sig.device)
        packed_sig = torch.where(source == NEWLINE_SOURCE, NEWLINE_SIG, sig[source.clamp(min=0)])
        cu_seqlens = torch.tensor([0] + [s.numel() for s in sources], dtype=torch.int64).cumsum(0).to(sig.device)
        pruned, idx, cu_out = fopru.prune_tokens_varlen(
            torch.cat(packed), packed_sig, cu_seqlens, keep, strategy="rank", backend=self.fopru.settings.backend
        )
        first = torch.repeat_interleave(torch.tensor(firsts), torch.tensor([t.numel() for t in sources]))
        local = torch.where(source == NEWLINE_SOURCE, NEWLINE_SOURCE, source - first.to(source.device) * self.fopru.patches)
        self.fopru_last_source, self.fopru_last_cu_seqlens = local[idx], cu_out
        return list(pruned.split(keep))
