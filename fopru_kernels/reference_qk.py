"""SPEC.md "Significance from q and k" as plain PyTorch in float64: the oracle of the q/k kernels.

The kernels compute the same means in float32 (tensor-core dots, exp, sums in their own order) and
so may differ from this by rounding; tests bound that difference and demand exact indices wherever
the margin at the selection boundary exceeds it. Here the `S x S` logits are materialised one image
at a time: clarity first, memory bounded by one image's `H x S x S` float64 map.

The packed (varlen) ops at the end are the oracle of SPEC.md "Packed batches from q and k" and, until
their GPU kernels land, also their implementation on CUDA tensors (registration.py registers them there; CPU
tensors have the C++ kernel): so their `logit` means use the closed forms (O(T * H * d)) and their
`prob` means walk each segment in row blocks, never holding more than one block of one head's
probabilities.
"""
from __future__ import annotations

import torch

from ._checks import (
    check_attention_segments,
    check_prune_qk,
    check_prune_qk_varlen,
    check_significance_qk,
    check_significance_qk_varlen,
)
from .reference import _focal_choice, _select, fixed_point, gather_rows, prune_tokens_varlen, significance_from_parts


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t if layout == "bhsd" else t.transpose(1, 2)


def _image_values(q: torch.Tensor, k: torch.Tensor, scale: float, lse, kind: str) -> torch.Tensor:
    """v (H, S, S) float64 of one image: logits or probabilities (SPEC.md)."""
    logits = scale * (q.double() @ k.double().transpose(-1, -2))
    if kind == "logit":
        return logits
    norm = lse.double() if lse is not None else torch.logsumexp(logits, dim=-1)
    return torch.exp(logits - norm[..., None])


def values_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    score: str = "focal",
    num_prefix: int = 1,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The float64 values that enter fx, per head: (B, H, N) CLS-row values for 'cls', else the
    column means (B, H, N), plus the row means (B, H, N) for 'focal' (None otherwise)."""
    scale = check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    qb, kb = _bhsd(q, layout), _bhsd(k, layout)
    b, h, s, _ = qb.shape
    p, n = num_prefix, s - num_prefix
    first = torch.empty(b, h, n, dtype=torch.float64, device=q.device)
    rows = torch.empty_like(first) if score == "focal" else None
    for i in range(b):
        v = _image_values(qb[i], kb[i], scale, None if lse is None else lse[i], kind)
        if score == "cls":
            first[i] = v[:, 0, p:]
            continue
        patch = v[:, p:, p:]
        first[i] = patch.sum(dim=1) / n
        if rows is not None:
            rows[i] = patch.sum(dim=2) / n
    return first, rows


def significance_qk_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    score: str = "focal",
    num_prefix: int = 1,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
) -> torch.Tensor:
    """The sums the significance is chosen from: (B, C, N) int64, C = 2 for 'focal' ([:, 0] column
    sums, [:, 1] row sums), else 1; each a sum over heads of fx values (SPEC.md)."""
    first, rows = values_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    parts = [fixed_point(v).sum(dim=1) for v in (first, rows) if v is not None]
    return torch.stack(parts, dim=1)


def significance_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    score: str = "focal",
    num_prefix: int = 1,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
) -> torch.Tensor:
    """Token significance from q and k: (B, N) int64, SPEC.md "Significance from q and k"."""
    return significance_from_parts(significance_qk_parts(q, k, score, num_prefix, scale, lse, kind, layout))


def prune_tokens_qk(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    keep: int,
    strategy: str = "rank",
    score: str = "focal",
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    layout: str = "bhsd",
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D), q/k of the layer -> pruned (B, keep, D), idx (B, keep) int64 (SPEC.md)."""
    rows, cols, scale = check_prune_qk(tokens, q, k, keep, strategy, score, num_prefix, grid, scale, lse, kind, layout)
    with torch.no_grad():
        sig = significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
        idx = _select(sig, keep, strategy, rows, cols)
        return gather_rows(tokens, idx), idx


# Packed batches (SPEC.md "Packed batches from q and k") -------------------------------------------

_BLOCK = 1 << 22  # float64 probabilities held at once by the prob path (32 MiB)


def _check_segments_anywhere(q: torch.Tensor, cu_seqlens: torch.Tensor, group: int) -> None:
    """The checks read cu_seqlens' values for CPU tensors only (a kernel checks them on the device);
    this oracle reads them anyway, so it checks them on every device."""
    if q.device.type != "cpu":
        check_attention_segments(cu_seqlens.tolist(), q.shape[0], group)


def _segment_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    cu = cu_seqlens.tolist()  # the oracle may sync; the kernels do not
    return [(cu[s], cu[s + 1]) for s in range(len(cu) - 1)]


