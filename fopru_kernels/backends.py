"""Which kernel serves each op: the backend names, the process-wide setting FOPRU_BACKEND, and the
one rule that resolves them per op and device.

This module only decides; `registration.py` registers what it decides with the dispatcher at import, so
`backend="auto"` and a direct `torch.ops.fopru.<op>` call run the same kernel, and
`ops.default_backend(device, op)` reports it. README "Backends" has the table and the evidence.

FOPRU_BACKEND (read once, when fopru_kernels is imported; unset or empty means "auto"):
- "auto": CPU tensors -> the C++ CPU kernel (the reference without the compiled library, or for an op
  that a stale build lacks);
  CUDA tensors -> Triton (the CUDA C++ kernel where triton is missing, or for the ops in
  CUDA_CXX_BY_DEFAULT; the reference where neither is there).
- "cpu": CPU tensors -> the C++ CPU kernel, required; CUDA tensors as "auto".
- "cuda": CUDA tensors -> the CUDA C++ kernels, required; CPU tensors as "auto".
- "triton": CUDA tensors -> Triton, required; CPU tensors as "auto" (Triton runs CPU tensors only
  under TRITON_INTERPRET=1, a test tool: ask for it per call with backend="triton").
- "reference": CPU and CUDA tensors -> the PyTorch reference (the oracle; slow).
A value names a backend; tensors on the devices that backend runs go to it and the others keep
"auto"'s choice. An unknown value, or one this install cannot serve, raises at import.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

BACKENDS = ("auto", "cpu", "cuda", "triton", "reference")
ENV_VAR = "FOPRU_BACKEND"
DEVICE_TYPES = ("cpu", "cuda")

# Standing rule: the CUDA C++ kernels have compiled in CI but never run on a GPU, so "auto" sends
# CUDA tensors to Triton (the path with GPU evidence). When a scripts/gpu_check.sh run has passed
# for them (its summary's "cuda-cxx:" line says they matched the reference on every GPU test), add
# here the ops whose CUDA C++ kernel measured faster than Triton in that run's reports, in the same
# commit as the committed report.
CUDA_CXX_BY_DEFAULT: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Install:
    """What this process can run: the ops with a C++ CPU kernel (empty without the compiled library),
    the ops with a C++ CUDA kernel, the ops with a Triton kernel (empty when triton is not importable)."""

    cpu_ops: frozenset[str]
    cuda_ops: frozenset[str]
    triton_ops: frozenset[str]

    @property
    def library(self) -> bool:
        return bool(self.cpu_ops)


def check_backend(value, key: str = "backend") -> str:
    """`value` if it is a backend name, else ValueError naming `key` (an argument, a setting) and the
    allowed values. The adapters' and the plugins' settings use it with their own key."""
    if not isinstance(value, str) or value not in BACKENDS:
        raise ValueError(f"{key} must be one of {', '.join(map(repr, BACKENDS))}, got {value!r}")
    return value


def setting_from_env(environ=os.environ) -> str:
    """FOPRU_BACKEND, checked: 'auto' when unset or empty."""
    return check_backend(environ.get(ENV_VAR) or "auto", ENV_VAR)


def check_install(setting: str, have: Install, library_error: str | None) -> None:
    """Refuses a setting this install cannot serve (at import, not at the first call)."""
    if setting == "cpu" and not have.library:
        raise ValueError(f"{ENV_VAR}='cpu' needs the compiled library: {library_error}")
    if setting == "cuda" and not have.cuda_ops:
        why = f": {library_error}" if library_error else ""
        raise ValueError(f"{ENV_VAR}='cuda' needs the library built with its CUDA kernels (FOPRU_BUILD_CUDA=1){why}")
    if setting == "triton" and not have.triton_ops:
        raise ValueError(f"{ENV_VAR}='triton' needs the triton package")


def resolve(setting: str, op: str, device_type: str, have: Install) -> str:
    """The backend that serves `op` on `device_type` ('cpu' or 'cuda') tensors under `setting`."""
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device must be a CPU or CUDA device, got {device_type!r}")
    if setting == "reference":
        return "reference"
    if device_type == "cpu":
        return "cpu" if op in have.cpu_ops else "reference"
    cuda, triton = op in have.cuda_ops, op in have.triton_ops
    if setting == "cuda" and cuda or setting == "triton" and triton:
        return setting
    if cuda and (op in CUDA_CXX_BY_DEFAULT or not triton):
        return "cuda"
    return "triton" if triton else "reference"
