"""torch.ops.fopru.*: loading the compiled library, the pure-Python fallback, backend choice, fake kernels.

With the compiled library (fopru_kernels/_C.so) the ops, their checks and their CPU/CUDA kernels
live in C++ and an eager call never enters Python past the wrapper's attribute lookups. Without it,
the same schemas are defined here and served by the reference (CPU) or Triton (CUDA).
"""
from __future__ import annotations

import os

import torch

from . import _checks, reference, reference_qk

# Keep identical to TORCH_LIBRARY(fopru) in csrc/ops.cpp (tests/test_ops.py checks it).
SCHEMAS = {
    "significance": 'significance(Tensor attn, str score="focal", int num_prefix=1) -> Tensor',
    "select": 'select(Tensor sig, int keep, str strategy="rank", int[]? grid=None) -> Tensor',
    "prune_tokens": (
        'prune_tokens(Tensor tokens, Tensor attn, int keep, str strategy="rank", '
        'str score="focal", int num_prefix=1, int[]? grid=None) -> (Tensor, Tensor)'
    ),
    "significance_qk": (
        'significance_qk(Tensor q, Tensor k, str score="focal", int num_prefix=1, float? scale=None, '
        'Tensor? lse=None, str kind="prob", str layout="bhsd") -> Tensor'
    ),
    "prune_tokens_qk": (
        'prune_tokens_qk(Tensor tokens, Tensor q, Tensor k, int keep, str strategy="rank", str score="focal", '
        'int num_prefix=1, int[]? grid=None, float? scale=None, Tensor? lse=None, str kind="prob", '
        'str layout="bhsd") -> (Tensor, Tensor)'
    ),
    "prune_tokens_varlen": (
        'prune_tokens_varlen(Tensor tokens, Tensor sig, Tensor cu_seqlens, int[] keep, str strategy="rank", '
        'int[]? grids=None) -> (Tensor, Tensor, Tensor)'
    ),
    "significance_qk_varlen": (
        'significance_qk_varlen(Tensor q, Tensor k, Tensor cu_seqlens, str score="focal", float? scale=None, '
        'Tensor? lse=None, str kind="prob", int group=1) -> Tensor'
    ),
    "prune_tokens_qk_varlen": (
        'prune_tokens_qk_varlen(Tensor tokens, Tensor q, Tensor k, Tensor cu_seqlens, int[] keep, '
        'str strategy="rank", str score="focal", float? scale=None, Tensor? lse=None, str kind="prob", '
        'int group=1, Tensor? cu_seqlens_select=None, int[]? grids=None) -> (Tensor, Tensor, Tensor)'
    ),
}

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
LIBRARY_PATH = os.path.join(os.path.dirname(__file__), "_C.so")


def _load_library() -> str | None:
    """Loads _C.so; returns None on success, else why it is unavailable."""
    if os.environ.get("FOPRU_DISABLE_LIBRARY") == "1":  # tests of the pure-Python fallback
        return "disabled by FOPRU_DISABLE_LIBRARY=1"
    if not os.path.exists(LIBRARY_PATH):
        return f"{LIBRARY_PATH} not built (run `make build`)"
    try:
        torch.ops.load_library(LIBRARY_PATH)
    except (OSError, RuntimeError) as e:
        return f"{LIBRARY_PATH} failed to load: {e}"
    return None


LIBRARY_ERROR = _load_library()
HAS_LIBRARY = LIBRARY_ERROR is None
_libs = []  # keeps Python registrations alive

if not HAS_LIBRARY:
    _def = torch.library.Library("fopru", "DEF")
    _libs.append(_def)
    for _schema in SCHEMAS.values():
        _def.define(_schema)

    def _grid(grid):
        return None if grid is None else tuple(grid)

    _def.impl("significance", lambda a, score="focal", p=1: reference.significance(a, score, p), "CPU")
    _def.impl("select", lambda s, k, st="rank", g=None: reference.select(s, k, st, _grid(g)), "CPU")
    _def.impl(
        "prune_tokens",
        lambda t, a, k, st="rank", sc="focal", p=1, g=None: reference.prune_tokens(t, a, k, st, sc, p, _grid(g)),
        "CPU",
    )
    _def.impl("prune_tokens_varlen", reference.prune_tokens_varlen, "CPU")
    # The q/k ops' CPU kernel is C++ (csrc/cpu/significance_qk.cpp); without it, the float64 oracle.
    _def.impl("significance_qk", reference_qk.significance_qk, "CPU")
    _def.impl("prune_tokens_qk", reference_qk.prune_tokens_qk, "CPU")
    for _name in SCHEMAS:  # inference-only, as in C++: outputs never require grad
        _def.impl(_name, torch.library.fallthrough_kernel, "Autograd")


