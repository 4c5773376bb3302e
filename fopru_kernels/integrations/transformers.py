"""FoPru for Hugging Face transformers: CLIP / SigLIP vision towers and LLaVA.

The significance comes from the queries and keys of one encoder layer, captured with forward hooks
on that layer's `self_attn.q_proj` / `self_attn.k_proj` Linear modules (their outputs are
(B, S, H * d), i.e. `layout="bshd"` once the last dim is split into heads). The tower keeps its
attention implementation (SDPA, FlashAttention) and never runs with `output_attentions`, so no
`S x S` attention map is requested or materialised by the tower; `fopru_kernels.prune_tokens_qk`
scores the tokens from q and k (SPEC.md "Significance from q and k").

Defaults follow the paper: FoPru's own significance, `score="focal"` (the column or row means,
whichever has the larger variance) of the scaled logits (`kind="logit"`, no softmax) of that
layer; `score="cls"` (CLIP's CLS row, FasterVLM / VisionZip style) and `kind="prob"` stay options.
The defaults need no CLS token, so SigLIP towers work with them as they are. `backend` takes the
op's values ('auto' follows FOPRU_BACKEND) and is checked when the adapter is applied.

Which layer: FoPru scores with the attention inside the layer whose *output* feeds the projector.
`layer` counts like transformers' `hidden_states` and LLaVA's `vision_feature_layer`:
`hidden_states[0]` is the embedding output and `hidden_states[i]` the output of
`encoder.layers[i - 1]`, so `layer=-2` (LLaVA-1.5) scores the attention of `encoder.layers[-2]`.

Entry points:
- `QKCapture(vision_model, layer)`: the hooks alone (context manager, or `.remove()`).
- `prune_vision_features(vision_model, pixel_values, keep, ...)`: one tower pass -> pruned features.
- `apply_fopru(model, keep | ratio, ...)` / `remove_fopru(model)`: LLaVA (`LlavaForConditionalGeneration`,
  `LlavaModel`) prunes its image features before the projector; LLaVA-NeXT
  (`LlavaNextForConditionalGeneration`, `LlavaNextModel`) prunes each image's packed feature sequence
  after `pack_image_features`, in one `prune_tokens_varlen` call. The handle's `prepare_inputs`
  shortens the image placeholders of tokenised inputs to the kept count per image for `generate()`.
  Qwen2-VL, Qwen2.5-VL and Qwen3-VL models are handed to `integrations.qwen_vl` (one entry point).
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..backends import check_backend
from ..ops import prune_tokens_qk, prune_tokens_varlen, significance_qk
from ..reference import retained_count


def _encoder_layers(vision_model: nn.Module) -> nn.ModuleList:
    """encoder.layers of a CLIP / SigLIP vision tower (or of a wrapper holding it as .vision_model)."""
    tower = getattr(vision_model, "vision_model", vision_model)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(
        hasattr(getattr(block, "self_attn", None), name) for block in layers for name in ("q_proj", "k_proj", "scale")
    ):
        raise ValueError(
            "vision_model must be a CLIP or SigLIP vision tower (e.g. CLIPVisionModel, SiglipVisionModel) whose "
            f"encoder.layers[i].self_attn has q_proj, k_proj and scale; got {type(vision_model).__name__}"
        )
    return layers


def _tower(vision_model: nn.Module) -> nn.Module:
    return getattr(vision_model, "vision_model", vision_model)


def _layer_index(num_layers: int, layer: int) -> int:
    """encoder.layers index of the layer whose output is hidden_states[layer]."""
    states = num_layers + 1  # hidden_states[0] is the embedding output, produced by no attention
    if not isinstance(layer, int) or not -states < layer < states or layer % states == 0:
        raise ValueError(
            f"layer must index hidden_states[1:] of a {num_layers}-layer tower: an int in [1, {num_layers}] or "
            f"[-{num_layers}, -1] (hidden_states[0] is the embedding output, scored by no attention), got {layer}"
        )
    return layer % states - 1


def num_prefix_tokens(vision_model: nn.Module) -> int:
    """Leading non-patch tokens of the tower's sequence: 1 for CLIP's CLS token, 0 for SigLIP."""
    return 1 if hasattr(_tower(vision_model).embeddings, "class_embedding") else 0


def patch_grid(vision_model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the patch grid for pixel_values (B, C, H, W)."""
    patch = _tower(vision_model).config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


