"""FoPru for vLLM's Qwen2-VL, Qwen2.5-VL and Qwen3-VL: the pieces the three share (mixins placed before
vLLM's own classes in `qwen_models.py`). The rule is the transformers adapter's (`integrations.qwen_vl`),
through its pure functions, so both keep the same tokens:

- Processing info / processor: each image's (and video's, or Qwen3-VL video frame's) placeholder run is
  cut to its kept count (`selection_runs`) from its grid alone, before anything is encoded, as vLLM's
  own video pruning (EVS) sizes its placeholders. Items given as embeddings keep their stock count.
- Model: a forward pre-hook on the scored vision block's attention (`MMEncoderAttention`) records q, k
  (after the rotary embedding, as the attention uses them) and the block's attention segments; a forward
  hook on the vision tower turns them into one int64 significance per merged token
  (`significance_qk_varlen`, group = merge size squared; Qwen2.5-VL's window order undone with the
  tower's own window index, `raster_order`) and appends it to the tower's output as exact byte channels
  (`common.append_ints`), so vLLM's data-parallel encoder gathers it with the rows it belongs to. The
  model then keeps each run's tokens with one `prune_tokens_varlen` call; Qwen3-VL's deepstack features
  are columns of the same rows, so they take the same indices.
- Tensor parallelism: with the tower's heads split over the TP ranks, each rank computes its heads' int64
  parts (`reference_qk.significance_qk_varlen_parts`), one all-reduce over the TP group sums them and
  `significance_varlen_from_parts` makes the focal choice: every rank keeps the same tokens as TP = 1.
  With `mm_encoder_tp_mode="data"` each rank encodes whole images with all heads; no reduction is needed.
- M-RoPE positions through vLLM's mechanism for pruned media (`mrope.py`).
Without a `fopru` key every method is vLLM's own.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass

import torch

import fopru_kernels as fopru

from ...reference_qk import significance_qk_varlen_parts, significance_varlen_from_parts
from ..prompts import keep_placeholder_runs
from ..qwen_vl import Run, check_settings, kept_per_media, raster_order, scored_block, selection_runs
from ..settings import FoPruSettings, parse_settings
from .common import BYTES, append_ints, check_device_backend, split_ints
from .mrope import enable_runner_flag, place_media_positions, prompt_positions, relative_positions

PIXELS = {"image": "pixel_values", "video": "pixel_values_videos"}


@dataclass(frozen=True)
class QwenPlan:
    """A Qwen-VL config's FoPru settings resolved against it: the scored vision `block`, the spatial
    `merge` size, whether a video's frames are runs of their own (`per_frame`, Qwen3-VL: timestamps split
    them in the prompt) and whether the encoder runs in window order (`windowed`, Qwen2.5-VL)."""

    settings: FoPruSettings
    block: int
    merge: int
    per_frame: bool
    windowed: bool
    token_ids: dict

    def runs(self, grid_thw, modality: str, pruned: bool = True) -> list[Run]:
        """The placeholder runs of the media of grid_thw ((M, 3)) with their kept counts (all kept when
        not pruned: items given as embeddings)."""
        s = self.settings
        budget = dict(keep=s.keep, ratio=s.ratio) if pruned else dict(ratio=1.0)
        return selection_runs(grid_thw, modality, **budget, strategy=s.strategy if pruned else "rank",
                              merge_size=self.merge, per_frame=self.per_frame)


def qwen_plan(hf_config) -> QwenPlan | None:
    """The prune plan of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL config (None without a `fopru` key).
    ValueError naming the key for a bad setting."""
    raw = getattr(hf_config, "fopru", None)
    if raw is None:
        return None
    settings = parse_settings(raw)
    check_settings(settings)
    vision = hf_config.vision_config
    windows = getattr(vision, "fullatt_block_indexes", None)
    block = scored_block(settings, list(windows if windows is not None else range(vision.depth)), vision.depth)
    token_ids = {"image": hf_config.image_token_id, "video": hf_config.video_token_id}
    return QwenPlan(settings, block, vision.spatial_merge_size, hasattr(vision, "deepstack_visual_indexes"),
                    windows is not None, token_ids)


def refuse_video_pruning(mm_config) -> None:
    """vLLM's own video pruning (EVS, --video-pruning-rate) sizes the same placeholders another way."""
    if mm_config is not None and mm_config.get_video_pruning_spec() is not None:
        raise ValueError(
            "fopru: FoPru prunes images and videos itself and cannot be combined with vLLM's video pruning "
            f"(video_pruning_rate={mm_config.video_pruning_rate}); remove one of the two settings"
        )