def _has_cuda_kernel(name: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fopru::{name}", "CUDA")


HAS_CUDA_KERNELS = _has_cuda_kernel("prune_tokens")


def _triton_module():
    from .triton import prune_tokens as tk

    return tk


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _triton_significance(attn, score="focal", num_prefix=1):
    _checks.check_significance(attn, score, num_prefix)
    return _triton_module().significance(attn, score, num_prefix)


def _triton_select(sig, keep, strategy="rank", grid=None):
    rows, cols = _checks.check_select(sig, keep, strategy, grid)
    return _triton_module().select(sig, keep, strategy, rows, cols)


def _triton_prune_tokens(tokens, attn, keep, strategy="rank", score="focal", num_prefix=1, grid=None):
    rows, cols = _checks.check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    return _triton_module().prune_tokens(tokens, attn, keep, strategy, score, num_prefix, rows, cols)


def _triton_significance_qk(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    scale = _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    from .triton import significance_qk as tq

    return tq.significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)


def _triton_prune_tokens_qk(tokens, q, k, keep, strategy="rank", score="focal", num_prefix=1, grid=None,
                            scale=None, lse=None, kind="prob", layout="bhsd"):
    rows, cols, scale = _checks.check_prune_qk(
        tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    from .triton import significance_qk as tq

    return tq.prune_tokens_qk(tokens, q, k, keep, strategy, score, num_prefix, rows, cols, scale, lse, kind, layout)


def _triton_prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy="rank", grids=None):
    cols = _checks.check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids)
    from .triton import prune_tokens_varlen as tv

    return tv.prune_tokens_varlen(tokens, sig, cu_seqlens, list(keep), strategy, cols,
                                  None if grids is None else list(grids))


_TRITON_IMPLS = {
    "significance": _triton_significance,
    "select": _triton_select,
    "prune_tokens": _triton_prune_tokens,
    "significance_qk": _triton_significance_qk,
    "prune_tokens_qk": _triton_prune_tokens_qk,
    "prune_tokens_varlen": _triton_prune_tokens_varlen,
}

# The C++ CUDA kernels are the production path; an op the library was built without goes to its
# Triton kernel on CUDA tensors (the triton modules are imported on first use, not at import time).
if _has_triton():
    _cuda = torch.library.Library("fopru", "IMPL")
    _libs.append(_cuda)
    for _name, _impl in _TRITON_IMPLS.items():
        if not _has_cuda_kernel(_name):
            _cuda.impl(_name, _impl, "CUDA")

