"""fopru_kernels: exact fused FoPru visual-token pruning (arXiv 2411.14164).

Importing the package loads the compiled library when it was built, which registers
torch.ops.fopru.{significance, select, prune_tokens}; otherwise the same ops are defined in Python.
"""
from .ops import (
    HAS_CUDA_KERNELS,
    HAS_LIBRARY,
    available_backends,
    prune_tokens,
    select,
    significance,
)
from .reference import positions, retained_count

__all__ = [
    "HAS_CUDA_KERNELS",
    "HAS_LIBRARY",
    "available_backends",
    "positions",
    "prune_tokens",
    "retained_count",
    "select",
    "significance",
]
__version__ = "0.1.0"