def _logit_means(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float):
    """(T, H) float64 column and row means of the scaled logits of each segment, by the closed forms
    colmean[t, h] = scale * qbar_s[h] . k[t, h] and rowmean[t, h] = scale * q[t, h] . kbar_s[h]."""
    t = q.shape[0]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths, output_size=t)
    q64, k64 = q.double(), k.double()
    n = lengths.clamp(min=1).double()[:, None, None]
    qbar = torch.zeros(lengths.numel(), *q.shape[1:], dtype=torch.float64, device=q.device).index_add_(0, segment, q64) / n
    kbar = torch.zeros_like(qbar).index_add_(0, segment, k64) / n
    return scale * (qbar[segment] * k64).sum(-1), scale * (q64 * kbar[segment]).sum(-1)


def _prob_means(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, scale: float, lse):
    """(T, H) float64 column and row means of each segment's softmax probabilities, one head and one
    block of query rows at a time (lse (H, T), or None to compute each row's logsumexp)."""
    col = torch.zeros(q.shape[:2], dtype=torch.float64, device=q.device)
    row = torch.zeros_like(col)
    for a, b in _segment_bounds(cu_seqlens):
        n = b - a
        rows = max(1, _BLOCK // max(n, 1))
        for h in range(q.shape[1]):
            keys = k[a:b, h].double()
            for i in range(a, b, rows):
                j = min(i + rows, b)
                logits = scale * (q[i:j, h].double() @ keys.T)  # (rows, n)
                norm = lse[h, i:j].double() if lse is not None else torch.logsumexp(logits, dim=1)
                p = torch.exp(logits - norm[:, None])
                col[a:b, h] += p.sum(dim=0)
                row[i:j, h] = p.sum(dim=1)
        col[a:b] /= n
        row[a:b] /= n
    return col, row


def significance_qk_varlen_parts(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
) -> torch.Tensor:
    """The head sums of a packed batch before the focal choice: (C, T) int64, row 0 the received
    vector col[t] = sum_h fx(colmean[t, h]) and, for 'focal', row 1 the paid vector row[t].

    q, k (T, H, d), cu_seqlens (S + 1,) attention segments. Heads enter only through these sums, so the
    parts of disjoint head subsets (tensor-parallel ranks) add up exactly to the parts of all heads.
    """
    scale = check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, 1)
    _check_segments_anywhere(q, cu_seqlens, 1)
    with torch.no_grad():
        if kind == "logit":
            col, row = _logit_means(q, k, cu_seqlens, scale)
        else:
            col, row = _prob_means(q, k, cu_seqlens, scale, lse)
        vectors = (col,) if score == "received" else (col, row)
        return torch.stack([fixed_point(v).sum(dim=1) for v in vectors])


def significance_varlen_from_parts(parts: torch.Tensor, cu_seqlens: torch.Tensor, group: int = 1) -> torch.Tensor:
    """(C, T) parts -> (T / group,) int64 significance: for C = 2 each segment takes its received or its
    paid vector by the focal rule of the dense ops (reference._focal_choice), then `group` consecutive
    tokens' scores are summed into one score per merged token."""
    if not isinstance(parts, torch.Tensor) or parts.dim() != 2 or parts.shape[0] not in (1, 2) or parts.dtype != torch.int64:
        raise ValueError("parts must be a (1, T) or (2, T) int64 tensor (received; received and paid)")
    sig = parts[0].clone()
    if parts.shape[0] == 2:
        for a, b in _segment_bounds(cu_seqlens):
            if b > a and not _focal_choice(parts[0, None, a:b], parts[1, None, a:b])[0]:
                sig[a:b] = parts[1, a:b]
    return sig.view(-1, group).sum(dim=1)


def significance_qk_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    group: int = 1,
) -> torch.Tensor:
    """Significance of a packed batch from q and k, SPEC.md "Packed batches from q and k":
    q, k (T, H, d), cu_seqlens (S + 1,) -> (T / group,) int64, each segment scored like
    significance_qk with no prefix token, `group` consecutive tokens summed per merged token."""
    check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)
    _check_segments_anywhere(q, cu_seqlens, group)
    parts = significance_qk_varlen_parts(q, k, cu_seqlens, score, scale, lse, kind)
    return significance_varlen_from_parts(parts, cu_seqlens, group)


def prune_tokens_qk_varlen(
    tokens: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    strategy: str = "rank",
    score: str = "focal",
    scale: float | None = None,
    lse: torch.Tensor | None = None,
    kind: str = "prob",
    group: int = 1,
    cu_seqlens_select: torch.Tensor | None = None,
    grids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prune_tokens_varlen on significance_qk_varlen: tokens (T / group, D) merged tokens, q, k (T, H, d),
    cu_seqlens (S + 1,) attention segments, keep one host int per selection segment (cu_seqlens_select
    (M + 1,) in merged tokens, or cu_seqlens / group when None), grids [rows_0, cols_0, ...] in merged
    tokens -> pruned (sum(keep), D), idx (sum(keep),) global int64, cu_seqlens_out (M + 1,)."""
    check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy, score, scale, lse, kind, group,
                          cu_seqlens_select, grids)
    sig = significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group)
    select = cu_seqlens // group if cu_seqlens_select is None else cu_seqlens_select
    return prune_tokens_varlen(tokens, sig, select, list(keep), strategy, None if grids is None else list(grids))
