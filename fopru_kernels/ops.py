"""torch.ops.fopru.*: loading the compiled library, the pure-Python fallback, the kernel that serves
each op and device, fake kernels, and the Python API.

With the compiled library (fopru_kernels/_C.so) the ops, their checks and their CPU/CUDA kernels
live in C++. Without it, the same schemas are defined here. Either way, at import this module puts
in each op's CPU and CUDA dispatcher slot the kernel `backends.resolve` picks for FOPRU_BACKEND, so
`backend="auto"` and a direct `torch.ops.fopru.<op>` call agree; C++ kernels picked stay in their
slot and an eager call then never enters Python past the wrapper.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import _checks, backends, reference, reference_qk

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
    "significance_qk_parts": (
        'significance_qk_parts(Tensor q, Tensor k, str score="focal", int num_prefix=1, float? scale=None, '
        'Tensor? lse=None, str kind="prob", str layout="bhsd") -> Tensor'
    ),
    "significance_from_parts": "significance_from_parts(Tensor parts) -> Tensor",
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

BACKENDS = backends.BACKENDS
LIBRARY_PATH = os.path.join(os.path.dirname(__file__), "_C.so")
SETTING = backends.setting_from_env()  # FOPRU_BACKEND, read once: a bad value fails the import


def _load_library() -> str | None:
    """Loads _C.so; returns None on success, else why it is unavailable. A library that is there
    but does not load is worth a warning (a stale build, a torch mismatch); a missing one is not."""
    if os.environ.get("FOPRU_DISABLE_LIBRARY") == "1":  # tests of the pure-Python fallback
        return "disabled by FOPRU_DISABLE_LIBRARY=1"
    if not os.path.exists(LIBRARY_PATH):
        return f"{LIBRARY_PATH} not built (run `make build`)"
    try:
        torch.ops.load_library(LIBRARY_PATH)
    except (OSError, RuntimeError) as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""  # torch wraps the loader's own reason
        reason = f"{LIBRARY_PATH} failed to load: {e}{cause}"
        warnings.warn(f"fopru_kernels: {reason}; the ops fall back to the pure-Python reference on CPU tensors "
                      "and to Triton on CUDA tensors", RuntimeWarning, stacklevel=2)
        return reason
    return None


LIBRARY_ERROR = _load_library()
HAS_LIBRARY = LIBRARY_ERROR is None

if HAS_LIBRARY:
    _lib = torch.library.Library("fopru", "IMPL")
else:
    _lib = torch.library.Library("fopru", "DEF")
    for _schema in SCHEMAS.values():
        _lib.define(_schema)
    for _name in SCHEMAS:  # inference-only, as in C++: outputs never require grad
        _lib.impl(_name, torch.library.fallthrough_kernel, "Autograd")
_libs = [_lib]  # keeps Python registrations alive


def _has_kernel(name: str, key: str) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fopru::{name}", key)


# Read before any Python registration below can fill a slot: these are the C++ kernels.
CPU_KERNEL_OPS = frozenset(n for n in SCHEMAS if _has_kernel(n, "CPU"))
CUDA_KERNEL_OPS = frozenset(n for n in SCHEMAS if _has_kernel(n, "CUDA"))
# Ops whose kernels of one GPU backend have not landed yet, declared rather than read from the slots so
# that a kernel missing from a build or from _TRITON_IMPLS cannot pass for a pending one (tests/
# test_backends.py checks both sets against what is registered). The change that lands an op's
# kernel takes it out of its set.
# - WITHOUT_CUDA_CXX_KERNELS: no CUDA C++ kernel yet. backend='cuda' is refused for them, and
#   HAS_CUDA_KERNELS and the tests of the CUDA C++ slots leave exactly these out.
# - WITHOUT_TRITON_KERNELS: no Triton kernel yet (backend='triton' is refused: they are not in
#   _TRITON_IMPLS).
# backends.resolve sends an op's CUDA tensors to Triton when it has a Triton kernel, else to its CUDA
# C++ kernel, else (WITHOUT_GPU_KERNELS, both pending) to the float64 reference.
WITHOUT_CUDA_CXX_KERNELS = frozenset({"significance_qk_varlen", "prune_tokens_qk_varlen"})
WITHOUT_TRITON_KERNELS: frozenset[str] = frozenset()
WITHOUT_GPU_KERNELS = WITHOUT_CUDA_CXX_KERNELS & WITHOUT_TRITON_KERNELS
# The library was built with its CUDA kernels: every op with a C++ CPU kernel has its CUDA C++ kernel
# too, except the ops above that have none yet.
HAS_CUDA_KERNELS = bool(CUDA_KERNEL_OPS) and CUDA_KERNEL_OPS == CPU_KERNEL_OPS - WITHOUT_CUDA_CXX_KERNELS


def _grid(grid):
    return None if grid is None else tuple(grid)


# The reference as a dispatcher kernel: positional arguments in schema order, grid as a list.
_REFERENCE_IMPLS = {
    "significance": lambda a, score="focal", p=1: reference.significance(a, score, p),
    "select": lambda s, k, st="rank", g=None: reference.select(s, k, st, _grid(g)),
    "prune_tokens": (
        lambda t, a, k, st="rank", sc="focal", p=1, g=None: reference.prune_tokens(t, a, k, st, sc, p, _grid(g))
    ),
    "significance_qk": lambda *args: reference_qk.significance_qk(*args),
    "prune_tokens_qk": lambda *args: reference_qk.prune_tokens_qk(*args),
    "prune_tokens_varlen": lambda *args: reference.prune_tokens_varlen(*args),
    "significance_qk_parts": lambda *args: reference_qk.significance_qk_parts(*args),
    "significance_from_parts": lambda parts: reference.significance_from_parts(parts),
    "significance_qk_varlen": lambda *args: reference_qk.significance_qk_varlen(*args),
    "prune_tokens_qk_varlen": lambda *args: reference_qk.prune_tokens_qk_varlen(*args),
}


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


def _triton_significance_qk_parts(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob",
                                  layout="bhsd"):
    scale = _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    from .triton import significance_qk as tq

    return tq.significance_qk_parts(q, k, score, num_prefix, scale, lse, kind, layout)


def _triton_significance_from_parts(parts):
    _checks.check_parts(parts)
    from .triton import significance_qk as tq

    return tq.significance_from_parts(parts)


def _triton_significance_qk_varlen(q, k, cu_seqlens, score="focal", scale=None, lse=None, kind="prob", group=1):
    scale = _checks.check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)
    from .triton import significance_qk_varlen as tqv

    return tqv.significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)


def _triton_prune_tokens_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy="rank", score="focal", scale=None,
                                   lse=None, kind="prob", group=1, cu_seqlens_select=None, grids=None):
    cols, scale = _checks.check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind,
                                                group, cu_seqlens_select, grids)
    from .triton import significance_qk_varlen as tqv

    return tqv.prune_tokens_qk_varlen(tokens, q, k, cu_seqlens, list(keep), strategy, score, scale, lse, kind, group,
                                      cu_seqlens_select, cols, None if grids is None else list(grids))


_TRITON_IMPLS = {
    "significance": _triton_significance,
    "select": _triton_select,
    "prune_tokens": _triton_prune_tokens,
    "significance_qk": _triton_significance_qk,
    "prune_tokens_qk": _triton_prune_tokens_qk,
    "prune_tokens_varlen": _triton_prune_tokens_varlen,
    "significance_qk_parts": _triton_significance_qk_parts,
    "significance_from_parts": _triton_significance_from_parts,
    "significance_qk_varlen": _triton_significance_qk_varlen,
    "prune_tokens_qk_varlen": _triton_prune_tokens_qk_varlen,
}

INSTALL = backends.Install(CPU_KERNEL_OPS, CUDA_KERNEL_OPS, frozenset(_TRITON_IMPLS) if _has_triton() else frozenset())
backends.check_install(SETTING, INSTALL, LIBRARY_ERROR)

_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_PYTHON_IMPLS = {"reference": _REFERENCE_IMPLS, "triton": _TRITON_IMPLS}
_REPLACED: set[tuple[str, str]] = set()  # (op, key) whose C++ kernel a Python one replaced
_CXX_KERNELS: dict[tuple[str, str], object] = {}  # their handles (torch.library.get_kernel, torch >= 2.9)


def _serve(name: str, device_type: str) -> None:
    """Puts in op `name`'s dispatcher slot for `device_type` tensors the kernel backends.resolve picks:
    a C++ kernel it picks is already there (the library registered it); a Python one is registered
    over whatever is there, and a C++ kernel it replaces is kept reachable for explicit backend=."""
    key = _KEYS[device_type]
    impls = _PYTHON_IMPLS.get(backends.resolve(SETTING, name, device_type, INSTALL))
    if impls is None:
        return
    if _has_kernel(name, key):
        _REPLACED.add((name, key))
        if hasattr(torch.library, "get_kernel"):
            _CXX_KERNELS[name, key] = torch.library.get_kernel(f"fopru::{name}", key)
    with warnings.catch_warnings():
        # Replacing the C++ kernel is the intent; torch warns once per process about any such override.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        _lib.impl(name, impls[name], key)


for _name in SCHEMAS:
    for _device_type in _KEYS:
        _serve(_name, _device_type)

# Fake kernels: output sizes depend only on shapes and keep, so torch.compile(fullgraph=True)
# traces through the ops. They run the same checks, so bad input fails at trace time too.
def _significance_fake(attn, score="focal", num_prefix=1):
    _checks.check_significance(attn, score, num_prefix)
    return attn.new_empty((attn.shape[0], attn.shape[3] - num_prefix), dtype=torch.int64)


def _select_fake(sig, keep, strategy="rank", grid=None):
    _checks.check_select(sig, keep, strategy, grid)
    return sig.new_empty((sig.shape[0], keep))


def _prune_tokens_fake(tokens, attn, keep, strategy="rank", score="focal", num_prefix=1, grid=None):
    _checks.check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


def _significance_qk_fake(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, _, s, _ = _checks.qk_dims(q, layout)
    return q.new_empty((b, s - num_prefix), dtype=torch.int64)


def _prune_tokens_qk_fake(tokens, q, k, keep, strategy="rank", score="focal", num_prefix=1, grid=None,
                          scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_prune_qk(tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


def _prune_tokens_varlen_fake(tokens, sig, cu_seqlens, keep, strategy="rank", grids=None):
    # values=False: the value checks read cu_seqlens, which a fake tensor cannot give.
    _checks.check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids, values=False)
    total = sum(keep)
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            cu_seqlens.new_empty(cu_seqlens.shape))


def _significance_qk_parts_fake(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob",
                                layout="bhsd"):
    _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, _, s, _ = _checks.qk_dims(q, layout)
    return q.new_empty((b, 2 if score == "focal" else 1, s - num_prefix), dtype=torch.int64)


def _significance_from_parts_fake(parts):
    _checks.check_parts(parts)
    return parts.new_empty((parts.shape[0], parts.shape[2]))


def _significance_qk_varlen_fake(q, k, cu_seqlens, score="focal", scale=None, lse=None, kind="prob", group=1):
    _checks.check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group, values=False)
    return q.new_empty((q.shape[0] // group,), dtype=torch.int64)


def _prune_tokens_qk_varlen_fake(tokens, q, k, cu_seqlens, keep, strategy="rank", score="focal", scale=None, lse=None,
                                 kind="prob", group=1, cu_seqlens_select=None, grids=None):
    _checks.check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group,
                                  cu_seqlens_select, grids, values=False)
    total = sum(keep)
    select = cu_seqlens if cu_seqlens_select is None else cu_seqlens_select
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            select.new_empty(select.shape))


_FAKES = {
    "significance": _significance_fake,
    "select": _select_fake,
    "prune_tokens": _prune_tokens_fake,
    "significance_qk": _significance_qk_fake,
    "prune_tokens_qk": _prune_tokens_qk_fake,
    "prune_tokens_varlen": _prune_tokens_varlen_fake,
    "significance_qk_parts": _significance_qk_parts_fake,
    "significance_from_parts": _significance_from_parts_fake,
    "significance_qk_varlen": _significance_qk_varlen_fake,
    "prune_tokens_qk_varlen": _prune_tokens_qk_varlen_fake,
}
for _name, _fake in _FAKES.items():
    torch.library.register_fake(f"fopru::{_name}")(_fake)

# An explicit backend='cpu' / 'cuda' must run the C++ kernel even where FOPRU_BACKEND put a Python
# kernel in its slot: each replaced C++ kernel is served as op fopru_cxx::<op> (same schema, same fake
# kernel), so such calls stay traceable by torch.compile and capturable in CUDA graphs.
if _CXX_KERNELS:
    _cxx = torch.library.Library("fopru_cxx", "DEF")
    _libs.append(_cxx)
    for _name in dict.fromkeys(name for name, _ in _CXX_KERNELS):
        _cxx.define(SCHEMAS[_name])
        _cxx.impl(_name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"fopru_cxx::{_name}")(_FAKES[_name])
    for (_name, _key), _kernel in _CXX_KERNELS.items():
        _keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))
        _cxx.impl(_name, lambda *args, k=_kernel, ks=_keyset: k.call_boxed(ks, *args), _key)

_OPS = {name: getattr(torch.ops.fopru, name).default for name in SCHEMAS}
_CXX_OPS = {name: getattr(torch.ops.fopru_cxx, name).default for name in dict.fromkeys(n for n, _ in _CXX_KERNELS)}


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
        if name in WITHOUT_CUDA_CXX_KERNELS:
            raise ValueError(f"backend='cuda' has no CUDA C++ kernel for {name} yet: use backend='auto' or 'reference'")
        if name not in CUDA_KERNEL_OPS:
            raise ValueError("backend='cuda' needs the library built with its CUDA kernels (FOPRU_BUILD_CUDA=1)")
        if dev is not None and dev.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got {dev}")
    elif backend == "triton":
        if not _has_triton():
            raise ValueError("backend='triton' needs the triton package")
        if name not in _TRITON_IMPLS:
            raise ValueError(f"backend='triton' has no Triton kernel for {name} yet: use backend='auto' or 'reference'")
    key = _KEYS.get(backend)
    if (name, key) in _REPLACED and (name, key) not in _CXX_KERNELS:
        raise ValueError(
            f"backend={backend!r} cannot reach the C++ kernel of {name} in this process: FOPRU_BACKEND={SETTING!r} "
            f"replaced it and torch {torch.__version__} has no torch.library.get_kernel (torch >= 2.9); "
            f"set FOPRU_BACKEND={backend!r} instead")


def _call(name: str, backend: str, args: tuple):
    """Op `name` on `args` (its schema's order) with `backend`; 'auto' is the dispatcher, i.e. the
    process-wide choice (default_backend)."""
    if backend == "auto":
        return _OPS[name](*args)
    _require(name, backend, args[0])
    if backend == "reference":
        return _REFERENCE_IMPLS[name](*args)
    if backend == "triton":
        return _TRITON_IMPLS[name](*args)
    if (name, _KEYS[backend]) in _CXX_KERNELS:
        return _CXX_OPS[name](*args)
    return _OPS[name](*args)


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
