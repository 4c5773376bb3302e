"""fopru_kernels: exact fused FoPru visual-token pruning (arXiv 2411.14164).

Importing the package loads the compiled library when it was built, which registers
torch.ops.fopru.{significance, select, prune_tokens} and the q/k and
ragged-batch ops {significance_qk, prune_tokens_qk, prune_tokens_varlen}, the staged q/k ops
{significance_qk_parts, significance_from_parts} and the packed q/k ops {significance_qk_varlen,
prune_tokens_qk_varlen}; otherwise the same ops are defined in Python.
Which kernel serves them on CPU and CUDA tensors is chosen once, at import, from FOPRU_BACKEND
(fopru_kernels.backends; `default_backend(device)` tells the choice).
"""
from .ops import (
    HAS_CUDA_KERNELS,
    HAS_LIBRARY,
    available_backends,
    default_backend,
    prune_tokens,
    prune_tokens_qk,
    prune_tokens_qk_varlen,
    prune_tokens_varlen,
    select,
    significance,
    significance_from_parts,
    significance_qk,
    significance_qk_parts,
    significance_qk_varlen,
)
from .reference import mrope_positions, positions, positions_varlen, retained_count

__all__ = [
    "HAS_CUDA_KERNELS",
    "HAS_LIBRARY",
    "available_backends",
    "default_backend",
    "mrope_positions",
    "positions",
    "positions_varlen",
    "prune_tokens",
    "prune_tokens_qk",
    "prune_tokens_qk_varlen",
    "prune_tokens_varlen",
    "retained_count",
    "select",
    "significance",
    "significance_from_parts",
    "significance_qk",
    "significance_qk_parts",
    "significance_qk_varlen",
]
__version__ = "0.1.0"
