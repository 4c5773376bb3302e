"""The float64 oracle's values and the stated float32 error bound of the q/k kernels, shared by the
dense tests (tests/test_qk.py, whose docstring derives the bound) and the packed ones
(tests/test_qk_varlen.py, which bound each attention segment as a dense image with no prefix token).
Their cases are tests/cases.py's QKCase (imported here too, where test_qk_varlen.py takes it from).
"""
from __future__ import annotations

import torch
from cases import QKCase

from fopru_kernels import reference, reference_qk

ROUNDING = 32 * 2.0**-24  # C u of tests/test_qk.py's docstring
FX_SCALE = 2.0**28


def fx_heads(v: torch.Tensor) -> torch.Tensor:
    """(B, H, N) float64 means -> (B, N) int64: SPEC.md's fx per head, summed over heads."""
    return reference.fixed_point(v).sum(dim=1)


def value_bounds(c: QKCase, q, k, lse) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Bounds (B, N) float64 of |sig - sig_ref| for the first vector (cls values or column means)
    and, for focal, the row means (module docstring). One image at a time: (H, S, S) float64."""
    scale = c.scale if c.scale is not None else c.d**-0.5
    p = c.P
    first, rows = [], []
    for b in range(c.B):
        qd = (q[b] if c.layout == "bhsd" else q[b].transpose(0, 1)).double().cpu()
        kd = (k[b] if c.layout == "bhsd" else k[b].transpose(0, 1)).double().cpu()
        mag = abs(scale) * (qd.abs() @ kd.abs().transpose(-1, -2))  # A (H, S, S)
        logits = scale * (qd @ kd.transpose(-1, -2))
        if c.kind == "logit":
            v, err = logits.abs(), ROUNDING * mag
        else:
            norm = lse[b].double().cpu() if lse is not None else torch.logsumexp(logits, dim=-1)
            v = torch.exp(logits - norm[..., None])
            lse_err = ROUNDING * (mag.amax(dim=-1) + norm.abs() + 1)
            err = v * (ROUNDING * mag + lse_err[..., None] + ROUNDING)
        if c.score == "cls":
            first.append(err[:, 0, p:] + ROUNDING * v[:, 0, p:])
            continue
        err, v = err[:, p:, p:], v[:, p:, p:]
        first.append(err.mean(dim=1) + ROUNDING * v.mean(dim=1))
        rows.append(err.mean(dim=2) + ROUNDING * v.mean(dim=2))

    def heads(e):  # [(H, N)] float64 value errors per image -> (B, N) fx error summed over heads
        return (FX_SCALE * torch.stack(e) + 1).sum(dim=1) if e else torch.zeros(0, c.N, dtype=torch.float64)

    return heads(first), heads(rows) if c.score == "focal" else None


def oracle(c: QKCase, q, k, lse):
    """(sig_ref, bound, decided, alt_ref, alt_bound): the oracle's significance, the bound of the
    kernel's error on it, whether its focal choice is decisive per image (always True for cls /
    received), and the vector it did not choose with its bound (focal; else sig_ref, bound)."""
    args = (c.score, c.P, c.scale, None if lse is None else lse.cpu(), c.kind, c.layout)
    first, rows = reference_qk.values_qk(q.cpu(), k.cpu(), *args)
    sig_ref = reference_qk.significance_qk(q.cpu(), k.cpu(), *args)
    bc, br = value_bounds(c, q, k, lse)
    if rows is None:
        return sig_ref, bc, torch.ones(c.B, dtype=torch.bool), sig_ref, bc
    col, row = fx_heads(first).double(), fx_heads(rows).double()
    mc, mr = col.mean(dim=1, keepdim=True), row.mean(dim=1, keepdim=True)
    # SPEC.md's rule compares N^2 var: N vc vs N vr with each vector's deviations from its own
    # mean. Rounding moves an entry by e and its mean by mean(e), a deviation by at most
    # e + mean(e), a squared deviation by 2 |dev| e' + e'^2.
    ec, er = bc + bc.mean(dim=1, keepdim=True), br + br.mean(dim=1, keepdim=True)
    slack = (2 * (col - mc).abs() * ec + ec**2).sum(dim=1) + (2 * (row - mr).abs() * er + er**2).sum(dim=1)
    vc, vr = ((col - mc) ** 2).sum(dim=1), ((row - mr) ** 2).sum(dim=1)
    use_col = (vc > vr)[:, None]
    alt_ref = torch.where(use_col, fx_heads(rows), fx_heads(first))
    return sig_ref, torch.where(use_col, bc, br), (vc - vr).abs() > slack, alt_ref, torch.where(use_col, br, bc)
