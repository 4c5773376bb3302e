"""FoPru for Hugging Face Qwen2-VL, Qwen2.5-VL and Qwen3-VL (transformers).

These models encode all images and videos of a batch as one packed sequence (FlashAttention-varlen
`cu_seqlens`, one attention segment per image and per video frame in their full-attention blocks),
have no CLS token, merge 2 x 2 patches into one language-model token (the 4 patches are consecutive in
encoder order) and give the language model 3-D M-RoPE positions (t, h, w). FoPru here:

1. captures q and k of one vision block (default: the last full-attention block) with hooks: the output
   of its `attn.qkv` Linear and the `cu_seqlens` / `position_embeddings` its attention is called with,
   the model's own `apply_rotary_pos_emb_vision` then gives q and k exactly as the attention uses them;
   the tower keeps its attention implementation (eager / SDPA / FlashAttention);
2. scores every merged token with `significance_qk_varlen` (group = 4; attention segments as the block
   saw them), undoes Qwen2.5-VL's window order (the model's own window index), and prunes each image,
   and each video over its whole clip (Qwen3-VL: per frame, see `selection_runs`), with one
   `prune_tokens_varlen` / `prune_tokens_qk_varlen` call; Qwen3-VL's deepstack features take the same
   indices;
3. gives the language model each kept token's original (t, h, w) position, and the text after a media
   item the position the unpruned model gives it: `get_rope_index` is answered by the model's own
   method run on the prompt with every run of placeholders restored to its unpruned length, and the
   kept tokens take their columns of that answer.

Version-sensitive internals (checked with transformers 5.19 and 5.24): `model.visual.blocks[i].attn`
with `qkv`, `num_heads`, `scaling` and forward kwargs `cu_seqlens`, `position_embeddings`; the
module-level `apply_rotary_pos_emb_vision` of the attention's module; Qwen2.5-VL's
`visual.fullatt_block_indexes` and window index (`visual.get_window_index`, or the module-level
`get_vision_window_index`); `get_image_features` / `get_video_features` returning an output whose
`pooler_output` is a per-media tuple (Qwen3-VL: `deepstack_features`, a list of such tuples);
`get_rope_index(input_ids, mm_token_type_ids=..., image_grid_thw=..., video_grid_thw=...,
attention_mask=...)`; the language model called with a keyword `position_ids` of (3 or 4, B, T).
"""
from __future__ import annotations

import inspect
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..ops import prune_tokens_qk_varlen, prune_tokens_varlen, significance_qk_varlen
from ..reference import retained_count
from .prompts import compact_inputs, keep_placeholder_runs
from .settings import FoPruSettings, settings_from_arguments

SCORES = ("focal", "received")  # Qwen-VL towers have no CLS token


def qwen_vl_model(model: nn.Module) -> nn.Module | None:
    """The Qwen2VLModel / Qwen2_5_VLModel / Qwen3VLModel of `model` (itself or its
    ...ForConditionalGeneration), or None for any other model."""
    import transformers

    inner_names = ("Qwen2VLModel", "Qwen2_5_VLModel", "Qwen3VLModel")
    inner_classes = tuple(getattr(transformers, n) for n in inner_names if hasattr(transformers, n))
    if not isinstance(getattr(model, "model", None), inner_classes) and not isinstance(model, inner_classes):
        return None
    return model if isinstance(model, inner_classes) else model.model