class QKCapture:
    """Forward hooks recording q, k and the output of the encoder layer that yields hidden_states[layer].

    After each tower forward: `q`, `k` are (B, S, H, d) views of the q_proj / k_proj outputs (pass
    `layout="bshd"`), `hidden` is the layer output (B, S, D) (the tensor transformers returns as
    hidden_states[layer]), `scale` the attention's softmax scale. Each forward overwrites them;
    `clear()` drops them. Use as a context manager or call `remove()`.
    """

    def __init__(self, vision_model: nn.Module, layer: int = -2):
        layers = _encoder_layers(vision_model)
        block = layers[_layer_index(len(layers), layer)]
        attn = block.self_attn
        self.layer = layer
        self.scale = float(attn.scale)
        self.head_dim = attn.head_dim
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.hidden: torch.Tensor | None = None
        self._handles = [
            attn.q_proj.register_forward_hook(self._on_q),
            attn.k_proj.register_forward_hook(self._on_k),
            block.register_forward_hook(self._on_layer_output),
        ]

    # q_proj / k_proj return (B, S, H * d); splitting the last dim is a view: (B, S, H, d), 'bshd'.
    def _on_q(self, module, args, out) -> None:
        self.q = out.unflatten(-1, (-1, self.head_dim))

    def _on_k(self, module, args, out) -> None:
        self.k = out.unflatten(-1, (-1, self.head_dim))

    def _on_layer_output(self, module, args, out) -> None:
        self.hidden = out[0] if isinstance(out, tuple) else out  # older transformers return a tuple

    def clear(self) -> None:
        """Drops the recorded tensors (they hold 3 x B x S x D of memory)."""
        self.q = self.k = self.hidden = None

    def remove(self) -> None:
        """Removes the hooks and drops the recorded tensors."""
        for handle in self._handles:
            handle.remove()
        self.clear()

    def __enter__(self) -> QKCapture:
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:  # keep q/k/hidden readable after the with block
            handle.remove()


def prune_vision_features(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    keep: int,
    *,
    strategy: str = "rank",
    score: str = "focal",
    kind: str = "logit",
    layer: int = -2,
    num_prefix: int | None = None,
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a CLIP / SigLIP vision tower once and keeps `keep` patch features of hidden_states[layer].

    pixel_values: (B, C, H, W). The features are the layer output without its prefix tokens (as LLaVA's
    'default' select strategy drops CLS), scored with that layer's q and k. score: 'focal' (FoPru's),
    'received' or 'cls' (CLIP only); kind: 'logit' (the scaled logits, FoPru's) or 'prob' (softmax
    probabilities). num_prefix: None -> 1 with a CLS token (CLIP), 0 without (SigLIP). grid: None ->
    the patch grid of pixel_values. backend: as in fopru_kernels.prune_tokens_qk.
    Returns pruned (B, keep, D) in the tower's dtype and idx (B, keep) int64, ascending patch indices.
    Runs under torch.no_grad (the op is inference-only).
    """
    check_backend(backend)
    p = num_prefix_tokens(vision_model) if num_prefix is None else num_prefix
    with torch.no_grad(), QKCapture(vision_model, layer) as cap:
        vision_model(pixel_values=pixel_values)
    return prune_tokens_qk(
        cap.hidden[:, p:],
        cap.q,
        cap.k,
        keep,
        strategy=strategy,
        score=score,
        num_prefix=p,
        grid=patch_grid(vision_model, pixel_values) if grid is None else grid,
        scale=cap.scale,
        kind=kind,
        layout="bshd",
        backend=backend,
    )


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

    def __init__(
        self, inner: nn.Module, keep: int | None, ratio: float | None, strategy: str, score: str, kind: str,
        backend: str,
    ):
        self.num_prefix = _scored_prefix(inner)
        tower = _tower(inner.vision_tower)
        self.tokens_per_image = tower.embeddings.num_patches
        if ratio is not None:
            side = tower.config.image_size // tower.config.patch_size
            keep = retained_count(self.tokens_per_image, ratio, strategy=strategy, grid=(side, side))
        if not 0 <= keep <= self.tokens_per_image:
            raise ValueError(f"keep must be in [0, {self.tokens_per_image}] (patches per image), got {keep}")
        self.keep, self.strategy, self.score, self.kind, self.backend = keep, strategy, score, kind, backend
        self.image_token_id = inner.config.image_token_id
        self.pad_token_id = inner.config.text_config.pad_token_id or 0
        self.last_idx: torch.Tensor | None = None
        self.capture = QKCapture(inner.vision_tower, inner.config.vision_feature_layer)
        self._projector_hook = inner.multi_modal_projector.register_forward_pre_hook(self._prune)

    def _prune(self, module, args):
        (features,) = args
        cap, p = self.capture, self.num_prefix
        _check_scored_features(features, cap, p)
        pruned, idx = prune_tokens_qk(
            features, cap.q, cap.k, self.keep, strategy=self.strategy, score=self.score, num_prefix=p,
            scale=cap.scale, kind=self.kind, layout="bshd", backend=self.backend,
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


def _scored_prefix(inner: nn.Module) -> int:
    """Prefix tokens of a LLaVA(-NeXT) model's tower, checked against what its feature selection drops."""
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
    return prefix