class FoPruQwenProcessingInfo:
    """Mixin before vLLM's Qwen-VL processing info: `fopru` holds the plan, checked when vLLM builds its
    processor (None without a `fopru` key)."""

    def __init__(self, ctx) -> None:
        super().__init__(ctx)
        self.fopru = qwen_plan(self.get_hf_config())
        if self.fopru is not None:
            refuse_video_pruning(self.ctx.get_mm_config())


class FoPruQwenMultiModalProcessor:
    """Mixin before vLLM's Qwen-VL multimodal processor: every placeholder run vLLM puts in the prompt
    for an item given as pixels is cut to its kept count."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        if self.info.fopru is None:
            return updates
        return [dataclasses.replace(u, replacement=self._fopru_cut(u.modality, u.replacement, out_mm_kwargs))
                for u in updates]

    def _fopru_cut(self, modality: str, replacement, out_mm_kwargs):
        from vllm.multimodal.processing import PromptUpdateDetails

        plan = self.info.fopru
        token = plan.token_ids[modality]

        def cut(item_idx: int):
            full = replacement(item_idx) if callable(replacement) else replacement
            item = out_mm_kwargs[modality][item_idx]
            if PIXELS[modality] not in item:  # embeddings: nothing to score, the stock count
                return full
            runs = plan.runs(item[f"{modality}_grid_thw"].data, modality)
            seq = torch.tensor(full.full if isinstance(full, PromptUpdateDetails) else list(full))[None]
            kept = keep_placeholder_runs(seq, torch.ones_like(seq, dtype=torch.bool), token,
                                         [r.n for r in runs], [r.keep for r in runs])
            tokens = seq[kept].tolist()
            if not isinstance(full, PromptUpdateDetails):
                return tokens
            if full.is_embed is None:
                return PromptUpdateDetails.from_seq(tokens)
            return PromptUpdateDetails.select_token_id(tokens, token)

        return cut


class PackedQKCapture:
    """Forward pre-hook on a vision block's `MMEncoderAttention`: after each call, `take()` gives q, k
    (T, H, d) of this rank's heads as the attention gets them (rotary applied) and its attention segments
    cu_seqlens (S + 1,) int64; `scale` is its softmax scale."""

    def __init__(self, attention: torch.nn.Module):
        self.scale = float(attention.scale)
        self._signature = inspect.signature(attention.forward_native)
        self._seen = None
        self._handle = attention.register_forward_pre_hook(self._on_call, with_kwargs=True)

    def _on_call(self, module, args, kwargs) -> None:
        bound = self._signature.bind(*args, **kwargs).arguments
        self._seen = bound["query"], bound["key"], bound["cu_seqlens"]

    def take(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._seen is None:
            raise RuntimeError("FoPru: the scored vision block did not run before the tower returned")
        (q, k, cu_seqlens), self._seen = self._seen, None
        flat = (lambda x: x.reshape(-1, *x.shape[-2:]))  # (1, T, H, d) -> (T, H, d)
        return flat(q), flat(k), cu_seqlens.to(torch.int64)


class FoPruQwenModel:
    """Mixin before vLLM's Qwen-VL model class. With `hf_config.fopru` the model hands its language model
    each run's kept tokens, at the positions the unpruned model gives them.

    After each pruned encoding `fopru_last[modality]` holds `idx` (kept,) int64, indices into the merged
    tokens of that encoder batch (raster order), and `cu_seqlens` (runs + 1,) the kept counts' prefix sums.
    """

    fopru_prunes_media = False  # read by the runner flag (mrope.enable_runner_flag)

    @classmethod
    def fopru_plan(cls, hf_config) -> QwenPlan | None:
        return qwen_plan(hf_config)

    def __init__(self, *, vllm_config, prefix: str | None = None) -> None:
        # vLLM passes both by keyword (it reads this signature); prefix None keeps the class's default
        super().__init__(vllm_config=vllm_config, **({} if prefix is None else {"prefix": prefix}))
        self.fopru = qwen_plan(self.config)
        self.fopru_last: dict[str, dict[str, torch.Tensor]] = {}
        if self.fopru is None:
            return
        refuse_video_pruning(vllm_config.model_config.multimodal_config)
        check_device_backend(self.fopru.settings, torch.device(vllm_config.device_config.device))
        self.fopru_capture = PackedQKCapture(self.visual.blocks[self.fopru.block].attn.attn)
        self.visual.register_forward_hook(self._fopru_score, with_kwargs=True)
        self.fopru_prunes_media = True
        enable_runner_flag()

    # Scoring (in the tower's forward, on whichever rank encodes the item) ------------------------------

    def _fopru_score(self, visual, args, kwargs, output):
        """The tower's output with each merged token's significance appended as byte channels."""
        s, plan = self.fopru.settings, self.fopru
        q, k, cu_seqlens = self.fopru_capture.take()
        group, scale = plan.merge**2, self.fopru_capture.scale
        if q.shape[1] != self.config.vision_config.num_heads:  # heads split over the TP ranks
            from vllm.distributed import get_tp_group

            parts = significance_qk_varlen_parts(q, k, cu_seqlens, s.score, scale, None, s.kind)
            torch.distributed.all_reduce(parts, group=get_tp_group().device_group)
            sig = significance_varlen_from_parts(parts, cu_seqlens, group)
        else:
            sig = fopru.significance_qk_varlen(q, k, cu_seqlens, score=s.score, scale=scale, kind=s.kind, group=group,
                                               backend=s.backend)
        if plan.windowed:
            grid = inspect.signature(visual.forward).bind(*args, **kwargs).arguments["grid_thw"]
            window_index = visual.prepare_encoder_metadata(torch.as_tensor(grid).tolist())["window_index"]
            sig = sig[raster_order(window_index).to(sig.device)]
        return append_ints(output, sig[:, None])

    @contextlib.contextmanager
    def _fopru_encoding(self):
        """While vLLM encodes: in data-parallel encoder mode a rank without items pads its part of the
        all-gather to the tower's out_hidden_size, which must count the significance channels too."""
        widen = BYTES if self.use_data_parallel else 0
        self.visual.out_hidden_size += widen
        try:
            yield
        finally:
            self.visual.out_hidden_size -= widen

    # Pruning ----------------------------------------------------------------------------------------

    def _process_image_input(self, image_input):
        return self._fopru_process("image", image_input, super()._process_image_input)

    def _process_video_input(self, video_input):
        return self._fopru_process("video", video_input, super()._process_video_input)

    def _fopru_process(self, modality: str, media_input, encode):
        if self.fopru is None:
            return encode(media_input)
        grid_thw = media_input[f"{modality}_grid_thw"]
        if media_input["type"] != PIXELS[modality]:  # embeddings: unpruned, with their positions
            items = encode(media_input)
            return tuple(append_ints(e, p) for e, p in zip(items, self._fopru_positions(modality, media_input)))
        with self._fopru_encoding():
            items = encode(media_input)
        features, sig = split_ints(torch.cat(items), 1)
        s, runs = self.fopru.settings, self.fopru.runs(grid_thw, modality)
        select = torch.tensor([0, *torch.tensor([r.n for r in runs]).cumsum(0).tolist()], device=features.device)
        keep = [r.keep for r in runs]
        pruned, idx, cu_out = fopru.prune_tokens_varlen(features, sig[:, 0], select, keep, strategy=s.strategy,
                                                        grids=[(r.rows, r.cols) for r in runs], backend=s.backend)
        self.fopru_last[modality] = {"idx": idx, "cu_seqlens": cu_out}
        positions = torch.cat(self._fopru_positions(modality, media_input)).to(idx.device)[idx]
        return append_ints(pruned, positions).split(kept_per_media(runs, [len(e) for e in items]))

    def _fopru_positions(self, modality: str, media_input) -> list[torch.Tensor]:
        """Per item, (n, 3) int64: each merged token's M-RoPE position relative to its run's start."""
        config, plan = self.config, self.fopru
        stock = super().get_mrope_input_positions
        seconds = media_input.get("second_per_grid_ts") if modality == "video" else None
        out = []
        for i, grid in enumerate(media_input[f"{modality}_grid_thw"].tolist()):
            data = {f"{modality}_grid_thw": torch.tensor(grid)}
            if seconds is not None:
                data["second_per_grid_ts"] = torch.as_tensor(seconds[i])
            out.append(relative_positions(stock, modality, data, plan.merge, plan.token_ids[modality],
                                          config.vision_start_token_id, config.vision_end_token_id, plan.per_frame))
        return out

    # Positions (vLLM's mechanism for pruned media, mrope.py) -------------------------------------------

    def get_mrope_input_positions(self, input_tokens, mm_features):
        stock = super().get_mrope_input_positions
        if self.fopru is None:
            return stock(input_tokens, mm_features)

        def runs(feature) -> list[Run]:
            data = feature.data
            return self.fopru.runs(data[f"{feature.modality}_grid_thw"].data, feature.modality,
                                   pruned=PIXELS[feature.modality] in data)

        return prompt_positions(stock, input_tokens, mm_features, runs, self.fopru.token_ids)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        if self.fopru is None:  # vLLM's own video pruning (Qwen2.5-VL, Qwen3-VL)
            return super().recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions,
                                                     num_computed_tokens)
        return place_media_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                                     list(self.fopru.token_ids.values()), self.config.vision_start_token_id)

    def get_encoder_cudagraph_config(self):
        """Encoder CUDA graphs bypass `_process_*_input`, where FoPru prunes: off for a pruning model."""
        config = super().get_encoder_cudagraph_config()
        return config if self.fopru is None else dataclasses.replace(config, modalities=[])
