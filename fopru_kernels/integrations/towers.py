"""FoPru on Hugging Face CLIP / SigLIP vision towers: q/k capture on one encoder layer, and one tower
pass -> pruned features.

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
"""
from __future__ import annotations

import torch
from torch import nn

from ..backends import check_backend
from ..ops import prune_tokens_qk


def encoder_layers(vision_model: nn.Module) -> nn.ModuleList:
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


def vision_transformer(vision_model: nn.Module) -> nn.Module:
    """The tower itself: vision_model, or the CLIP / SigLIP transformer a ...VisionModel wrapper holds."""
    return getattr(vision_model, "vision_model", vision_model)


def layer_index(num_layers: int, layer: int) -> int:
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
    return 1 if hasattr(vision_transformer(vision_model).embeddings, "class_embedding") else 0


def patch_grid(vision_model: nn.Module, pixel_values: torch.Tensor) -> tuple[int, int]:
    """(rows, cols) of the patch grid for pixel_values (B, C, H, W)."""
    patch = vision_transformer(vision_model).config.patch_size
    return pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch


class QKCapture:
    """Forward hooks recording q, k and the output of the encoder layer that yields hidden_states[layer].

    After each tower forward: `q`, `k` are (B, S, H, d) views of the q_proj / k_proj outputs (pass
    `layout="bshd"`), `hidden` is the layer output (B, S, D) (the tensor transformers returns as
    hidden_states[layer]), `scale` the attention's softmax scale. Each forward overwrites them;
    `clear()` drops them. Use as a context manager or call `remove()`.
    """

    def __init__(self, vision_model: nn.Module, layer: int = -2):
        layers = encoder_layers(vision_model)
        block = layers[layer_index(len(layers), layer)]
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
