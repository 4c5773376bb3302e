"""torch.ops.fopru.* with the dispatcher: the schemas, loading the compiled library (or defining the
ops in Python without it), the kernel that serves each op's CPU and CUDA slot, the fake kernels, and
fopru_cxx (the C++ kernels a Python one replaced). Runs once, when fopru_kernels is imported.

With the compiled library (fopru_kernels/_C.so) the ops, their checks and their CPU/CUDA kernels
live in C++. Without it, the same schemas are defined here. Either way, this module puts in each op's
CPU and CUDA dispatcher slot the kernel `backends.resolve` picks for FOPRU_BACKEND, so
`backend="auto"` and a direct `torch.ops.fopru.<op>` call agree; C++ kernels picked stay in their
slot and an eager call then never enters Python past the wrapper. `ops.py` is the Python API on top.
"""
from __future__ import annotations

import os
import warnings

import torch

from . import backends, fakes, reference, reference_qk
from .triton import entry as triton_entry

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
# The library was built with its CUDA kernels: every op with a C++ CPU kernel has its CUDA C++ kernel
# too (tests/test_backends.py checks that every op has every kernel of this install).
HAS_CUDA_KERNELS = bool(CUDA_KERNEL_OPS) and CUDA_KERNEL_OPS == CPU_KERNEL_OPS


def _grid(grid):
    return None if grid is None else tuple(grid)


# The reference as a dispatcher kernel: positional arguments in schema order, grid as a list.
REFERENCE_KERNELS = {
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

TRITON_OPS = frozenset(triton_entry.ENTRY_POINTS) if triton_entry.has_triton() else frozenset()
INSTALL = backends.Install(CPU_KERNEL_OPS, CUDA_KERNEL_OPS, TRITON_OPS)
backends.check_install(SETTING, INSTALL, LIBRARY_ERROR)

DISPATCH_KEYS = {"cpu": "CPU", "cuda": "CUDA"}  # device type -> dispatch key of its slot
_PYTHON_KERNELS = {"reference": REFERENCE_KERNELS, "triton": triton_entry.ENTRY_POINTS}
_replaced: set[tuple[str, str]] = set()  # (op, key) whose C++ kernel a Python one replaced
_cxx_kernels: dict[tuple[str, str], object] = {}  # their handles (torch.library.get_kernel, torch >= 2.9)


def _serve(name: str, device_type: str) -> None:
    """Puts in op `name`'s dispatcher slot for `device_type` tensors the kernel backends.resolve picks:
    a C++ kernel it picks is already there (the library registered it); a Python one is registered
    over whatever is there, and a C++ kernel it replaces is kept reachable for explicit backend=."""
    key = DISPATCH_KEYS[device_type]
    kernels = _PYTHON_KERNELS.get(backends.resolve(SETTING, name, device_type, INSTALL))
    if kernels is None:
        return
    if _has_kernel(name, key):
        _replaced.add((name, key))
        if hasattr(torch.library, "get_kernel"):
            _cxx_kernels[name, key] = torch.library.get_kernel(f"fopru::{name}", key)
    with warnings.catch_warnings():
        # Replacing the C++ kernel is the intent; torch warns once per process about any such override.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        _lib.impl(name, kernels[name], key)


for _name in SCHEMAS:
    for _device_type in DISPATCH_KEYS:
        _serve(_name, _device_type)

# Fake kernels (fakes.py): output sizes depend only on shapes and keep, so torch.compile(fullgraph=True)
# traces through the ops.
for _name, _fake in fakes.FAKES.items():
    torch.library.register_fake(f"fopru::{_name}")(_fake)

# An explicit backend='cpu' / 'cuda' must run the C++ kernel even where FOPRU_BACKEND put a Python
# kernel in its slot: each replaced C++ kernel is served as op fopru_cxx::<op> (same schema, same fake
# kernel), so such calls stay traceable by torch.compile and capturable in CUDA graphs.
if _cxx_kernels:
    _cxx = torch.library.Library("fopru_cxx", "DEF")
    _libs.append(_cxx)
    for _name in dict.fromkeys(name for name, _ in _cxx_kernels):
        _cxx.define(SCHEMAS[_name])
        _cxx.impl(_name, torch.library.fallthrough_kernel, "Autograd")
        torch.library.register_fake(f"fopru_cxx::{_name}")(fakes.FAKES[_name])
    for (_name, _key), _kernel in _cxx_kernels.items():
        _keyset = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, _key))
        _cxx.impl(_name, lambda *args, k=_kernel, ks=_keyset: k.call_boxed(ks, *args), _key)

# What ops.py calls: each op's dispatcher entry, and, per replaced (op, key), the fopru_cxx op that
# still reaches its C++ kernel. A replaced (op, key) missing from CXX_OPS is unreachable (torch < 2.9).
OPS = {name: getattr(torch.ops.fopru, name).default for name in SCHEMAS}
CXX_OPS = {(name, key): getattr(torch.ops.fopru_cxx, name).default for name, key in _cxx_kernels}
REPLACED = frozenset(_replaced)
