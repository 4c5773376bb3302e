"""The Python API of torch.ops.fopru.*: one function per op with keyword arguments and backend=,
plus which backends this install has (available_backends) and which one "auto" runs (default_backend).

registration.py registers the ops with the dispatcher when fopru_kernels is imported; backend="auto"
calls the dispatcher, a named backend calls that backend's kernel (after checking it can run here).
The names of registration.py that callers read (HAS_LIBRARY, SCHEMAS, ...) are imported here too.
"""
from __future__ import annotations

import os

import torch

from . import _checks, backends
from .registration import (
    CPU_KERNEL_OPS,
    CUDA_KERNEL_OPS,
    CXX_OPS,
    DISPATCH_KEYS,
    HAS_CUDA_KERNELS,
    HAS_LIBRARY,
    INSTALL,
    LIBRARY_ERROR,
    OPS,
    REFERENCE_KERNELS,
    REPLACED,
    SCHEMAS,
    SETTING,
)
from .triton.entry import ENTRY_POINTS as TRITON_ENTRY_POINTS
from .triton.entry import has_triton

BACKENDS = backends.BACKENDS


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this install (besides 'auto')."""
    dev = torch.device(device)
    out = ["reference"]
    if dev.type == "cpu" and HAS_LIBRARY:
        out.append("cpu")
    if dev.type == "cuda" and HAS_CUDA_KERNELS:
        out.append("cuda")
    if has_triton() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


def default_backend(device: str | torch.device = "cpu", op: str = "prune_tokens") -> str:
    """The backend that `backend="auto"` and a direct torch.ops.fopru.<op> call run for tensors on
    `device` in this process: 'cpu', 'cuda', 'triton' or 'reference' (FOPRU_BACKEND resolved against
    this install, see fopru_kernels.backends; the ops share one choice unless CUDA_CXX_BY_DEFAULT
    lists some)."""
    if op not in SCHEMAS:
        raise ValueError(f"op must be one of {', '.join(map(repr, SCHEMAS))}, got {op!r}")
    return backends.resolve(SETTING, op, torch.device(device).type, INSTALL)


def _require(name: str, backend: str, tensor) -> None:
    """Fails clearly when a forced backend cannot run op `name` on these tensors."""
    backends.check_backend(backend)
    dev = tensor.device if isinstance(tensor, torch.Tensor) else None
    if backend == "cpu":
        if not HAS_LIBRARY:
            raise ValueError(f"backend='cpu' needs the compiled library: {LIBRARY_ERROR}")
        if name not in CPU_KERNEL_OPS:
            raise ValueError(f"backend='cpu' has no C++ kernel for {name} yet: use backend='auto' or 'reference'")
        if dev is not None and dev.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {dev}")
    elif backend == "cuda":
        if name not in CUDA_KERNEL_OPS:
            raise ValueError("backend='cuda' needs the library built with its CUDA kernels (FOPRU_BUILD_CUDA=1)")
        if dev is not None and dev.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {dev}")
    elif backend == "triton":
        if not has_triton():
            raise ValueError("backend='triton' needs the triton package")
    key = DISPATCH_KEYS.get(backend)
    if (name, key) in REPLACED and (name, key) not in CXX_OPS:
        raise ValueError(
            f"backend={backend!r} cannot reach the C++ kernel of {name} in this process: FOPRU_BACKEND={SETTING!r} "
            f"replaced it and torch {torch.__version__} has no torch.library.get_kernel (torch >= 2.9); "
            f"set FOPRU_BACKEND={backend!r} instead")


def _call(name: str, backend: str, args: tuple):
    """Op `name` on `args` (its schema's order) with `backend`; 'auto' is the dispatcher, i.e. the
    process-wide choice (default_backend)."""
    if backend == "auto":
        return OPS[name](*args)
    _require(name, backend, args[0])
    if backend == "reference":
        return REFERENCE_KERNELS[name](*args)
    if backend == "triton":
        return TRITON_ENTRY_POINTS[name](*args)
    key = name, DISPATCH_KEYS[backend]
    if key in CXX_OPS:
        return CXX_OPS[key](*args)
    return OPS[name](*args)


def significance(
    attn: torch.Tensor, *, score: str = "focal", num_prefix: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """Token significance (SPEC.md): attn (B, H, Q, num_prefix + N) -> (B, N) int64 fixed-point sums.

    score: 'focal' (larger-variance of received/paid attention), 'received' or 'cls' (CLS row only).
    """
    return _call("significance", backend, (attn, score, num_prefix))


def select(
    sig: torch.Tensor,
    keep: int,
    *,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Kept indices (SPEC.md): sig (B, N) int64 -> (B, keep) int64, ascending in each row.

    strategy 'rank' keeps the `keep` highest tokens; 'row' keeps keep / cols whole grid rows.
    """
    return _call("select", backend, (sig, keep, strategy, grid))


def prune_tokens(
    tokens: torch.Tensor,
    attn: torch.Tensor,
    keep: int,
    *,
    strategy: str = "rank",
    score: str = "focal",
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `keep` visual tokens per image, in their original order (SPEC.md).

    tokens: (B, N, D) float16/bfloat16/float32 patch features (CLS already removed), any strides.
    attn:   (B, H, Q, num_prefix + N) attention of one encoder layer (probabilities or logits);
            Q = 1 (the CLS row) is enough for score='cls', 'received'/'focal' need the square map.
    grid:   (rows, cols) of the patch grid; None means square. Needed by strategy='row'.
    backend: 'auto' (what FOPRU_BACKEND chose: default_backend(device)), or force 'cpu', 'cuda',
             'triton', 'reference'.
    Returns pruned (B, keep, D) of tokens' dtype and idx (B, keep) int64, both contiguous.
    """
    return _call("prune_tokens", backend, (tokens, attn, keep, strategy, score, num_prefix, grid))


def significance_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    score: str = "focal",
    num_prefix: int = 1,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
    backend: str = "auto",
) -> torch.Tensor:
    """Token significance from the layer's queries and keys, no attention map (SPEC.md
    "Significance from q and k"): q, k (B, H, S, d) ('bhsd') or (B, S, H, d) ('bshd') -> (B, N) int64.

    kind 'prob' scores softmax probabilities (lse (B, H, S) float32 from SDPA / FlashAttention, or
    None to compute it), 'logit' the scaled logits; scale None means d ** -0.5.
    """
    return _call("significance_qk", backend, (q, k, score, num_prefix, scale, lse, kind, layout))


def prune_tokens_qk(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    keep: int,
    *,
    strategy: str = "rank",
    score: str = "focal",
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """prune_tokens with the significance computed from q and k (see significance_qk):
    tokens (B, N, D) -> pruned (B, keep, D), idx (B, keep) int64, N = S - num_prefix."""
    args = (tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    return _call("prune_tokens_qk", backend, args)


def prune_tokens_varlen(
    tokens: torch.Tensor,
    sig: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    *,
    strategy: str = "rank",
    grids: list[tuple[int, int]] | list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for a ragged batch (SPEC.md "Ragged batches"): tokens (T, D), sig (T,) int64,
    cu_seqlens (B + 1,) int32/int64 on the device, keep B host ints, grids B (rows, cols) pairs or the
    flat [rows_0, cols_0, ...] (needed by 'row') -> pruned (sum(keep), D), idx (sum(keep),) global int64,
    cu_seqlens_out (B + 1,). No device-to-host sync: every output size comes from `keep`.
    """
    keep = [int(v) for v in keep]
    return _call("prune_tokens_varlen", backend, (tokens, sig, cu_seqlens, keep, strategy, _checks.flat_grids(grids)))


def significance_qk_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    score: str = "focal",
    num_prefix: int = 1,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
    backend: str = "auto",
) -> torch.Tensor:
    """The sums significance_qk chooses from (SPEC.md "Significance from q and k"): q, k as in
    significance_qk -> (B, C, N) int64, C = 2 for 'focal' ([:, 0] column sums, [:, 1] row sums)
    and 1 for 'cls' / 'received', each a sum over heads of fx values.

    Parts of disjoint head subsets add up exactly (int64), so under tensor parallelism each rank
    computes its heads' parts, the ranks sum them, and significance_from_parts makes the choice.
    """
    return _call("significance_qk_parts", backend, (q, k, score, num_prefix, scale, lse, kind, layout))


