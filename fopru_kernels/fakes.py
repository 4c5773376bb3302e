"""Fake (meta) kernels of torch.ops.fopru.*: each op's output shapes and dtypes from its inputs' shapes
and `keep` alone, so torch.compile(fullgraph=True) traces through the ops without running them.
They run the op's checks first (fopru_kernels._checks, the C++ checks' twin), so bad input fails at
trace time with the same message as at run time. registration.py registers FAKES for every op.
"""
from __future__ import annotations

import torch

from . import _checks


def significance(attn, score="focal", num_prefix=1):
    _checks.check_significance(attn, score, num_prefix)
    return attn.new_empty((attn.shape[0], attn.shape[3] - num_prefix), dtype=torch.int64)


def select(sig, keep, strategy="rank", grid=None):
    _checks.check_select(sig, keep, strategy, grid)
    return sig.new_empty((sig.shape[0], keep))


def prune_tokens(tokens, attn, keep, strategy="rank", score="focal", num_prefix=1, grid=None):
    _checks.check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


def significance_qk(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, _, s, _ = _checks.qk_dims(q, layout)
    return q.new_empty((b, s - num_prefix), dtype=torch.int64)


def prune_tokens_qk(tokens, q, k, keep, strategy="rank", score="focal", num_prefix=1, grid=None,
                          scale=None, lse=None, kind="prob", layout="bhsd"):
    _checks.check_prune_qk(tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    b, _, d = tokens.shape
    return tokens.new_empty((b, keep, d)), tokens.new_empty((b, keep), dtype=torch.int64)


def prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy="rank", grids=None):
    # values=False: the value checks read cu_seqlens, which a fake tensor cannot give.
    _checks.check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids, values=False)
    total = sum(keep)
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            cu_seqlens.new_empty(cu_seqlens.shape))


def significance_qk_parts(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob",
                                layout="bhsd"):
    _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, _, s, _ = _checks.qk_dims(q, layout)
    return q.new_empty((b, 2 if score == "focal" else 1, s - num_prefix), dtype=torch.int64)


def significance_from_parts(parts):
    _checks.check_parts(parts)
    return parts.new_empty((parts.shape[0], parts.shape[2]))


def significance_qk_varlen(q, k, cu_seqlens, score="focal", scale=None, lse=None, kind="prob", group=1):
    _checks.check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group, values=False)
    return q.new_empty((q.shape[0] // group,), dtype=torch.int64)


def prune_tokens_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy="rank", score="focal", scale=None, lse=None,
                                 kind="prob", group=1, cu_seqlens_select=None, grids=None):
    _checks.check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group,
                                  cu_seqlens_select, grids, values=False)
    total = sum(keep)
    select = cu_seqlens if cu_seqlens_select is None else cu_seqlens_select
    return (tokens.new_empty((total, tokens.shape[1])), tokens.new_empty((total,), dtype=torch.int64),
            select.new_empty(select.shape))


# op name -> its fake kernel (each function above is named after its op)
FAKES = {fn.__name__: fn for fn in (
    significance, select, prune_tokens, significance_qk, prune_tokens_qk, prune_tokens_varlen,
    significance_qk_parts, significance_from_parts, significance_qk_varlen, prune_tokens_qk_varlen,
)}
