"""Triton backend, for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. ``entry`` holds its public
per-op entry points (checks, then launchers) and their table ENTRY_POINTS. One module per op family
holds its kernels and launchers: ``prune_tokens`` (``significance``, ``select``, ``prune_tokens``),
``significance_qk`` (the q/k ops) and ``prune_tokens_varlen`` (ragged batches). They share, by public
names only: ``select`` (exact selection and row gather, device code and launchers), ``exact``
(SPEC.md's fixed point and focal choice), ``launch`` (block sizes, device context, host tables) and
``target`` (whether launchers configure their kernels for a GPU or for the interpreter). The
launchers take inputs the entry points have already validated with ``fopru_kernels._checks``.
"""