# INTERIM (issue 11): the packed q/k ops have no optimised kernel yet. On CPU and CUDA tensors they run
# their float64 reference (reference_qk.py), which reads cu_seqlens on the host (a sync on a GPU) and
# is far slower than a kernel; a kernel that registers itself for a key takes that key over.
_INTERIM_REFERENCE = {
    "significance_qk_varlen": reference_qk.significance_qk_varlen,
    "prune_tokens_qk_varlen": reference_qk.prune_tokens_qk_varlen,
}
_interim = torch.library.Library("fopru", "IMPL")
_libs.append(_interim)
for _name, _impl in _INTERIM_REFERENCE.items():
    for _key in ("CPU", "CUDA"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fopru::{_name}", _key):
            _interim.impl(_name, _impl, _key)


# Fake kernels: output sizes depend only on shapes and keep, so torch.compile(fullgraph=True)
# traces through the ops. They run the same checks, so bad input fails at trace time too.
@torch.library.register_fake("fopru::significance")
def _significance_fake(attn, score="focal", num_prefix=1):
    _checks.check_significance(attn, score, num_prefix)
    return attn.new_empty((attn.shape[0], attn.shape[3] - num_prefix), dtype=torch.int64)


@torch.library.register_fake("fopru::select")
def _select_fake(sig, keep, strategy="rank", grid=None):
    _checks.check_select(sig, keep, strategy, grid)
    return sig.new_empty((sig.shape[0], keep))


@torch.library.register_fake("fopru::prune_tokens")
def _prune_tokens_fake(tokens, attn, keep, strategy="rank", score="focal", num_prefix=1, grid=None):
    _checks.check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


@torch.library.register_fake("fopru::significance_qk")
def _significance_qk_fake(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, _, s, _ = _checks.qk_dims(q, layout)
    return q.new_empty((b, s - num_prefix), dtype=torch.int64)


@torch.library.register_fake("fopru::prune_tokens_qk")
def _prune_tokens_qk_fake(tokens, q, k, keep, strategy="rank", score="focal", num_prefix=1, grid=None,
                          scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_prune_qk(tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


@torch.library.register_fake("fopru::prune_tokens_varlen")
def _prune_tokens_varlen_fake(tokens, sig, cu_seqlens, keep, strategy="rank", grids=None):
    # values=False: the value checks read cu_seqlens, which a fake tensor cannot give.
    _checks.check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids, values=False)
    total = sum(keep)
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            cu_seqlens.new_empty(cu_seqlens.shape))


@torch.library.register_fake("fopru::significance_qk_varlen")
def _significance_qk_varlen_fake(q, k, cu_seqlens, score="focal", scale=None, lse=None, kind="prob", group=1):
    _checks.check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group, values=False)
    return q.new_empty((q.shape[0] // group,), dtype=torch.int64)


@torch.library.register_fake("fopru::prune_tokens_qk_varlen")
def _prune_tokens_qk_varlen_fake(tokens, q, k, cu_seqlens, keep, strategy="rank", score="focal", scale=None, lse=None,
                                 kind="prob", group=1, cu_seqlens_select=None, grids=None):
    _checks.check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group,
                                  cu_seqlens_select, grids, values=False)
    total = sum(keep)
    select = cu_seqlens if cu_seqlens_select is None else cu_seqlens_select
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            select.new_empty(select.shape))


_OP_SIG = torch.ops.fopru.significance.default
_OP_SELECT = torch.ops.fopru.select.default
_OP_PRUNE = torch.ops.fopru.prune_tokens.default
_OP_SIG_QK = torch.ops.fopru.significance_qk.default
_OP_PRUNE_QK = torch.ops.fopru.prune_tokens_qk.default
_OP_VARLEN = torch.ops.fopru.prune_tokens_varlen.default


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run tensors on `device` in this install (besides 'auto')."""
    dev = torch.device(device)
    out = ["reference"]
    if dev.type == "cpu" and HAS_LIBRARY:
        out.append("cpu")
    if dev.type == "cuda" and HAS_CUDA_KERNELS:
        out.append("cuda")
    if _has_triton() and (dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


def _require(backend: str, *tensors: torch.Tensor) -> None:
    """Fails clearly when a forced backend cannot run these tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
    dev = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
    if backend == "cpu":
        if not HAS_LIBRARY:
            raise ValueError(f"backend='cpu' needs the compiled library: {LIBRARY_ERROR}")
        if dev is not None and dev.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got {dev}")
    elif backend == "cuda":
        if not HAS_CUDA_KERNELS:
            raise ValueError("backend='cuda' needs the library built with its CUDA kernels (FOPRU_BUILD_CUDA=1)")
        if dev is not None and dev.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {dev}")
    elif backend == "triton" and not _has_triton():
        raise ValueError("backend='triton' needs the triton package")


def significance(
    attn: torch.Tensor, score: str = "focal", num_prefix: int = 1, backend: str = "auto"
) -> torch.Tensor:
    """Token significance (SPEC.md): attn (B, H, Q, num_prefix + N) -> (B, N) int64 fixed-point sums.

    score: 'focal' (larger-variance of received/paid attention), 'received' or 'cls' (CLS row only).
    """
    if backend == "auto":
        return _OP_SIG(attn, score, num_prefix)
    _require(backend, attn)
    if backend == "reference":
        return reference.significance(attn, score, num_prefix)
    if backend == "triton":
        return _triton_significance(attn, score, num_prefix)
    return _OP_SIG(attn, score, num_prefix)


def select(
    sig: torch.Tensor,
    keep: int,
    strategy: str = "rank",
    grid: tuple[int, int] | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Kept indices (SPEC.md): sig (B, N) int64 -> (B, keep) int64, ascending in each row.

    strategy 'rank' keeps the `keep` highest tokens; 'row' keeps keep / cols whole grid rows.
    """
    if backend == "auto":
        return _OP_SELECT(sig, keep, strategy, grid)
    _require(backend, sig)
    if backend == "reference":
        return reference.select(sig, keep, strategy, grid)
    if backend == "triton":
        return _triton_select(sig, keep, strategy, grid)
    return _OP_SELECT(sig, keep, strategy, grid)


def prune_tokens(
    tokens: torch.Tensor,
    attn: torch.Tensor,
    keep: int,
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
    backend: 'auto' (C++ on CPU, CUDA C++ or Triton on GPU), or force 'cpu', 'cuda', 'triton', 'reference'.
    Returns pruned (B, keep, D) of tokens' dtype and idx (B, keep) int64, both contiguous.
    """
    if backend == "auto":
        return _OP_PRUNE(tokens, attn, keep, strategy, score, num_prefix, grid)
    _require(backend, tokens)
    if backend == "reference":
        return reference.prune_tokens(tokens, attn, keep, strategy, score, num_prefix, grid)
    if backend == "triton":
        return _triton_prune_tokens(tokens, attn, keep, strategy, score, num_prefix, grid)
    return _OP_PRUNE(tokens, attn, keep, strategy, score, num_prefix, grid)


def significance_qk(
    q: torch.Tensor,
    k: torch.Tensor,
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
    if backend == "auto":
        return _OP_SIG_QK(q, k, score, num_prefix, scale, lse, kind, layout)
    _require(backend, q)
    if backend == "reference":
        return reference_qk.significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    if backend == "triton":
        return _triton_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    return _OP_SIG_QK(q, k, score, num_prefix, scale, lse, kind, layout)


def prune_tokens_qk(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    keep: int,
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
    if backend == "auto":
        return _OP_PRUNE_QK(*args)
    _require(backend, tokens)
    if backend == "reference":
        return reference_qk.prune_tokens_qk(*args)
    if backend == "triton":
        return _triton_prune_tokens_qk(*args)
    return _OP_PRUNE_QK(*args)


def prune_tokens_varlen(
    tokens: torch.Tensor,
    sig: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    strategy: str = "rank",
    grids: list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One launch for a ragged batch (SPEC.md "Ragged batches"): tokens (T, D), sig (T,) int64,
    cu_seqlens (B + 1,) int32/int64 on the device, keep B host ints, grids [rows_0, cols_0, ...]
    (needed by 'row') -> pruned (sum(keep), D), idx (sum(keep),) global int64, cu_seqlens_out (B + 1,).
    No device-to-host sync: every output size comes from `keep`.
    """
    keep = [int(v) for v in keep]
    grids = None if grids is None else [int(v) for v in grids]
    if backend == "auto":
        return _OP_VARLEN(tokens, sig, cu_seqlens, keep, strategy, grids)
    _require(backend, tokens)
    if backend == "reference":
        return reference.prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy, grids)
    if backend == "triton":
        return _triton_prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy, grids)
    return _OP_VARLEN(tokens, sig, cu_seqlens, keep, strategy, grids)


def _interim_backend(name: str, backend: str, tensor: torch.Tensor) -> None:
    """Packed q/k ops: only 'auto' and 'reference' run until their kernels land (see _INTERIM_REFERENCE)."""
    _require(backend, tensor)
    if backend not in ("auto", "reference"):
        raise ValueError(
            f"backend={backend!r} has no {name} kernel yet: the packed q/k ops run their float64 reference for "
            "now (backend='auto' or 'reference')"
        )


def significance_qk_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
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
    that many consecutive tokens into one merged token (Qwen-VL: 4). Interim: runs the float64 reference.
    """
    if backend != "auto":
        _interim_backend("significance_qk_varlen", backend, q)
    if backend == "reference":
        return reference_qk.significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)
    return torch.ops.fopru.significance_qk_varlen.default(q, k, cu_seqlens, score, scale, lse, kind, group)


def prune_tokens_qk_varlen(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    strategy: str = "rank",
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    group: int = 1,
    cu_seqlens_select: torch.Tensor | None = None,
    grids: list[int] | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prune_tokens_varlen on significance_qk_varlen, one op (SPEC.md "Packed batches from q and k"):
    tokens (T / group, D) merged tokens, q, k (T, H, d), cu_seqlens (S + 1,) attention segments, keep one
    host int per selection segment: cu_seqlens_select (M + 1,) in merged tokens (e.g. per video while
    cu_seqlens is per frame), None meaning cu_seqlens / group; grids [rows_0, cols_0, ...] in merged
    tokens (for 'row') -> pruned (sum(keep), D), idx (sum(keep),) global int64, cu_seqlens_out (M + 1,).
    Interim: runs the float64 reference.
    """
    keep = [int(v) for v in keep]
    grids = None if grids is None else [int(v) for v in grids]
    args = (tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group, cu_seqlens_select, grids)
    if backend != "auto":
        _interim_backend("prune_tokens_qk_varlen", backend, tokens)
    if backend == "reference":
        return reference_qk.prune_tokens_qk_varlen(*args)
    return torch.ops.fopru.prune_tokens_qk_varlen.default(*args)
