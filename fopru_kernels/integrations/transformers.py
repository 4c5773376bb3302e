"""FoPru for Hugging Face transformers: CLIP / SigLIP vision towers and LLaVA.

The significance comes from the queries and keys of one encoder layer, captured with forward hooks
on that layer's `self_attn.q_proj` / `self_attn.k_proj` Linear modules (their outputs are
(B, S, H * d), i.e. `layout="bshd"` once the last dim is split into heads). The tower keeps its
attention implementation (SDPA, FlashAttention) and never runs with `output_attentions`, so no
`S x S` attention map is requested or materialised by the tower; `fopru_kernels.prune_tokens_qk`
scores the tokens from q and k (SPEC.md "Significance from q and k").

Which layer: FoPru scores with the attention inside the layer whose *output* feeds the projector.
`layer` counts like transformers' `hidden_states` and LLaVA's `vision_feature_layer`:
`hidden_states[0]` is the embedding output and `hidden_states[i]` the output of
`encoder.layers[i - 1]`, so `layer=-2` (LLaVA-1.5) scores the attention of `encoder.layers[-2]`.

Entry points:
- `QKCapture(vision_model, layer)`: the hooks alone (context manager, or `.remove()`).
- `prune_vision_features(vision_model, pixel_values, keep, ...)`: one tower pass -> pruned features.
- `apply_fopru(model, keep, ...)` / `remove_fopru(model)`: LLaVA (`LlavaForConditionalGeneration`,
  `LlavaModel`) prunes its image features before the projector; `FoPruLlava.prepare_inputs`
  shortens the image placeholders of tokenised inputs to `keep` per image for `generate()`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..ops import prune_tokens_qk


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
    strategy: str = "rank",
    score: str = "cls",
    kind: str = "prob",
    layer: int = -2,
    num_prefix: int | None = None,
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs a CLIP / SigLIP vision tower once and keeps `keep` patch features of hidden_states[layer].

    pixel_values: (B, C, H, W). The features are the layer output without its prefix tokens (as LLaVA's
    'default' select strategy drops CLS), scored with that layer's q and k. score: 'cls' (CLIP only),
    'received' or 'focal'; kind: 'prob' (softmax probabilities) or 'logit'. num_prefix: None -> 1 with
    a CLS token (CLIP), 0 without (SigLIP). grid: None -> the patch grid of pixel_values.
    Returns pruned (B, keep, D) in the tower's dtype and idx (B, keep) int64, ascending patch indices.
    Runs under torch.no_grad (the op is inference-only).
    """
    p = num_prefix_tokens(vision_model) if num_prefix is None else num_prefix
    with torch.no_grad(), QKCapture(vision_model, layer) as cap:
        vision_model(pixel_values=pixel_values)
    return prune_tokens_qk(
        cap.hidden[:, p:],
        cap.q,
        cap.k,
        keep,
        strategy,
        score,
        p,
        patch_grid(vision_model, pixel_values) if grid is None else grid,
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

    def __init__(self, inner: nn.Module, keep: int, strategy: str, score: str, kind: str, backend: str):
        config = inner.config
        if not isinstance(config.vision_feature_layer, int):
            raise ValueError(
                "apply_fopru needs one vision_feature_layer (FoPru scores one layer's attention), got "
                f"{config.vision_feature_layer}"
            )
        tower = inner.vision_tower
        self.num_prefix = num_prefix_tokens(tower)
        drops = 1 if config.vision_feature_select_strategy == "default" else 0
        if drops != self.num_prefix:
            raise ValueError(
                f"vision_feature_select_strategy='{config.vision_feature_select_strategy}' drops {drops} leading "
                f"token(s) but the {type(tower).__name__} tower has {self.num_prefix} prefix token(s); FoPru prunes "
                "patch tokens only ('default' for CLIP towers, 'full' for SigLIP)"
            )
        self.tokens_per_image = _tower(tower).embeddings.num_patches
        if not 0 <= keep <= self.tokens_per_image:
            raise ValueError(f"keep must be in [0, {self.tokens_per_image}] (patches per image), got {keep}")
        self.keep, self.strategy, self.score, self.kind, self.backend = keep, strategy, score, kind, backend
        self.image_token_id = config.image_token_id
        self.pad_token_id = config.text_config.pad_token_id or 0
        self.last_idx: torch.Tensor | None = None
        self.capture = QKCapture(tower, config.vision_feature_layer)
        self._projector_hook = inner.multi_modal_projector.register_forward_pre_hook(self._prune)

    def _prune(self, module, args):
        (features,) = args
        cap, p = self.capture, self.num_prefix
        hidden = cap.hidden
        # The projector must be fed hidden_states[vision_feature_layer][:, P:] of this very pass; a call
        # that overrides vision_feature_layer (or strategy) would otherwise get another layer's scores.
        if (
            hidden is None
            or features.shape != hidden[:, p:].shape
            or features.data_ptr() != hidden[:, p:].data_ptr()
        ):
            raise ValueError(
                f"FoPru scores vision layer hidden_states[{cap.layer}] with its prefix of {p} token(s) dropped, "
                "but the projector got other features; do not override vision_feature_layer / "
                "vision_feature_select_strategy in the call, or re-apply FoPru"
            )
        pruned, idx = prune_tokens_qk(
            features, cap.q, cap.k, self.keep, self.strategy, self.score, p, None,
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
        out = dict(inputs)
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor) and value.shape == ids.shape:
                pad = self.pad_token_id if name == "input_ids" else 0
                out[name] = compact_rows(value, kept, pad, padding_side)
        return out

    def remove(self) -> None:
        """Removes the hooks: the model computes all N image features again."""
        self._projector_hook.remove()
        self.capture.remove()


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
    """The LlavaModel of a LlavaForConditionalGeneration (or the LlavaModel itself)."""
    from transformers import LlavaForConditionalGeneration, LlavaModel

    inner = model.model if isinstance(model, LlavaForConditionalGeneration) else model
    if not isinstance(inner, LlavaModel):
        raise ValueError(
            "FoPru for transformers supports LlavaForConditionalGeneration and LlavaModel, got "
            f"{type(model).__name__} (not LLaVA-NeXT: it packs anyres crops into a grid after the projector, "
            "so its features cannot be pruned before it)"
        )
    return inner


def apply_fopru(
    model: nn.Module,
    keep: int,
    strategy: str = "rank",
    score: str = "cls",
    kind: str = "prob",
    backend: str = "auto",
) -> FoPruLlava:
    """Makes a LLaVA model hand `keep` image tokens per image to its language model.

    model: LlavaForConditionalGeneration or LlavaModel with a CLIP or SigLIP vision tower and one int
    vision_feature_layer. strategy 'rank' | 'row' (row needs keep to be a multiple of the grid width),
    score 'cls' (CLIP) | 'received' | 'focal', kind 'prob' | 'logit' (SPEC.md). Returns the `FoPruLlava`
    handle; shorten the processor's placeholders with `handle.prepare_inputs(inputs)` before
    `model.generate(**...)` or `model(**...)`. Raises ValueError if FoPru is already applied.
    """
    inner = _llava_model(model)
    if getattr(inner, "_fopru", None) is not None:
        raise ValueError("FoPru is already applied to this model; call remove_fopru(model) first")
    inner._fopru = FoPruLlava(inner, keep, strategy, score, kind, backend)
    return inner._fopru


def remove_fopru(model: nn.Module) -> None:
    """Undoes apply_fopru: the model keeps all image tokens again. A no-op if FoPru is not applied."""
    inner = _llava_model(model)
    handle = getattr(inner, "_fopru", None)
    if handle is not None:
        handle.remove()
        del inner._fopru
