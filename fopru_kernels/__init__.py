"""fopru_kernels: exact fused FoPru visual-token pruning (arXiv 2411.14164).

Importing the package loads the compiled library when it was built, which registers
torch.ops.fopru.{significance, select, prune_tokens} and the q/k and
ragged-batch ops {significance_qk, prune_tokens_qk, prune_tokens_varlen} and the packed q/k ops
{significance_qk_varlen, prune_tokens_qk_varlen} (interim: float64 reference); otherwise the same ops are
defined in Python.
"""
from .ops import (
    HAS_CUDA_KERNELS,
    HAS_LIBRARY,
    available_backends,
    prune_tokens,
    prune_tokens_qk,
    prune_tokens_qk_varlen,
    prune_tokens_varlen,
    select,
    significance,
    significance_qk,
    significance_qk_varlen,
)
from .reference import mrope_positions, positions, positions_varlen, retained_count

__all__ = [
    "HAS_CUDA_KERNELS",
    "HAS_LIBRARY",
    "available_backends",
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
    "significance_qk",
    "significance_qk_varlen",
]
__version__ = "0.1.0"