def significance_from_parts(parts: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Significance from (summed) parts: (B, C, N) int64 -> (B, N) int64, the exact focal choice
    between parts[:, 0] (column sums) and parts[:, 1] (row sums) for C = 2, parts[:, 0] for C = 1.

    significance_from_parts(significance_qk_parts(...)) equals significance_qk(...) bit for bit.
    """
    return _call("significance_from_parts", backend, (parts,))


def significance_qk_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    group: int = 1,
    backend: str = "auto",
) -> torch.Tensor:
    """Significance of a packed batch from q and k (SPEC.md "Packed batches from q and k"): q, k (T, H, d)
    (FlashAttention varlen layout), cu_seqlens (S + 1,) attention segments -> (T / group,) int64.

    Each segment is scored like significance_qk with no prefix token; score 'focal' | 'received';
    kind 'prob' (lse (H, T) float32 as FlashAttention varlen returns it, or None) | 'logit'; group sums
    that many consecutive tokens into one merged token (Qwen-VL: 4).
    """
    return _call("significance_qk_varlen", backend, (q, k, cu_seqlens, score, scale, lse, kind, group))


def prune_tokens_qk_varlen(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    *,
    strategy: str = "rank",
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    group: int = 1,
    cu_seqlens_select: torch.Tensor | None = None,
    grids: list[tuple[int, int]] | list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prune_tokens_varlen on significance_qk_varlen, one op (SPEC.md "Packed batches from q and k"):
    tokens (T / group, D) merged tokens, q, k (T, H, d), cu_seqlens (S + 1,) attention segments, keep one
    host int per selection segment: cu_seqlens_select (M + 1,) in merged tokens (e.g. per video while
    cu_seqlens is per frame), None meaning cu_seqlens / group; grids M (rows, cols) pairs or the flat
    [rows_0, cols_0, ...] in merged tokens (for 'row') -> pruned (sum(keep), D), idx (sum(keep),) global
    int64, cu_seqlens_out (M + 1,).
    """
    keep = [int(v) for v in keep]
    args = (tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group, cu_seqlens_select,
            _checks.flat_grids(grids))
    return _call("prune_tokens_qk_varlen", backend, args)
