"""What every vLLM model family of the plugin shares: the prune plan, q/k capture on vLLM's fused
qkv projection, and significance across tensor-parallel ranks.

Tensor parallelism: vLLM splits an encoder layer's heads over the TP ranks (`QKVParallelLinear`),
so each rank sees q and k of its own heads only. Every significance is an int64 sum over heads of
fixed-point values (docs/SPEC.md), so each rank computes its partial sums and one int64 all-reduce
over the TP group gives every rank the exact TP = 1 sums: the same kept tokens on every rank. For
`focal` the column and the row sums are both reduced before the choice between them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

import fopru_kernels as fopru

from ...reference import gather_rows
from ..settings import FoPruSettings


@dataclass(frozen=True)
class PrunePlan:
    """A model's FoPru settings resolved against its config: `keep` tokens of each image's
    `patches` (grid `grid`), scored in the built encoder layer `layer_index`, whose sequence starts
    with `num_prefix` non-patch tokens (CLIP's CLS). For models whose images vary in size (LLaVA-NeXT)
    these describe one crop, and `settings.budget` gives each image's count."""

    settings: FoPruSettings
    keep: int
    patches: int
    grid: tuple[int, int]
    num_prefix: int
    layer_index: int


def scored_layer_index(layer: int, num_layers: int, built: int) -> int:
    """Index into the tower's built encoder layers of the layer whose output is hidden_states[layer].

    num_layers: the tower's layers in its config; built: how many vLLM builds (it stops at the
    layer the model feeds to its projector). Raises ValueError naming `fopru.layer`.
    """
    index = layer % (num_layers + 1) - 1 if -num_layers <= layer <= num_layers else -1
    if layer == 0 or not 0 <= index < built:
        lowest = built - num_layers - 1
        raise ValueError(
            f"fopru.layer must name an attention layer vLLM builds for this model: an int in [1, {built}] or "
            f"[-{num_layers}, {lowest}] (counted like hidden_states of the {num_layers}-layer tower; layers after "
            f"the one the model feeds to its projector are not built), got {layer}"
        )
    return index


class QKVCapture:
    """Forward hook on a vLLM attention layer's fused `qkv_proj` (a QKVParallelLinear returning
    (qkv, bias)): after each forward, `q` and `k` are (B, S, H, d) views of this rank's heads
    (`layout="bshd"`); `scale` is the layer's softmax scale. `split` is True when tensor parallelism
    gave other heads to other ranks."""

    def __init__(self, qkv_proj: nn.Module, scale: float):
        self.heads, self.head_dim, self.scale = qkv_proj.num_heads, qkv_proj.head_size, scale
        if qkv_proj.num_kv_heads != self.heads:
            raise ValueError(
                f"FoPru scores q against k of the same heads; this layer has {self.heads} query and "
                f"{qkv_proj.num_kv_heads} key heads per rank"
            )
        self.split = self.heads != qkv_proj.total_num_heads
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self._handle = qkv_proj.register_forward_hook(self._on_qkv)

    def _on_qkv(self, module, args, out) -> None:
        qkv = out[0] if isinstance(out, tuple) else out
        width = self.heads * self.head_dim
        self.q = qkv[..., :width].unflatten(-1, (self.heads, self.head_dim))
        self.k = qkv[..., width:2 * width].unflatten(-1, (self.heads, self.head_dim))

    def take(self) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k of the latest forward; drops them (they hold 2 x B x S x D of memory)."""
        if self.q is None:
            raise RuntimeError("FoPru: the scored encoder layer did not run before its features were pruned")
        q, k, self.q, self.k = self.q, self.k, None, None
        return q, k

    def remove(self) -> None:
        self._handle.remove()
        self.q = self.k = None


def significance(
    q: torch.Tensor,
    k: torch.Tensor,
    plan: PrunePlan,
    scale: float,
    group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """(B, N) int64 significance of the layer's patch tokens from q, k (B, S, H, d) of this rank's heads.

    group: None when this rank holds every head; else the process group the heads are split over
    (vLLM's TP group): each rank's partial sums are all-reduced there (int64, exact) before the focal
    choice, so every rank gets the significance one rank with all heads computes.
    """
    s = plan.settings
    args = dict(score=s.score, num_prefix=plan.num_prefix, scale=scale, kind=s.kind, layout="bshd", backend=s.backend)
    if group is None:
        return fopru.significance_qk(q, k, **args)
    parts = fopru.significance_qk_parts(q, k, **args)
    torch.distributed.all_reduce(parts, group=group)
    return fopru.significance_from_parts(parts, backend=s.backend)


def prune_patches(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    plan: PrunePlan,
    scale: float,
    group: torch.distributed.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps plan.keep of each image's patch tokens, scored from the layer's q and k.

    tokens (B, N, D) patch features; q, k (B, S, H, d) of this rank's heads, S = num_prefix + N;
    group as in `significance`. Returns pruned (B, keep, D) and idx (B, keep) int64, the same on every rank.
    """
    s = plan.settings
    if group is None:  # one fused op
        return fopru.prune_tokens_qk(
            tokens, q, k, plan.keep, strategy=s.strategy, score=s.score, num_prefix=plan.num_prefix,
            grid=plan.grid, scale=scale, kind=s.kind, layout="bshd", backend=s.backend,
        )
    sig = significance(q, k, plan, scale, group)
    idx = fopru.select(sig, plan.keep, strategy=s.strategy, grid=plan.grid, backend=s.backend)
    return gather_rows(tokens, idx), idx


def check_device_backend(settings: FoPruSettings, device: torch.device) -> None:
    """Refuses at model construction a forced backend that cannot run on the model's device."""
    available = fopru.available_backends(device)
    if settings.backend != "auto" and settings.backend not in available:
        raise ValueError(
            f"fopru.backend={settings.backend!r} cannot run on {device} in this install; allowed here: "
            f"{', '.join(repr(b) for b in ['auto', *available])}"
        )


# Integers riding along embeddings as extra channels, exactly: each int64 becomes its 8 bytes, one
# channel each (0..255 is exact in float32, bfloat16 and float16). This lets vLLM's own code move
# them with the rows it moves (the data-parallel encoder's all-gather, the encoder cache, chunked
# prefill's row slices) without a second channel of communication.
BYTES = 8


def append_ints(rows: torch.Tensor, ints: torch.Tensor) -> torch.Tensor:
    """rows (R, D) float, ints (R, C) int64 -> (R, D + 8 C) in rows' dtype, ints as byte channels."""
    as_bytes = ints.contiguous().view(torch.uint8).view(ints.shape[0], -1)
    return torch.cat([rows, as_bytes.to(rows.dtype)], dim=1)


def split_ints(rows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of append_ints: (R, D + 8 count) -> rows (R, D), ints (R, count) int64."""
    width = BYTES * count
    values = rows[:, rows.shape[1] - width:].round().to(torch.uint8).contiguous()
    return rows[:, : rows.shape[1] - width], values.view(torch.int64).view(rows.shape[0], count)
