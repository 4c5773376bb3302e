"""Which hardware the Triton launchers size their kernels for.

Launchers pick tile sizes, warps and flags (constexprs) per device: for a GPU from its SM count,
for the interpreter (CPU tensors under TRITON_INTERPRET=1) a few large tiles, since it runs
programs one after another. Every launcher asks ``for_gpu(device)`` and ``sm_count(device)``, never
``device.type`` itself, so that ``gpu_tuning`` can make them pick the GPU configuration for CPU
tensors too.

``gpu_tuning`` exists for compile checks (``scripts/triton_compile_check.py``): they install a
Triton driver that compiles every launch for a GPU target instead of running it, and need the
launchers to specialise their kernels exactly as on that GPU. It is not for running kernels: under
the interpreter the GPU configuration is slow, and bfloat16 ``tl.dot`` (which the interpreter gets
wrong; see ``qk_tiles.dot_flags``) would give wrong values.
"""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch

# SM count the launchers assume for CPU tensors inside gpu_tuning(); None outside it.
_tuning_sms: int | None = None


def for_gpu(device: torch.device) -> bool:
    """True when launchers should pick their GPU configuration for tensors on `device`: CUDA
    tensors, or any tensors inside ``gpu_tuning()``."""
    return device.type == "cuda" or _tuning_sms is not None


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (CUDA), or the count given to ``gpu_tuning()``."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    if _tuning_sms is None:
        raise RuntimeError(f"sm_count: {device} is not a GPU and gpu_tuning() is not active")
    return _tuning_sms


@contextlib.contextmanager
def gpu_tuning(sms: int) -> Iterator[None]:
    """Inside this block the launchers configure every launch as on a GPU with `sms` SMs (132 on
    an H100 / H200, 108 on an A100), whatever the tensors' device. Not thread-safe; not
    re-entrant with a different count."""
    global _tuning_sms
    if not isinstance(sms, int) or sms < 1:
        raise ValueError(f"gpu_tuning: sms must be a positive int, got {sms!r}")
    if _tuning_sms is not None and _tuning_sms != sms:
        raise RuntimeError(f"gpu_tuning({sms}) inside gpu_tuning({_tuning_sms})")
    previous, _tuning_sms = _tuning_sms, sms
    try:
        yield
    finally:
        _tuning_sms = previous
