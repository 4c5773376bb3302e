"""SPEC.md "Significance from q and k" as plain PyTorch in float64: the oracle of the q/k kernels.

The kernels compute the same means in float32 (tensor-core dots, exp, sums in their own order) and
so may differ from this by rounding; tests bound that difference and demand exact indices wherever
the margin at the selection boundary exceeds it. Here the `S x S` logits are materialised one image
at a time: clarity first, memory bounded by one image's `H x S x S` float64 map.
"""
from __future__ import annotations

import torch

from ._checks import check_prune_qk, check_significance_qk
from .reference import _select, fixed_point, gather_rows, significance_from_parts


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
