"""Triton backend. The launchers live in ``fopru_kernels.triton.prune_tokens`` (the module):
``significance``, ``select`` and ``prune_tokens``, for CUDA tensors, or CPU tensors under
TRITON_INTERPRET=1. Inputs must already be validated by ``fopru_kernels._checks``. Launchers ask
``target`` whether to configure their kernels for a GPU or for the interpreter.
"""
