"""The Triton backend's entry points, one per op, and ENTRY_POINTS, the table of them by op name that
registration.py puts in the dispatcher slots and ops.py calls for backend="triton".

Each takes the op's arguments in its schema's order, runs the op's checks (fopru_kernels._checks, the
same checks with the same messages as the C++ op runs before its kernel), then the op family's
launchers. The launcher modules are imported on the first call, not here: fopru_kernels imports this
table whether or not the triton package is installed (has_triton says whether it is).
"""
from __future__ import annotations

from .. import _checks


def has_triton() -> bool:
    """Whether the triton package imports, i.e. whether these entry points can run."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def significance(attn, score="focal", num_prefix=1):
    _checks.check_significance(attn, score, num_prefix)
    from . import prune_tokens as tk

    return tk.significance(attn, score, num_prefix)


def select(sig, keep, strategy="rank", grid=None):
    rows, cols = _checks.check_select(sig, keep, strategy, grid)
    from . import prune_tokens as tk

    return tk.select(sig, keep, strategy, rows, cols)


def prune_tokens(tokens, attn, keep, strategy="rank", score="focal", num_prefix=1, grid=None):
    rows, cols = _checks.check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    from . import prune_tokens as tk

    return tk.prune_tokens(tokens, attn, keep, strategy, score, num_prefix, rows, cols)


def significance_qk(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    scale = _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    from . import significance_qk as tq

    return tq.significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)


def prune_tokens_qk(tokens, q, k, keep, strategy="rank", score="focal", num_prefix=1, grid=None,
                    scale=None, lse=None, kind="prob", layout="bhsd"):
    rows, cols, scale = _checks.check_prune_qk(
        tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    from . import significance_qk as tq

    return tq.prune_tokens_qk(tokens, q, k, keep, strategy, score, num_prefix, rows, cols, scale, lse, kind, layout)


def prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy="rank", grids=None):
    cols = _checks.check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids)
    from . import prune_tokens_varlen as tv

    return tv.prune_tokens_varlen(tokens, sig, cu_seqlens, list(keep), strategy, cols,
                                  None if grids is None else list(grids))


def significance_qk_parts(q, k, score="focal", num_prefix=1, scale=None, lse=None, kind="prob", layout="bhsd"):
    scale = _checks.check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    from . import significance_qk as tq

    return tq.significance_qk_parts(q, k, score, num_prefix, scale, lse, kind, layout)


def significance_from_parts(parts):
    _checks.check_parts(parts)
    from . import significance_qk as tq

    return tq.significance_from_parts(parts)


def significance_qk_varlen(q, k, cu_seqlens, score="focal", scale=None, lse=None, kind="prob", group=1):
    scale = _checks.check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)
    from . import significance_qk_varlen as tqv

    return tqv.significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)


def prune_tokens_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy="rank", score="focal", scale=None, lse=None,
                           kind="prob", group=1, cu_seqlens_select=None, grids=None):
    cols, scale = _checks.check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind,
                                                group, cu_seqlens_select, grids)
    from . import significance_qk_varlen as tqv

    return tqv.prune_tokens_qk_varlen(tokens, q, k, cu_seqlens, list(keep), strategy, score, scale, lse, kind, group,
                                      cu_seqlens_select, cols, None if grids is None else list(grids))


# op name -> its Triton entry point (each function above is named after its op); every op has one
# (tests/test_backends.py).
ENTRY_POINTS = {fn.__name__: fn for fn in (
    significance, select, prune_tokens, significance_qk, prune_tokens_qk, prune_tokens_varlen,
    significance_qk_parts, significance_from_parts, significance_qk_varlen, prune_tokens_qk_varlen,
)}