def _check_scored_features(features: torch.Tensor, cap: QKCapture, num_prefix: int) -> None:
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


# Significance of LLaVA-NeXT's image_newline tokens: above any fx sum (|sig| <= H * 2^36 for H heads),
# so 'rank' keeps every newline before any patch token; far from the int64 limits so no kernel's key
# transform can overflow.
NEWLINE_SIG = 2**62
_NEWLINE_SOURCE = -1  # the source index packed in place of a newline (no crop token)


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

    def __init__(
        self, inner: nn.Module, keep: int | None, ratio: float | None, strategy: str, score: str, kind: str,
        backend: str,
    ):
        if strategy != "rank":
            raise ValueError(
                "LLaVA-NeXT supports strategy='rank' only (its packed image sequence is no single grid), "
                f"got {strategy!r}"
            )
        if keep is not None and keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        if ratio is not None:
            retained_count(0, ratio)  # checks ratio now rather than at the first image
        self.num_prefix = _scored_prefix(inner)
        self.keep, self.ratio, self.score, self.kind, self.backend = keep, ratio, score, kind, backend
        self.config = inner.config
        self.image_token_id = inner.config.image_token_id
        self.pad_token_id = inner.config.text_config.pad_token_id or 0
        self.tokens_per_crop = _tower(inner.vision_tower).embeddings.num_patches
        self.last_idx: torch.Tensor | None = None
        self.last_cu_seqlens: torch.Tensor | None = None
        self.last_source: torch.Tensor | None = None
        self._inner = inner
        self._pack = inner.pack_image_features  # the class's bound method
        self.capture = QKCapture(inner.vision_tower, inner.config.vision_feature_layer)
        self._projector_hook = inner.multi_modal_projector.register_forward_pre_hook(self._check_projector_input)
        inner.pack_image_features = self._pack_and_prune  # instance attribute: shadows the method

    def _check_projector_input(self, module, args) -> None:
        _check_scored_features(args[0], self.capture, self.num_prefix)

    def _sources(self, crops: list[int], image_sizes, select_strategy: str, newline: bool) -> list[torch.Tensor]:
        """Per image, (n_i,) int64 on the CPU: the crop token (crop * N + patch) each packed token comes from,
        -1 for a newline. Packs indices with the model's own pack_image_features, so the layout is its."""
        n = self.tokens_per_crop
        source = torch.arange(sum(crops) * n, dtype=torch.int64).view(sum(crops), n, 1)
        sentinel = torch.tensor([_NEWLINE_SOURCE]) if newline else None
        packed, _ = self._pack(list(source.split(crops)), image_sizes, select_strategy, image_newline=sentinel)
        return [p.reshape(-1) for p in packed]

    def _budget(self, sources: list[torch.Tensor]) -> list[int]:
        """Tokens kept per image: all newlines, plus min(keep, patches) or retained_count(patches, ratio)."""
        out = []
        for src in sources:
            newlines = int((src == _NEWLINE_SOURCE).sum())
            patches = src.numel() - newlines
            kept = min(self.keep, patches) if self.ratio is None else retained_count(patches, self.ratio)
            out.append(newlines + kept)
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
            cap.q, cap.k, score=self.score, num_prefix=self.num_prefix, scale=cap.scale, kind=self.kind, layout="bshd",
            backend=self.backend,
        )  # (num_crops, N): the _check_projector_input hook has tied q / k to these features
        cap.clear()
        sources = self._sources(crops, image_sizes, vision_feature_select_strategy, image_newline is not None)
        keep = self._budget(sources)
        device = packed[0].device
        source = torch.cat(sources).to(device)
        packed_sig = torch.where(source == _NEWLINE_SOURCE, NEWLINE_SIG, sig.reshape(-1)[source.clamp(min=0)])
        lengths = torch.tensor([0] + [s.numel() for s in sources], dtype=torch.int64)
        cu_seqlens = lengths.cumsum(0).to(device)
        pruned, idx, cu_out = prune_tokens_varlen(
            torch.cat(packed), packed_sig, cu_seqlens, keep, strategy="rank", backend=self.backend
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


def keep_placeholder_runs(
    input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int, lengths: list[int], keep: list[int]
) -> torch.Tensor:
    """(B, T) bool: the valid tokens to keep, all but the last lengths[i] - keep[i] placeholders of image i.

    Image i owns the placeholders lengths[0] + ... + lengths[i-1] onwards, counted over the valid
    placeholders of the whole batch in row-major order (how the model's masked_scatter fills them);
    every row must hold whole images.
    """
    image = (input_ids == image_token_id) & valid
    bounds = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    row_ends = image.sum(dim=1).cumsum(0).cpu()
    if not bool(torch.isin(row_ends, bounds).all()) or (row_ends.numel() and int(row_ends[-1]) != int(bounds[-1])):
        raise ValueError(
            f"the image placeholders (id {image_token_id}) must be runs of {lengths} tokens, one per image, "
            f"whole images per row; got {image.sum(dim=1).tolist()} per row"
        )
    if not lengths:
        return valid
    bounds = bounds.to(input_ids.device)
    rank = image.reshape(-1).cumsum(0) - 1  # rank of each placeholder over the batch, row-major
    owner = torch.searchsorted(bounds[1:], rank.clamp(min=0), right=True).clamp(max=len(lengths) - 1)
    within = rank - bounds[owner]
    limit = torch.tensor(keep, dtype=torch.int64, device=input_ids.device)[owner]
    return valid & (~image | (within < limit).view_as(image))


def keep_placeholders(
    input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int, tokens_per_image: int, keep: int
) -> torch.Tensor:
    """(B, T) bool: the valid tokens to keep, all but the last N - keep placeholders of each image.

    The i-th image of a row owns that row's placeholders i * N ... (i + 1) * N - 1 (counted over the
    row, so images placed back to back are told apart), N = tokens_per_image.
    """
    image = (input_ids == image_token_id) & valid
    counts = image.sum(dim=1)
    if bool((counts % tokens_per_image).any()):
        raise ValueError(
            f"every row must hold a multiple of {tokens_per_image} image placeholder tokens (id {image_token_id}), "
            f"one run of {tokens_per_image} per image; got {counts.tolist()}"
        )
    rank_in_image = (image.cumsum(dim=1) - 1) % tokens_per_image
    return valid & (~image | (rank_in_image < keep))


def compact_inputs(inputs: Mapping, kept: torch.Tensor, pad_token_id: int, padding_side: str = "left") -> dict:
    """Every (B, T) tensor of `inputs` (input_ids, attention_mask, ...) compacted to the kept
    positions and re-padded (input_ids with pad_token_id, the rest with 0); others pass through."""
    shape = inputs["input_ids"].shape
    out = dict(inputs)
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            pad = pad_token_id if name == "input_ids" else 0
            out[name] = compact_rows(value, kept, pad, padding_side)
    return out


def compact_rows(values: torch.Tensor, kept: torch.Tensor, pad_value: int, padding_side: str = "left") -> torch.Tensor:
    """values (B, T) -> (B, T') holding each row's `kept` entries in order, padded with pad_value."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = kept.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = values.new_full((values.shape[0], width), pad_value)
    column = kept.cumsum(dim=1) - 1
    if padding_side == "left":
        column += (width - lengths)[:, None]
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(kept)
    out[rows[kept], column[kept]] = values[kept]
    return out


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
    `integrations.qwen_vl.apply_fopru` (see there; score / kind default to 'focal' / 'logit', `layer`
    picks the scored vision block). Give exactly one of keep (tokens per image) or ratio (in [0, 1], via
    `retained_count`). LLaVA keeps `keep` of its N patches per image; LLaVA-NeXT keeps every image_newline
    token plus min(keep, patches_i) or retained_count(patches_i, ratio) of image i's packed patch tokens
    (see FoPruLlavaNext).
    strategy 'rank' | 'row' (LLaVA only; row needs keep to be a multiple of the grid width), score
    'focal' (FoPru's, the default) | 'received' | 'cls' (CLIP), kind 'logit' (FoPru's, the default) |
    'prob' (SPEC.md), backend 'auto' (FOPRU_BACKEND's choice) | 'cpu' | 'cuda' | 'triton' | 'reference'.
    Returns the handle; shorten the processor's placeholders with `handle.prepare_inputs(inputs)`
    before `model.generate(**...)` or `model(**...)`. Raises ValueError if FoPru is already applied
    or backend is not one of those values.
    """
    from transformers import LlavaNextModel

    from . import qwen_vl

    check_backend(backend)
    if qwen_vl.qwen_vl_model(model) is not None:
        return qwen_vl.apply_fopru(model, keep, ratio=ratio, strategy=strategy, score=score, kind=kind, layer=layer,
                                   backend=backend)
    if layer is not None:
        raise ValueError("layer is a Qwen-VL setting; LLaVA scores the layer of config.vision_feature_layer")
    inner = _llava_model(model)
    if (keep is None) == (ratio is None):
        raise ValueError(f"give exactly one of keep or ratio, got keep={keep}, ratio={ratio}")
    if getattr(inner, "_fopru", None) is not None:
        raise ValueError("FoPru is already applied to this model; call remove_fopru(model) first")
    handle_cls = FoPruLlavaNext if isinstance(inner, LlavaNextModel) else FoPruLlava
    inner._fopru = handle_cls(inner, keep, ratio, strategy, score or "cls", kind or "prob", backend)
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