class QwenQKCapture:
    """Hooks recording what one block of a Qwen-VL vision tower attends with. After each tower pass:
    `qk()` gives q, k (T, H, d) after the rotary embedding, in encoder order, `cu_seqlens` the
    block's attention segments, `scale` its softmax scale. `clear()` drops them, `remove()` the hooks."""

    def __init__(self, visual: nn.Module, block: int):
        attn = visual.blocks[block].attn
        self.block, self.scale, self.heads = block, float(attn.scaling), attn.num_heads
        self._rotary = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb_vision", None)
        if self._rotary is None:
            raise ValueError(f"{type(attn).__module__} has no apply_rotary_pos_emb_vision: unsupported transformers version")
        self.qkv = self.cu_seqlens = self.position_embeddings = None
        self._handles = [
            attn.register_forward_pre_hook(self._on_attention, with_kwargs=True),
            attn.qkv.register_forward_hook(self._on_qkv),
        ]

    def _on_attention(self, module, args, kwargs) -> None:
        bound = inspect.signature(module.forward).bind(*args, **kwargs).arguments
        self.cu_seqlens = bound["cu_seqlens"]
        self.position_embeddings = bound.get("position_embeddings")
        if self.position_embeddings is None:
            raise ValueError("the vision attention got no position_embeddings: unsupported transformers version")

    def _on_qkv(self, module, args, out) -> None:
        self.qkv = out

    def qk(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k (T, H, d) as the block's attention computes them (the model's rotary function)."""
        t = self.qkv.shape[0]
        qkv = self.qkv.view(t, 3, self.heads, -1)
        cos, sin = self.position_embeddings
        return self._rotary(qkv[:, 0], qkv[:, 1], cos, sin)

    def clear(self) -> None:
        self.qkv = self.cu_seqlens = self.position_embeddings = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self.clear()


@dataclass(frozen=True)
class Run:
    """One selection segment = one run of placeholders in the prompt: n merged tokens on a (rows, cols)
    grid (a video's frames stacked: rows = t * h), of which `keep` are kept."""

    n: int
    keep: int
    rows: int
    cols: int


def selection_runs(grid_thw, modality: str, *, keep: int | None = None, ratio: float | None = None,
                   strategy: str = "rank", merge_size: int = 2, per_frame: bool = False) -> list[Run]:
    """The selection segments (= placeholder runs of the prompt) of the media of `grid_thw` ((M, 3) host
    ints or tensor: temporal patches, patch rows, patch cols, as image_grid_thw / video_grid_thw), in
    prompt order, with their kept counts. Pure: an engine sizes its placeholders with it before encoding.

    An image is one run. A video is one run over its whole clip (grid (t * rows, cols) of merged tokens),
    or, with per_frame (Qwen3-VL, whose prompts separate a video's frames by timestamps, so the prompt
    fixes each frame's count before the encoder has scored anything), one run per frame.
    Kept: keep -> min(keep * frames, n) ('row': whole rows of that); ratio -> retained_count(n, ratio) over
    the run ('row': floor(rows * ratio) rows). Raises ValueError when a run would keep nothing.
    """
    if modality not in ("image", "video"):
        raise ValueError(f"modality must be 'image' or 'video', got {modality!r}")
    runs = []
    for t, h, w in torch.as_tensor(grid_thw).reshape(-1, 3).tolist():
        rows, cols = h // merge_size, w // merge_size
        split = modality == "video" and per_frame
        frames = 1 if split or modality == "image" else t
        for _ in range(t if split else 1):
            n = frames * rows * cols
            if ratio is not None:
                k = retained_count(n, ratio, strategy=strategy, grid=(frames * rows, cols))
            else:
                k = min(keep * frames, n)
                k = k // cols * cols if strategy == "row" else k
            if k < 1:
                raise ValueError(
                    f"the budget keeps no token of a {frames * rows} x {cols} {modality} run (merged tokens; "
                    f"keep={keep}, ratio={ratio}, strategy={strategy!r}): every image and video must keep at "
                    "least one token (one row for 'row')"
                )
            runs.append(Run(n, k, frames * rows, cols))
    return runs


def check_settings(settings: FoPruSettings) -> None:
    """The Qwen-VL-specific refusals of generally valid settings (no CLS token to score with)."""
    settings.require("score", SCORES, "Qwen-VL towers have no CLS token")


def scored_block(settings: FoPruSettings, full: list[int], depth: int) -> int:
    """Index (in [0, depth)) of the vision block FoPru scores: settings.layer (negative counts from the
    end), or the last full-attention block. full: the tower's full-attention blocks (Qwen2.5-VL's
    fullatt_block_indexes; every block of Qwen2-VL and Qwen3-VL). ValueError naming the layer setting."""
    layer = full[-1] if settings.layer is None else settings.layer
    if not -depth <= layer < depth or layer % depth not in full:
        raise ValueError(
            f"{settings.key('layer')} must index a full-attention block of the vision tower, one of {full}, got {layer}"
        )
    return layer % depth


class FoPruQwenVL:
    """FoPru hooks on a Qwen-VL model; made by `apply_fopru`, undone by `remove_fopru` (or `.remove()`).

    After each encoding: `last_idx[m]` (kept,) int64 indices into the media's merged tokens in the model's
    order and `last_cu_seqlens[m]` the prefix sums of the kept counts per run, m in 'image' / 'video'.
    Inference only.
    """

    def __init__(self, inner: nn.Module, settings: FoPruSettings):
        visual = inner.visual
        check_settings(settings)
        full = list(getattr(visual, "fullatt_block_indexes", range(len(visual.blocks))))
        block = scored_block(settings, full, len(visual.blocks))
        self.settings = settings
        self.keep, self.ratio, self.strategy = settings.keep, settings.ratio, settings.strategy
        self.score, self.kind, self.backend = settings.score, settings.kind, settings.backend
        self.merge = visual.spatial_merge_size
        self.windowed = hasattr(visual, "fullatt_block_indexes")  # Qwen2.5-VL: encoder order is window order
        self.frames_apart = hasattr(visual, "deepstack_visual_indexes")  # Qwen3-VL: timestamps split a video's frames
        self.token_ids = {"image": inner.config.image_token_id, "video": inner.config.video_token_id}
        self.pad_token_id = getattr(inner.config.get_text_config(), "pad_token_id", None) or 0
        self.last_idx: dict[str, torch.Tensor] = {}
        self.last_cu_seqlens: dict[str, torch.Tensor] = {}
        self._inner, self._encoding, self._call = inner, False, {}
        self._encoded: dict[str, tuple[torch.Tensor, list[torch.Tensor]]] = {}  # modality -> (grid_thw, kept per run)
        self.capture = QwenQKCapture(visual, block)
        self._hooks = [
            inner.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
            inner.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
        ]
        inner.get_image_features = self._image_features  # instance attributes shadow the methods
        inner.get_video_features = self._video_features
        inner.get_rope_index = self._rope_index

    # Budget ----------------------------------------------------------------------------------------

    def selection_runs(self, grid_thw, modality: str) -> list[Run]:
        """The runs of the media of `grid_thw` under this handle's budget (see module-level selection_runs)."""
        return selection_runs(grid_thw, modality, keep=self.keep, ratio=self.ratio, strategy=self.strategy,
                              merge_size=self.merge, per_frame=self.frames_apart)

    # Encoding --------------------------------------------------------------------------------------

    def _image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return self._encode("image", pixel_values, image_grid_thw, kwargs)

    def _video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        return self._encode("video", pixel_values_videos, video_grid_thw, kwargs)

    def _encode(self, modality: str, pixels, grid_thw, kwargs):
        method = getattr(type(self._inner), f"get_{modality}_features")
        if self._encoding:  # Qwen3-VL's get_video_features calls get_image_features: no second prune
            return method(self._inner, pixels, grid_thw, **kwargs)
        return_dict = kwargs.pop("return_dict", True)
        self._encoding = True
        try:
            out = method(self._inner, pixels, grid_thw, return_dict=True, **kwargs)
        finally:
            self._encoding = False
        runs = self.selection_runs(grid_thw, modality)
        features = torch.cat(out.pooler_output)
        idx = self._prune(features, grid_thw, runs)
        kept = kept_per_media(runs, [len(f) for f in out.pooler_output])
        out.pooler_output = tuple(features[idx].split(kept))
        if getattr(out, "deepstack_features", None) is not None:
            out.deepstack_features = [tuple(torch.cat(f)[idx].split(kept)) for f in out.deepstack_features]
        starts = [0, *torch.tensor([r.n for r in runs]).cumsum(0).tolist()]
        bounds = [0, *torch.tensor([r.keep for r in runs]).cumsum(0).tolist()]
        self._encoded[modality] = (grid_thw, [idx[bounds[i]:bounds[i + 1]] - starts[i] for i in range(len(runs))])
        self.last_idx[modality] = idx
        self.last_cu_seqlens[modality] = torch.tensor(bounds, device=idx.device)
        return out if return_dict else out.to_tuple()

    def _prune(self, features: torch.Tensor, grid_thw, runs: list[Run]) -> torch.Tensor:
        """Indices (sum(keep),) into the merged tokens (features, raster order) of this tower pass."""
        cap = self.capture
        if cap.qkv is None or cap.qkv.shape[0] != int(torch.as_tensor(grid_thw).prod(-1).sum()):
            raise ValueError("FoPru got no q/k of this vision tower pass (was the scored block skipped?)")
        q, k = cap.qk()
        device = q.device
        select = torch.tensor([0, *torch.tensor([r.n for r in runs]).cumsum(0).tolist()], device=device)
        grids = [v for r in runs for v in (r.rows, r.cols)]
        keep = [r.keep for r in runs]
        group = self.merge**2
        try:
            if not self.windowed:
                return prune_tokens_qk_varlen(
                    features, q, k, cap.cu_seqlens, keep, strategy=self.strategy, score=self.score, scale=cap.scale, kind=self.kind,
                    group=group, cu_seqlens_select=select, grids=grids, backend=self.backend,
                )[1]
            sig = significance_qk_varlen(q, k, cap.cu_seqlens, score=self.score, scale=cap.scale, kind=self.kind, group=group,
                                         backend=self.backend)
            sig = sig[_window_to_raster(self._inner.visual, grid_thw).to(device)]
            return prune_tokens_varlen(features, sig, select, keep, strategy=self.strategy, grids=grids, backend=self.backend)[1]
        finally:
            cap.clear()

    # Positions -------------------------------------------------------------------------------------

    def _runs_by_modality(self, kwargs: Mapping) -> dict[str, list[Run]]:
        grids = {"image": kwargs.get("image_grid_thw"), "video": kwargs.get("video_grid_thw")}
        return {m: self.selection_runs(g, m) for m, g in grids.items() if g is not None}

    def _rope_index(self, input_ids, *args, **kwargs):
        """get_rope_index for prompts trimmed by prepare_inputs: the model's own method on the unpruned
        layout; placeholders take provisional positions (their run's last ones) until the language-model
        hook of the pass that encodes the media puts in the kept tokens' own."""
        original = type(self._inner).get_rope_index
        named = inspect.signature(original).bind(self._inner, input_ids, *args, **kwargs).arguments
        named.pop("self")
        extra = named.pop("kwargs", {})
        return trimmed_rope_index(original.__get__(self._inner), {**named, **extra}, self.token_ids,
                                  self._runs_by_modality({**named, **extra}), kept=None)

    def _on_model_call(self, module, args, kwargs) -> None:
        names = list(inspect.signature(type(module).forward).parameters)[1:]
        self._call = {**dict(zip(names, args)), **kwargs}

    def _on_language_model(self, module, args, kwargs):
        """Puts the kept tokens' own positions into the language model's position_ids of a prompt pass.
        The media may have been encoded in this pass or before it (generate() encodes before prefill and
        passes mm_encoder_outputs), so the latest encoding of each modality is used."""
        call, position_ids = self._call, kwargs.get("position_ids")
        ids, types = call.get("input_ids"), call.get("mm_token_type_ids")
        if ids is None or types is None or position_ids is None:
            return None  # embeddings only, or the model itself gives no M-RoPE positions
        if all(call.get(name) is None for name in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs")):
            return None  # no media in this pass (a decoding step may still hold a generated placeholder id)
        mask = call.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        present = [m for m, token in self.token_ids.items() if bool(((ids == token) & valid).any())]
        if not present:
            return None
        missing = [m for m in present if m not in self._encoded]
        if missing:
            raise ValueError(f"the prompt holds {missing[0]} placeholders but FoPru has encoded no {missing[0]}: "
                             "pass pixel values (or FoPru's own encoder outputs) with the prompt")
        named = {"input_ids": ids, "mm_token_type_ids": types, "attention_mask": mask,
                 "second_per_grid_ts": call.get("second_per_grid_ts")}
        for m in present:
            named[f"{m}_grid_thw"] = self._encoded[m][0]
        runs = {m: self.selection_runs(self._encoded[m][0], m) for m in present}
        kept = {m: self._encoded[m][1] for m in present}
        original = type(self._inner).get_rope_index.__get__(self._inner)
        positions, _ = trimmed_rope_index(original, named, self.token_ids, runs, kept)
        position_ids = position_ids.clone()
        position_ids[-3:] = positions.to(position_ids.device)
        return args, {**kwargs, "position_ids": position_ids}

    # Prompts ---------------------------------------------------------------------------------------

    def image_token_counts(self, image_grid_thw=None, video_grid_thw=None) -> dict[str, list[tuple[int, int]]]:
        """Per modality, (placeholders, kept) of every run in prompt order (Qwen3-VL videos: per frame)."""
        runs = self._runs_by_modality({"image_grid_thw": image_grid_thw, "video_grid_thw": video_grid_thw})
        return {m: [(r.n, r.keep) for r in rs] for m, rs in runs.items()}

    def prepare_inputs(self, inputs: Mapping, padding_side: str = "left") -> dict:
        """Tokenised inputs with each image's / video's placeholder run cut to its kept count.

        inputs: the processor's output (input_ids (B, T), attention_mask, mm_token_type_ids, pixel_values,
        image_grid_thw, pixel_values_videos, video_grid_thw, ...). mm_token_type_ids is added from the
        placeholder ids when missing (the model needs it for M-RoPE). Every (B, T) tensor is compacted
        alike and re-padded on `padding_side` ('left' for generate()); the rest passes through.
        """
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        inputs = dict(inputs)
        if inputs.get("mm_token_type_ids") is None:
            image, video = ids == self.token_ids["image"], ids == self.token_ids["video"]
            inputs["mm_token_type_ids"] = image.int() + 2 * video.int()
        kept = valid
        for modality, runs in self._runs_by_modality(inputs).items():
            kept = kept & keep_placeholder_runs(ids, valid, self.token_ids[modality], [r.n for r in runs],
                                                [r.keep for r in runs])
        return compact_inputs(inputs, kept, self.pad_token_id, padding_side)

    def remove(self) -> None:
        """Removes the hooks and the method overrides: the model is stock again."""
        for name in ("get_image_features", "get_video_features", "get_rope_index"):
            del self._inner.__dict__[name]
        for hook in self._hooks:
            hook.remove()
        self.capture.remove()


def kept_per_media(runs: list[Run], per_media: list[int]) -> list[int]:
    """Kept counts per media (a Qwen3-VL video's frames summed) from the runs and the media sizes
    (merged tokens per media item)."""
    out, i = [], 0
    for n in per_media:
        total = 0
        while n > 0:
            n -= runs[i].n
            total += runs[i].keep
            i += 1
        out.append(total)
    return out


def _window_to_raster(visual: nn.Module, grid_thw) -> torch.Tensor:
    """Qwen2.5-VL: the permutation taking merged tokens from encoder (window) order to raster order,
    the model's own reverse of its window index."""
    get = getattr(visual, "get_window_index", None)
    if get is not None:
        window_index = get(grid_thw)[0]
    else:
        get = getattr(sys.modules[type(visual).__module__], "get_vision_window_index", None)
        if get is None:
            raise ValueError("found no Qwen2.5-VL window index function: unsupported transformers version")
        window_index = get(grid_thw, visual.spatial_merge_size, visual.window_size, visual.patch_size)[0]
    return raster_order(window_index)


def raster_order(window_index: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL: window_index (T,) (the encoder's merged-token order: window_index[j] is the raster index
    of the j-th merged token the encoder sees) -> the permutation taking per-token values from encoder
    order to raster order (values[raster_order(window_index)])."""
    return torch.argsort(window_index)


def trimmed_rope_index(rope_index, named: dict, token_ids: dict[str, int], runs: dict[str, list[Run]], kept):
    """(positions (3, B, T), deltas (B, 1)) of a prompt whose placeholder runs hold `keep` tokens, from
    `rope_index` (the model's get_rope_index) run on the prompt with every run restored to its n tokens.

    named: get_rope_index's arguments (input_ids (B, T), mm_token_type_ids, attention_mask, grids, ...).
    kept: None, or per modality the kept local indices of each run. Text tokens take their positions in
    the restored prompt; a run's placeholders take its positions at the kept indices (kept=None: its last
    `keep`, so the prompt's last token, and with it generation, continues as in the unpruned model).
    Deltas are the restored prompt's, shifted by the tokens each row lost.
    """
    ids = named.pop("input_ids")
    mask = named.get("attention_mask")
    valid = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    b, t = ids.shape
    repeats = torch.ones(b * t, dtype=torch.int64, device=ids.device)
    fills = []  # (flat trimmed positions of a run's placeholders, its kept local indices)
    for modality, modality_runs in runs.items():
        where = ((ids == token_ids[modality]) & valid).reshape(-1).nonzero().flatten()
        bounds = [0, *torch.tensor([r.keep for r in modality_runs]).cumsum(0).tolist()]
        if where.numel() != bounds[-1]:
            raise ValueError(
                f"the prompt holds {where.numel()} {modality} placeholders where FoPru keeps {bounds[-1]}: pass the "
                "processor's inputs through handle.prepare_inputs"
            )
        for i, run in enumerate(modality_runs):
            span = where[bounds[i]:bounds[i + 1]]
            repeats[span[-1]] += run.n - run.keep  # the restored tokens follow the run's last placeholder
            local = kept[modality][i] if kept is not None else torch.arange(run.n - run.keep, run.n)
            fills.append((span, local.to(ids.device)))
    repeats = repeats.view(b, t)
    lengths = repeats.sum(dim=1)
    width = int(lengths.max()) if b else 0
    offset = width - lengths  # rows of the restored prompt are left-padded to one width
    column = offset[:, None] + repeats.cumsum(dim=1) - repeats  # each trimmed token's first restored column
    restored = {}
    for name, fill in (("input_ids", 0), ("mm_token_type_ids", 0), ("attention_mask", 0)):
        source = valid.long() if name == "attention_mask" else (ids if name == "input_ids" else named.get(name))
        if source is None:
            continue
        out = source.new_full((b, width), fill)
        for row in range(b):
            out[row, int(offset[row]):] = torch.repeat_interleave(source[row], repeats[row])
        restored[name] = out
    positions, deltas = rope_index(restored.pop("input_ids"), **{**named, **restored})
    source = column.clone().view(-1)
    for span, local in fills:
        source[span] = column.view(-1)[span[0]] + local  # the run starts at its first placeholder's column
    trimmed = positions.gather(2, source.view(b, t)[None].expand(3, -1, -1))
    return trimmed, deltas + (lengths - t)[:, None]  # each row's next token continues where the restored one does


def apply_fopru(model: nn.Module, keep: int | None = None, *, ratio: float | None = None, strategy: str = "rank",
                score: str = "focal", kind: str = "logit", layer: int | None = None,
                backend: str = "auto") -> FoPruQwenVL:
    """Makes a Qwen2-VL / Qwen2.5-VL / Qwen3-VL model hand fewer visual tokens to its language model.

    keep: merged tokens kept per image (a video keeps keep per frame on average, min(keep * t, n) over
    its clip) or ratio in (0, 1] of every image's and video's merged tokens (retained_count); exactly one.
    strategy 'rank' | 'row' (whole rows of the merged grid), score 'focal' | 'received', kind 'logit'
    (FoPru's scaled logits) | 'prob'; layer: the vision block scored (default the last full-attention
    block). Returns the handle; pass the processor's inputs through `handle.prepare_inputs` before
    `model.generate(**...)`. Raises ValueError naming the argument for a bad setting, or if FoPru is
    already applied.
    """
    return apply_settings(model, settings_from_arguments(keep=keep, ratio=ratio, strategy=strategy, score=score,
                                                         kind=kind, layer=layer, backend=backend))


def apply_settings(model: nn.Module, settings: FoPruSettings) -> FoPruQwenVL:
    """apply_fopru with settings already parsed (`integrations.settings`)."""
    inner = qwen_vl_model(model)
    if inner is None:
        raise ValueError(f"expected a Qwen2-VL, Qwen2.5-VL or Qwen3-VL model, got {type(model).__name__}")
    if getattr(inner, "_fopru", None) is not None:
        raise ValueError("FoPru is already applied to this model; call remove_fopru(model) first")
    inner._fopru = FoPruQwenVL(inner, settings)
    return inner._fopru


def remove_fopru(model: nn.Module) -> None:
    """Undoes apply_fopru: the model is stock again. A no-op if FoPru is not applied."""
    inner = qwen_vl_model(model)
    handle = getattr(inner, "_fopru", None)
    if handle is not None:
        handle.remove()
        del inner._fopru
