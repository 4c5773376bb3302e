"""The oracle of the packed q/k ops' tests (tests/test_qk_varlen.py, tests/test_qk_varlen_triton.py): packed
inputs, the dense float64 oracle (tests/qk_oracle.py) run on each attention segment alone with its bound,
and the checks of a significance and of a prune against it (the rules: test_qk_varlen.py's docstring).
Outputs on a GPU are compared on the host; the oracle always runs on CPU copies.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from qk_oracle import QKCase
from qk_oracle import oracle as dense_oracle

import fopru_kernels as F
from fopru_kernels import reference

# Segment lengths (tokens): a 4-token image next to a 1024-token one, an empty segment, odd multiples of 4.
RAGGED = (4, 1024, 12, 0, 200, 8, 36)
INT64_MIN = -(2**63)
# Attention cu_seqlens for T = 28 tokens, group 4 (e.g. packed((8, 16, 4))), each breaking one of
# SPEC.md's requirements, which on a GPU only the kernels check: sig all INT64_MIN, idx all -1.
INVALID_CU = [
    [4, 12, 28, 28],  # cu_seqlens[0] != 0
    [-4, 8, 24, 28],  # negative
    [0, 16, 8, 28],  # decreasing
    [0, 8, 24, 24],  # cu_seqlens[S] != T
    [0, 8, 24, 1 << 40],  # far beyond T
    [0, 6, 24, 28],  # n_0 not a multiple of group
]


def packed(lengths, h=2, d=16, dtype=torch.float32, layout="qkv", seed=0, constant_keys=()):
    """q, k (T, H, d) and cu_seqlens for segments of `lengths`. layout 'qkv': views into one (T, 3, H, d)
    projection output (Qwen's qkv Linear, strided); 'hd': (H, T, d) transposed to (T, H, d); 'contiguous';
    'd-strided': every second element of (T, H, 2 d) (rows no kernel can read in 16-byte chunks).
    Segments listed in constant_keys get one key repeated (their received vector is flat: focal takes the
    paid one)."""
    gen = torch.Generator().manual_seed(seed)
    t = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    if layout == "qkv":
        qkv = (torch.randn(t, 3, h, d, generator=gen) * 2).to(dtype)
        q, k = qkv[:, 0], qkv[:, 1]
    elif layout == "hd":
        q, k = (torch.randn(h, t, d, generator=gen).mul(2).to(dtype).transpose(0, 1) for _ in range(2))
    elif layout == "d-strided":
        q, k = (torch.randn(t, h, 2 * d, generator=gen).mul(2).to(dtype)[..., ::2] for _ in range(2))
    else:
        q, k = (torch.randn(t, h, d, generator=gen).mul(2).to(dtype) for _ in range(2))
    for s in constant_keys:
        k[cu[s]:cu[s + 1]] = k[cu[s]].clone()
    return q, k, cu


@dataclass
class Oracle:
    """Per merged token (T / group,): the oracle's significance and the bound of a backend's error on
    it, whether the focal choice of its segment is decided, and the vector not chosen with its bound
    (focal; else sig, bound)."""

    sig: torch.Tensor
    bound: torch.Tensor
    decided: torch.Tensor
    alt: torch.Tensor
    alt_bound: torch.Tensor


def float64_backend(backend: str) -> bool:
    """Whether `backend` computes in float64 (the reference) rather than float32."""
    return (F.default_backend("cpu", "significance_qk_varlen") if backend == "auto" else backend) == "reference"


def oracle(q, k, cu, score, kind, group, scale=None, lse=None, backend="cpu") -> Oracle:
    """The dense float64 oracle on each segment alone (tests/qk_oracle.py), then the group sums; the
    bound is the float32 one, or H * group for a float64 backend (module docstring)."""
    parts = {name: [torch.zeros(0, dtype=dt)] for name, dt in
             (("sig", torch.int64), ("bound", torch.float64), ("decided", torch.bool), ("alt", torch.int64),
              ("alt_bound", torch.float64))}
    bounds = cu.tolist()
    h, d = q.shape[1], q.shape[2]
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            c = QKCase(B=1, N=b - a, H=h, d=d, P=0, score=score, kind=kind, layout="bshd", scale=scale)
            seg_lse = None if lse is None else lse[:, a:b][None]
            got = dense_oracle(c, q[None, a:b], k[None, a:b], seg_lse)
            for name, v in zip(parts, got):
                parts[name].append(v[0].expand(b - a) if name == "decided" else v[0])
    sig, bound, decided, alt, alt_bound = (torch.cat(v) for v in parts.values())
    if float64_backend(backend):
        bound = alt_bound = torch.full_like(bound, float(h))
        decided = torch.ones_like(decided)  # no alternative: the reference makes the oracle's choice
    merged = [x.view(-1, group) for x in (sig, bound, decided, alt, alt_bound)]
    return Oracle(merged[0].sum(1), merged[1].sum(1), merged[2].all(1), merged[3].sum(1), merged[4].sum(1))


def check_sig(sig, want: Oracle, cu, group):
    """sig within the bound of the oracle in every attention segment, or (undecided focal) of the other vector."""
    assert sig.dtype == torch.int64 and sig.shape == want.sig.shape
    sig = sig.cpu()
    err, alt_err = (sig - want.sig).abs().double(), (sig - want.alt).abs().double()
    bounds = (cu // group).tolist()
    for a, b in zip(bounds, bounds[1:]):
        near = bool((err[a:b] <= want.bound[a:b]).all())
        if not near and not want.decided[a:b].all():
            near = bool((alt_err[a:b] <= want.alt_bound[a:b]).all())
        assert near, f"merged tokens [{a}, {b}): error {err[a:b].max().item()} over the bound"


def segment_lse(q, k, cu, scale):
    """What FlashAttention varlen returns as softmax_lse: (H, T) float32, each query over its own segment."""
    lse = torch.empty(q.shape[1], q.shape[0], device=q.device)
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        logits = scale * torch.einsum("ihd,jhd->hij", q[a:b].float(), k[a:b].float())
        lse[:, a:b] = torch.logsumexp(logits, dim=-1)
    return lse


def margin_ok(want: Oracle, select_cu, keep, grids=None):
    """Per selection segment: True where the K-th and (K+1)-th oracle scores (row scores for a grid)
    differ by more than twice the largest bound of the segment and its focal choices are all decided."""
    out, bounds = [], select_cu.tolist()
    for b, ((lo, hi), kk) in enumerate(zip(zip(bounds, bounds[1:]), keep)):
        cols = 1 if grids is None else grids[2 * b + 1]
        top = want.sig[lo:hi].view(-1, cols).sum(dim=1).sort(descending=True).values
        tol = want.bound[lo:hi].view(-1, cols).sum(dim=1).max() if hi > lo else 0.0
        kk //= cols
        wide = kk in (0, top.numel()) or bool(top[kk - 1] - top[kk] > 2 * tol)
        out.append(wide and bool(want.decided[lo:hi].all()))
    return out


def selection_oracle(tokens, sig, select_cu, keep, strategy, grids):
    """(pruned, idx) of reference.select run on each selection segment of sig alone (host tensors)."""
    bounds, parts = select_cu.tolist(), [torch.zeros(0, dtype=torch.int64)]
    for b, kk in enumerate(keep):
        grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
        if bounds[b + 1] > bounds[b]:
            parts.append(reference.select(sig[bounds[b]:bounds[b + 1]][None], kk, strategy, grid)[0] + bounds[b])
    idx = torch.cat(parts)
    return tokens[idx], idx


def check_prune(backend, got, q, k, cu, tokens, keep, strategy, kind, group, select, grids, least):
    """A prune's outputs: idx the oracle's in every selection segment with a decisive margin (at least
    `least` of them), idx the exact selection of the op's own significance everywhere, pruned the
    tokens at idx bit for bit, cu_seqlens_out the prefix sums of keep in select's dtype."""
    pruned, idx, cu_out = (g.cpu() for g in got)
    tokens, select = tokens.cpu(), select.cpu()
    want = oracle(q, k, cu, "focal", kind, group, backend=backend)
    ok = margin_ok(want, select, keep, grids)
    assert sum(ok) >= least, ok
    _, want_idx = selection_oracle(tokens, want.sig, select, keep, strategy, grids)
    sig = F.significance_qk_varlen(q, k, cu, kind=kind, group=group, backend=backend).cpu()
    _, own_idx = selection_oracle(tokens, sig, select, keep, strategy, grids)
    bounds_out = [0, *itertools.accumulate(keep)]
    for b, good in enumerate(ok):
        if good:
            assert torch.equal(idx[bounds_out[b]:bounds_out[b + 1]], want_idx[bounds_out[b]:bounds_out[b + 1]])
    assert torch.equal(idx, own_idx) and torch.equal(pruned, tokens[idx])
    assert cu_out.tolist() == bounds_out and cu_out.dtype == select.dtype

