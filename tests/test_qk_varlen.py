"""Packed batches from q and k (SPEC.md "Packed batches from q and k"): significance_qk_varlen and
prune_tokens_qk_varlen against the float64 oracle per segment, i.e. the dense reference_qk.significance_qk
run on each attention segment alone (num_prefix = 0), with the group sums and the selection done here.

BACKENDS: the C++ CPU kernel ("cpu", float32 like the dense q/k kernel) and the float64 reference
(reference_qk.py), plus "auto" (whichever of the two serves CPU tensors in this install); with a GPU,
GPU_BACKENDS: the CUDA C++ kernels ("cuda", float32 like the dense CUDA q/k kernels) and, once they
land, the Triton ones. Each is held to its own bound, per merged token:
- a float32 kernel: the dense path's stated bound (tests/qk_oracle.py, derived in tests/test_qk.py),
  computed on each segment as a dense image with no prefix token and summed over the group; for focal,
  a segment whose variance comparison lies within that bound (undecided) may take either vector, whole;
- the reference: it computes in float64 like the oracle but in another order, so `sig` may differ by
  at most one fixed-point step per head and token (a mean within float64 rounding of a step): H * group.
idx is compared exactly in every selection segment whose oracle margin between the K-th and (K+1)-th
score (row score for row) exceeds twice the bound and whose focal choices are all decided; every case
checks at least one segment so. The CUDA kernels are also held to the dense CUDA kernel: each segment's
scores equal its own on that segment alone, bit for bit (cuda/significance_qk_varlen.cu runs its device
code on the same units). Without a GPU, only what needs none is checked here (registration, the texts of
the errors the CUDA entry points raise before any device work). Nothing touches the GPU at import or
collection time.

This file runs past 500 lines: the packed ops' CPU and GPU tests share one oracle, one bound, one set of
cases and one error table, and most tests run every backend through one parametrisation (ALL_BACKENDS).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import pytest
import torch
from cases import QKCase
from qk_oracle import oracle as dense_oracle

import fopru_kernels as F
from fopru_kernels import ops, reference, reference_qk

BACKENDS = ["auto", "reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built"))]
PACKED_OPS = ("significance_qk_varlen", "prune_tokens_qk_varlen")
# On CUDA tensors (marked cuda; they skip without a GPU): the CUDA C++ kernels, and Triton once the packed
# ops have it.
GPU_BACKENDS = [
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.cuda_cxx, pytest.mark.skipif(
        not F.HAS_CUDA_KERNELS, reason="library built without its CUDA kernels")]),
    pytest.param("triton", marks=[pytest.mark.cuda, pytest.mark.skipif(
        bool(ops.WITHOUT_TRITON_KERNELS & set(PACKED_OPS)) or "triton" not in F.available_backends("cuda"),
        reason="no Triton kernel of the packed ops in this install")]),
]
ALL_BACKENDS = BACKENDS + GPU_BACKENDS


def _device(backend: str, request) -> torch.device:
    """Where `backend`'s tests put their tensors: a GPU for the GPU backends (skipping without one)."""
    return request.getfixturevalue("cuda_device") if backend in ("cuda", "triton") else torch.device("cpu")


def _on(device, *tensors):
    return tuple(None if t is None else t.to(device) for t in tensors)

# Segment lengths (tokens): a 4-token image next to a 1024-token one, an empty segment, odd multiples of 4.
RAGGED = (4, 1024, 12, 0, 200, 8, 36)


def _packed(lengths, h=2, d=16, dtype=torch.float32, layout="qkv", seed=0, constant_keys=()):
    """q, k (T, H, d) and cu_seqlens for segments of `lengths`. layout 'qkv': views into one (T, 3, H, d)
    projection output (Qwen's qkv Linear, strided); 'hd': (H, T, d) transposed to (T, H, d); 'contiguous';
    'd-strided': every second element of (T, H, 2 d).
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


def _float64(backend: str) -> bool:
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
    if _float64(backend):
        bound = alt_bound = torch.full_like(bound, float(h))
        decided = torch.ones_like(decided)  # no alternative: the reference makes the oracle's choice
    merged = [x.view(-1, group) for x in (sig, bound, decided, alt, alt_bound)]
    return Oracle(merged[0].sum(1), merged[1].sum(1), merged[2].all(1), merged[3].sum(1), merged[4].sum(1))


def check_sig(sig, want: Oracle, cu, group):
    """sig within the bound of the oracle in every attention segment, or (undecided focal) of the other vector."""
    assert sig.dtype == torch.int64 and sig.shape == want.sig.shape
    err, alt_err = (sig - want.sig).abs().double(), (sig - want.alt).abs().double()
    bounds = (cu // group).tolist()
    for a, b in zip(bounds, bounds[1:]):
        near = bool((err[a:b] <= want.bound[a:b]).all())
        if not near and not want.decided[a:b].all():
            near = bool((alt_err[a:b] <= want.alt_bound[a:b]).all())
        assert near, f"merged tokens [{a}, {b}): error {err[a:b].max().item()} over the bound"


def segment_lse(q, k, cu, scale):
    """What FlashAttention varlen returns as softmax_lse: (H, T) float32, each query over its own segment."""
    lse = torch.empty(q.shape[1], q.shape[0])
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


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
@pytest.mark.parametrize("group", [1, 4])
def test_ragged_segments_match_the_dense_oracle_per_segment(backend, kind, score, group, request):
    q, k, cu = _packed(RAGGED, constant_keys=(2,))
    sig = F.significance_qk_varlen(*_on(_device(backend, request), q, k, cu), score=score, kind=kind, group=group,
                                   backend=backend).cpu()
    want = oracle(q, k, cu, score, kind, group, backend=backend)
    assert sig.shape == (sum(RAGGED) // group,)
    check_sig(sig, want, cu, group)
    if score == "focal" and kind == "logit":  # both vectors are taken somewhere, so a global choice would fail
        received, focal = (oracle(q, k, cu, sc, kind, 1).sig for sc in ("received", "focal"))
        taken = [bool(torch.equal(focal[a:b], received[a:b])) for a, b in zip(cu.tolist(), cu.tolist()[1:]) if b > a]
        assert True in taken and False in taken


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout,d", [("qkv", 8), ("hd", 12), ("contiguous", 16), ("d-strided", 8)])
def test_dtypes_and_strides(backend, dtype, layout, d, request):
    """The CUDA kernels read rows as 16-byte chunks where the layout allows it, element by element
    elsewhere (d = 12: 16-bit rows that are no whole number of chunks; d-strided)."""
    lengths = (16, 64, 4, 40, 132)
    q, k, cu = _packed(lengths, h=3, d=d, dtype=dtype, layout=layout, seed=1)
    assert layout == "contiguous" or not q.is_contiguous()
    for kind in ("logit", "prob"):
        sig = F.significance_qk_varlen(*_on(_device(backend, request), q, k, cu.int()), kind=kind, group=4,
                                       backend=backend).cpu()
        check_sig(sig, oracle(q, k, cu, "focal", kind, 4, backend=backend), cu, 4)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("lse_layout", ["flash", "strided"])
def test_lse_and_scale_given(backend, lse_layout, request):
    q, k, cu = _packed((8, 96, 24, 200), seed=2)
    scale = 0.3
    lse = segment_lse(q, k, cu, scale)
    if lse_layout == "flash":  # (H, T) with FlashAttention's (T, H)-major strides
        lse = lse.t().contiguous().t()
    else:  # every second entry of a wider buffer
        lse = torch.stack((lse, torch.full_like(lse, float("nan"))), dim=-1)[..., 0]
    assert not lse.is_contiguous()
    dq, dk, dcu, dlse = _on(_device(backend, request), q, k, cu, lse)
    for score in ("focal", "received"):
        sig = F.significance_qk_varlen(dq, dk, dcu, score=score, scale=scale, lse=dlse, kind="prob", group=4,
                                       backend=backend).cpu()
        check_sig(sig, oracle(q, k, cu, score, "prob", 4, scale, lse, backend), cu, 4)
    # lse is used as given: a shifted lse scales every probability, so the scores move with it.
    shifted = F.significance_qk_varlen(dq, dk, dcu, score="received", scale=scale, lse=dlse + 1.0, kind="prob",
                                       group=4, backend=backend).cpu()
    assert not torch.equal(shifted, sig)


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
def test_cpu_kernel_scores_a_segment_as_the_dense_kernel_scores_an_image(kind, score):
    """One implementation: each segment's significance is the dense C++ kernel's on that segment alone
    (num_prefix = 0, layout 'bshd', the segment's rows of lse), bit for bit, group sums included."""
    q, k, cu = _packed(RAGGED, seed=9, constant_keys=(2,))
    lse = segment_lse(q, k, cu, 0.25) if kind == "prob" else None
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, lse=lse, group=4, backend="cpu")
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            dense = F.significance_qk(q[None, a:b], k[None, a:b], score=score, num_prefix=0, lse=None if lse is None
                                      else lse[None, :, a:b], kind=kind, layout="bshd", backend="cpu")
            assert torch.equal(sig[a // 4:b // 4], dense[0].view(-1, 4).sum(dim=1))


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_cpu_kernel_does_not_depend_on_the_thread_count(kind):
    """Work items go to whichever thread is free: the result must not depend on it."""
    q, k, cu = _packed(RAGGED, h=3, seed=10)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(F.significance_qk_varlen(q, k, cu, kind=kind, group=4, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_empty_batches(backend, request):
    device = _device(backend, request)
    q, tokens = torch.randn(0, 2, 8, device=device), torch.randn(0, 5, device=device)
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0], dtype=torch.int32)):
        cu = cu.to(device)
        for kind in ("logit", "prob"):
            sig = F.significance_qk_varlen(q, q, cu, kind=kind, group=4, backend=backend)
            assert sig.shape == (0,) and sig.dtype == torch.int64
            pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, q, cu, [0] * (len(cu) - 1), kind=kind, group=4,
                                                           backend=backend)
            assert pruned.shape == (0, 5) and idx.shape == (0,) and torch.equal(cu_out, cu)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_many_small_segments(backend, kind, request):
    """More segments than one CTA of the CUDA plan kernel takes at a time (512), empty ones among them."""
    lengths = (4,) * 150 + (0,) * 300 + (8,) * 80 + (64,)
    q, k, cu = _packed(lengths, seed=12)
    sig = F.significance_qk_varlen(*_on(_device(backend, request), q, k, cu), kind=kind, group=4,
                                   backend=backend).cpu()
    check_sig(sig, oracle(q, k, cu, "focal", kind, 4, backend=backend), cu, 4)


def test_prob_blocks_give_the_unblocked_means(monkeypatch):
    q, k, cu = _packed((4, 300, 52), seed=3)
    whole = reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind="prob")
    monkeypatch.setattr(reference_qk, "_BLOCK", 1000)  # 3 query rows per block in the 300-token segment
    assert (reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind="prob") - whole).abs().max() <= 2


@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_parts_of_head_subsets_add_up(kind):
    """Tensor parallelism: ranks holding disjoint heads all-reduce their parts into the full result."""
    q, k, cu = _packed((8, 64, 28), h=4, seed=4)
    full = reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind=kind)
    ranks = [reference_qk.significance_qk_varlen_parts(q[:, hs], k[:, hs], cu, "focal", kind=kind, scale=16**-0.5)
             for hs in (slice(0, 1), slice(1, 4))]
    assert full.shape == (2, 100)
    assert torch.equal(ranks[0] + ranks[1], full)
    sig = reference_qk.significance_varlen_from_parts(ranks[0] + ranks[1], cu, 4)
    assert torch.equal(sig, F.significance_qk_varlen(q, k, cu, score="focal", kind=kind, group=4, backend="reference"))


def _selection_oracle(tokens, sig, select_cu, keep, strategy, grids):
    bounds, parts = select_cu.tolist(), [torch.zeros(0, dtype=torch.int64)]
    for b, kk in enumerate(keep):
        grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
        if bounds[b + 1] > bounds[b]:
            parts.append(reference.select(sig[bounds[b]:bounds[b + 1]][None], kk, strategy, grid)[0] + bounds[b])
    idx = torch.cat(parts)
    return tokens[idx], idx


def check_prune(backend, got, q, k, cu, tokens, keep, strategy, kind, group, select, grids, least, device="cpu"):
    """A prune's outputs: idx the oracle's in every selection segment with a decisive margin (at least
    `least` of them), idx the exact selection of the op's own significance (on `device`) everywhere,
    pruned the tokens at idx bit for bit, cu_seqlens_out the prefix sums of keep in select's dtype.
    Inputs on the CPU; `got` on any device."""
    pruned, idx, cu_out = (t.cpu() for t in got)
    want = oracle(q, k, cu, "focal", kind, group, backend=backend)
    ok = margin_ok(want, select, keep, grids)
    assert sum(ok) >= least, ok
    _, want_idx = _selection_oracle(tokens, want.sig, select, keep, strategy, grids)
    sig = F.significance_qk_varlen(q.to(device), k.to(device), cu.to(device), kind=kind, group=group,
                                   backend=backend).cpu()
    _, own_idx = _selection_oracle(tokens, sig, select, keep, strategy, grids)
    bounds_out = [0, *itertools.accumulate(keep)]
    for b, good in enumerate(ok):
        if good:
            assert torch.equal(idx[bounds_out[b]:bounds_out[b + 1]], want_idx[bounds_out[b]:bounds_out[b + 1]])
    assert torch.equal(idx, own_idx) and torch.equal(pruned, tokens[idx])
    assert cu_out.tolist() == bounds_out and cu_out.dtype == select.dtype


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_prune_per_attention_segment(backend, kind, request):
    device = _device(backend, request)
    q, k, cu = _packed(RAGGED, seed=5)
    merged = [n // 4 for n in RAGGED]
    tokens = torch.randn(sum(merged), 24, dtype=torch.bfloat16)
    keep = [1, 100, 0, 0, 50, 2, 9]  # keep = n for the last one
    got = F.prune_tokens_qk_varlen(*_on(device, tokens, q, k, cu), keep, kind=kind, group=4, backend=backend)
    check_prune(backend, got, q, k, cu, tokens, keep, "rank", kind, 4, cu // 4, None, least=5, device=device)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_prune_a_video_over_the_whole_clip(backend, strategy, kind, request):
    """Attention per frame, selection per media: an image (2 x 3 merged grid) and a 3-frame video of
    2 x 2 merged tokens per frame (grid (6, 2)), as Qwen-VL's full-attention layers see them."""
    lengths = (24, 16, 16, 16)  # tokens: image, then the video's frames
    q, k, cu = _packed(lengths, seed=6)
    select = torch.tensor([0, 6, 18], dtype=torch.int32)
    tokens = torch.randn(18, 8)
    keep, grids = ([3, 4], [2, 3, 6, 2]) if strategy == "row" else ([4, 7], None)
    device = _device(backend, request)
    got = F.prune_tokens_qk_varlen(*_on(device, tokens, q, k, cu), keep, strategy=strategy, kind=kind, group=4,
                                   cu_seqlens_select=select.to(device), grids=grids, backend=backend)
    check_prune(backend, got, q, k, cu, tokens, keep, strategy, kind, 4, select, grids, least=2, device=device)


def test_torch_compile_fullgraph():
    q, k, cu = _packed((8, 16), seed=7)
    tokens = torch.randn(6, 4)

    @torch.compile(fullgraph=True)
    def run(t, q, k):
        pruned, idx, cu_out = torch.ops.fopru.prune_tokens_qk_varlen(t * 2, q, k, cu, [1, 2], "rank", "focal", None,
                                                                      None, "logit", 4, None, None)
        return pruned + 1, idx, cu_out

    pruned, idx, cu_out = run(tokens, q, k)
    want_pruned, want_idx, want_cu = F.prune_tokens_qk_varlen(tokens * 2, q, k, cu, [1, 2], kind="logit", group=4)
    assert torch.equal(idx, want_idx) and torch.equal(pruned, want_pruned + 1) and torch.equal(cu_out, want_cu)


def test_mrope_positions_by_hand():
    # An image of 4 x 6 patches (merged tokens 0-5: 2 x 3) and a video of 2 frames of 4 x 4 patches
    # (merged tokens 6-13: frame 0 is 6-9, frame 1 is 10-13, each 2 x 2).
    idx = torch.tensor([0, 4, 5, 6, 9, 12, 13])
    pos = F.mrope_positions(idx, [[1, 4, 6], [2, 4, 4]])
    assert pos.tolist() == [
        [0, 0, 0, 0, 0, 1, 1],  # t
        [0, 1, 1, 0, 1, 1, 1],  # h
        [0, 1, 2, 0, 1, 0, 1],  # w
    ]
    assert pos.dtype == torch.int64
    assert F.mrope_positions(torch.zeros(0, dtype=torch.int64), torch.zeros(0, 3, dtype=torch.int64)).shape == (3, 0)
    with pytest.raises(ValueError, match="multiples of merge_size = 2"):
        F.mrope_positions(idx, [[1, 3, 6]])
    with pytest.raises(ValueError, match=r"idx must be a \(T',\) int64 tensor"):
        F.mrope_positions(idx.int(), [[1, 4, 6]])


def _varlen_qk_args(**over):
    q, k, cu = _packed((8, 4), h=2, d=4)
    args = dict(tokens=torch.randn(3, 5), q=q, k=k, cu_seqlens=cu, keep=[1, 1], strategy="rank", score="focal",
                scale=None, lse=None, kind="logit", group=4, cu_seqlens_select=None, grids=None)
    args.update(over)
    return args


QK_VARLEN_ERRORS = {
    "q-4d": (dict(q=torch.randn(1, 12, 2, 4)), r"q must be 3-D \(T, H, d\), got 4-D"),
    "q-dtype": (dict(q=torch.randn(12, 2, 4).double()), r"q must be float16, bfloat16 or float32, got float64"),
    "k-shape": (dict(k=torch.randn(12, 2, 5)), r"k must have q's shape \(12, 2, 4\), got \(12, 2, 5\)"),
    "cls": (dict(score="cls"), r"score must be 'focal' or 'received' \(packed segments have no CLS token\), got 'cls'"),
    "kind": (dict(kind="softmax"), r"kind must be 'prob' or 'logit', got 'softmax'"),
    "no-heads": (dict(q=torch.randn(12, 0, 4), k=torch.randn(12, 0, 4)), r"q must have at least one head"),
    "scale": (dict(scale=float("inf")), r"scale must be a finite nonzero float or None, got inf"),
    "group": (dict(group=0), r"group must be an int >= 1, got 0"),
    "group-T": (dict(group=5), r"q.shape\[0\] \(T\) = 12 must be a multiple of group = 5"),
    "cu-dtype": (dict(cu_seqlens=torch.tensor([0.0, 12.0])), r"cu_seqlens must be a 1-D \(S \+ 1,\) int32 or int64"),
    "lse-logit": (dict(lse=torch.zeros(2, 12)), r"lse is only used with kind='prob'"),
    "lse-shape": (dict(lse=torch.zeros(12, 2), kind="prob"),
                  r"lse must be a float32 tensor of shape \(H, T\) = \(2, 12\), got float32 \(12, 2\)"),
    "cu-start": (dict(cu_seqlens=torch.tensor([4, 8, 12])), r"cu_seqlens\[0\] must be 0, got 4"),
    "cu-end": (dict(cu_seqlens=torch.tensor([0, 8, 8])), r"cu_seqlens\[S\] must equal q.shape\[0\] \(T\) = 12, got 8"),
    "cu-decreasing": (dict(cu_seqlens=torch.tensor([0, 16, 12])),
                      r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\] = 16 > cu_seqlens\[2\] = 12"),
    "segment-group": (dict(cu_seqlens=torch.tensor([0, 6, 12])),
                      r"segment 0 has n = 6 tokens \(from cu_seqlens\), not a multiple of group = 4"),
    "heads": (dict(q=torch.zeros(1, 1, 1).expand(12, 2**24 + 1, 4), k=torch.zeros(1, 1, 1).expand(12, 2**24 + 1, 4)),
              r"q has too many heads for exact int64 sums: H \* group \* W' = 16777217 \* 4 \* 1 = 67108868 exceeds 2\^26"),
    "tokens-3d": (dict(tokens=torch.randn(1, 3, 5)), r"tokens must be 2-D \(T / group, D\), got 3-D"),
    "tokens-count": (dict(tokens=torch.randn(4, 5)), r"tokens.shape\[0\] must equal q.shape\[0\] / group = 12 / 4 = 3, got 4"),
    "keep-count": (dict(keep=[1]), r"keep must hold B = len\(cu_seqlens / group\) - 1 = 2 ints, got 1"),
    "keep-large": (dict(keep=[1, 2]), r"keep\[1\] must be in \[0, n\] = \[0, 1\] \(n from cu_seqlens / group\), got 2"),
    "select-dtype": (dict(cu_seqlens_select=torch.tensor([0.0, 3.0]), keep=[1]),
                     r"cu_seqlens_select must be a 1-D \(B \+ 1,\) int32 or int64 tensor"),
    "select-end": (dict(cu_seqlens_select=torch.tensor([0, 2]), keep=[1]),
                   r"cu_seqlens_select\[B\] must equal tokens.shape\[0\] \(T\) = 3, got 2"),
    "row-grids": (dict(strategy="row", cu_seqlens_select=torch.tensor([0, 3]), keep=[2], grids=[1, 3]),
                  r"keep\[0\] must be a multiple of cols = 3 for strategy='row', got 2"),
    "k-dtype": (dict(k=torch.randn(12, 2, 4).half()), r"k must have q's dtype float32, got float16"),
    "lse-dtype": (dict(lse=torch.zeros(2, 12, dtype=torch.float64), kind="prob"),
                  r"lse must be a float32 tensor of shape \(H, T\) = \(2, 12\), got float64 \(2, 12\)"),
    "tokens-dtype": (dict(tokens=torch.randn(3, 5).double()), r"tokens must be float16, bfloat16 or float32, got float64"),
    "keep-negative": (dict(keep=[1, -1]), r"keep must be >= 0 for every image, got \[1, -1\]"),
    "keep-per-group": (dict(cu_seqlens=torch.tensor([0, 4, 8, 12]), keep=[1, 1]),
                       r"keep must hold B = len\(cu_seqlens / group\) - 1 = 3 ints, got 2"),
    "row-no-grids": (dict(strategy="row"), r"strategy='row' needs grids=\[rows_0, cols_0, rows_1, cols_1, ...\]"),
    "select-start": (dict(cu_seqlens_select=torch.tensor([1, 3]), keep=[1]), r"cu_seqlens_select\[0\] must be 0, got 1"),
    "select-decreasing": (dict(cu_seqlens_select=torch.tensor([0, 3, 2, 3]), keep=[0, 0, 0]),
                          r"cu_seqlens_select must be non-decreasing, got cu_seqlens_select\[1\] = 3 > "
                          r"cu_seqlens_select\[2\] = 2"),
    "select-grid": (dict(strategy="row", cu_seqlens_select=torch.tensor([0, 3]), keep=[3], grids=[2, 3]),
                    r"grids\[0\] = \(2, 3\) must have rows \* cols == n = 3 \(n from cu_seqlens_select\)"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", QK_VARLEN_ERRORS)
def test_errors(name, backend):
    over, pattern = QK_VARLEN_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_qk_varlen(**_varlen_qk_args(**over), backend=backend)


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@pytest.mark.parametrize("name", QK_VARLEN_ERRORS)
def test_cxx_and_python_checks_give_the_same_text(name):
    """csrc/checks.cpp (check_significance_qk_varlen, check_prune_qk_varlen, check_segments) against
    fopru_kernels/_checks.py, word for word: on the prune, which every case breaks, and on
    significance_qk_varlen with the same scoring arguments (which only some cases break)."""
    args = _varlen_qk_args(**QK_VARLEN_ERRORS[name][0])
    score_args = {n: args[n] for n in ("q", "k", "cu_seqlens", "score", "scale", "lse", "kind", "group")}
    for op, op_args in ((F.prune_tokens_qk_varlen, args), (F.significance_qk_varlen, score_args)):
        texts = []
        for backend in ("reference", "cpu"):
            try:
                op(**op_args, backend=backend)
                texts.append(None)
            except ValueError as e:
                texts.append(str(e))
        assert texts[0] == texts[1]
        assert op is F.significance_qk_varlen or texts[0] is not None


def test_forced_gpu_backends_on_cpu_tensors_are_refused_clearly():
    args = _varlen_qk_args()
    if "prune_tokens_qk_varlen" in ops.WITHOUT_TRITON_KERNELS:
        with pytest.raises(ValueError, match=r"backend='triton' has no Triton kernel for prune_tokens_qk_varlen yet"):
            F.prune_tokens_qk_varlen(**args, backend="triton")
    cuda = (r"backend='cuda' needs CUDA tensors, got cpu" if F.HAS_CUDA_KERNELS
            else r"backend='cuda' needs the library built with its CUDA kernels")
    with pytest.raises(ValueError, match=cuda):
        F.significance_qk_varlen(args["q"], args["k"], args["cu_seqlens"], backend="cuda")
    with pytest.raises(ValueError, match=cuda):
        F.prune_tokens_qk_varlen(**args, backend="cuda")


# ----------------------------------------------------------------------------- the CUDA kernels, without a GPU

needs_cuda_build = pytest.mark.skipif(not ops.CUDA_KERNEL_OPS, reason="library built without its CUDA kernels")


def _cxx_cuda_kernel(op: str):
    """The C++ CUDA kernel of `op` as a callable on any tensors, wherever ops.py left it (its own CUDA slot,
    or fopru_cxx::<op> where a Python kernel took the slot). Only for calls its checks refuse: a call they
    accept would go on to launch on the tensors' memory."""
    name = f"fopru_cxx::{op}" if hasattr(torch.ops.fopru_cxx, op) else f"fopru::{op}"
    kernel = torch.library.get_kernel(name, "CUDA")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args: kernel.call_boxed(keys, *args)


@needs_cuda_build
@pytest.mark.parametrize("op", PACKED_OPS)
def test_cuda_kernels_are_registered(op):
    dump = torch._C._dispatch_dump(f"fopru::{op}")
    assert re.search(r"^CUDA( \(inactive\))?: registered at \S*csrc/cuda/significance_qk_varlen\.cu", dump, re.M), dump
    assert op in ops.CUDA_KERNEL_OPS and F.HAS_CUDA_KERNELS and "cuda" in F.available_backends("cuda")
    # On CUDA tensors the default runs Triton where the op has it, else this kernel.
    assert F.default_backend("cuda", op) == ("triton" if op in ops.INSTALL.triton_ops else "cuda")


@needs_cuda_build
@pytest.mark.parametrize("name", QK_VARLEN_ERRORS)
def test_cuda_entry_points_check_with_the_shared_texts(name):
    """The CUDA entry points run csrc/checks.cpp before any device work: on CPU tensors (so without a GPU)
    each bad argument gets the reference's text, from the prune and, where the scoring arguments are bad
    too, from significance_qk_varlen."""
    args = _varlen_qk_args(**QK_VARLEN_ERRORS[name][0])
    score_args = {n: args[n] for n in ("q", "k", "cu_seqlens", "score", "scale", "lse", "kind", "group")}
    refused = 0
    for op, op_args in zip(PACKED_OPS, (score_args, args)):
        try:
            getattr(F, op)(**op_args, backend="reference")
            continue  # accepted: the CUDA kernel would launch on host memory
        except ValueError as e:
            want = str(e)
        names = [a.name for a in getattr(torch.ops.fopru, op).default._schema.arguments]
        with pytest.raises(ValueError) as got:
            _cxx_cuda_kernel(op)(*(op_args[n] for n in names))
        assert str(got.value) == want
        refused += 1
    assert refused >= 1


@needs_cuda_build
def test_cuda_head_dim_cap_text():
    """SPEC.md's CUDA limit, raised after the checks and before any device work (so on CPU tensors too)."""
    q, cu = torch.zeros(8, 1, 8193), torch.tensor([0, 8])
    pattern = r"fopru: significance_qk_varlen supports head dim d <= 8192 on CUDA, got 8193"
    with pytest.raises(RuntimeError, match=pattern):
        _cxx_cuda_kernel("significance_qk_varlen")(q, q, cu, "focal", None, None, "logit", 4)
    with pytest.raises(RuntimeError, match=pattern):
        _cxx_cuda_kernel("prune_tokens_qk_varlen")(torch.zeros(2, 3), q, q, cu, [1], "rank", "focal", None, None,
                                                   "logit", 4, None, None)


# ----------------------------------------------------------------------------- GPU

needs_cuda_kernels = pytest.mark.skipif(not F.HAS_CUDA_KERNELS, reason="library built without its CUDA kernels")


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.cuda_cxx
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,given_lse", [("logit", False), ("prob", False), ("prob", True)])
@pytest.mark.parametrize("score", ["focal", "received"])
def test_cuda_kernel_scores_a_segment_as_the_dense_kernel_scores_an_image(cuda_device, dtype, kind, given_lse, score):
    """One implementation: each segment's significance is the dense CUDA kernel's on that segment alone
    (num_prefix = 0, layout 'bshd', the segment's rows of lse), bit for bit, group sums included; the
    segments span one to 32 key blocks (1, 3 and 4 groups of them) in one launch."""
    lengths = RAGGED + (300, 2048)
    q, k, cu = _packed(lengths, dtype=dtype, seed=9, constant_keys=(2,))
    lse = segment_lse(q, k, cu, 0.25) if given_lse else None
    q, k, cu, lse = _on(cuda_device, q, k, cu, lse)
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, lse=lse, group=4, backend="cuda")
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            dense = F.significance_qk(q[None, a:b], k[None, a:b], score=score, num_prefix=0, kind=kind, layout="bshd",
                                      lse=None if lse is None else lse[None, :, a:b], backend="cuda")
            assert torch.equal(sig[a // 4:b // 4], dense[0].view(-1, 4).sum(dim=1)), (a, b)


# Attention segments of T = 24 tokens (group 4) that break SPEC.md's requirements; the GPU kernels check
# them on the device (no sync) and answer with INT64_MIN scores, idx -1 and zero rows.
INVALID_CU = {
    "start": [4, 8, 24],
    "end": [0, 8, 20],
    "decreasing": [0, 16, 8, 24],
    "group": [0, 6, 24],
    "negative": [0, -4, 24],
    "past-T": [0, 28, 24],
    "no-segment": [0],
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("name", INVALID_CU)
def test_invalid_cu_seqlens_gpu(cuda_device, backend, cu_dtype, name):
    q, k, _ = _packed((24,), d=8, seed=13)
    q, k = _on(cuda_device, q, k)
    cu = torch.tensor(INVALID_CU[name], dtype=cu_dtype, device=cuda_device)
    tokens = torch.randn(6, 5, device=cuda_device)
    s = len(INVALID_CU[name]) - 1
    for kind in ("logit", "prob"):
        for score in ("focal", "received"):
            sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, group=4, backend=backend)
            assert torch.equal(sig.cpu(), torch.full((6,), -(2**63), dtype=torch.int64))
        for select, keep in ((None, [1] * s), (torch.tensor([0, 2, 6], dtype=cu_dtype, device=cuda_device), [1, 3])):
            pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4,
                                                           cu_seqlens_select=select, backend=backend)
            assert torch.equal(idx.cpu(), torch.full((sum(keep),), -1, dtype=torch.int64))
            assert torch.equal(pruned.cpu(), torch.zeros(sum(keep), 5))
            assert cu_out.tolist() == [0, *itertools.accumulate(keep)] and cu_out.dtype == cu_dtype


# Same T and S, the segment bounds moved: a graph captured on the first replays the others.
GRAPH_LENGTHS = [(64, 200, 8, 36), (36, 64, 200, 8), (200, 8, 36, 64)]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_cuda_graph(cuda_device, backend, kind):
    """Capture once, replay on new q, k, tokens and cu_seqlens: no host sync (cu_seqlens is read on the
    device only), no allocation outside the graph's pool."""
    keep = [5, 2, 1, 2]  # <= every batch's n / 4 at each position
    inputs = []
    for i, lengths in enumerate(GRAPH_LENGTHS):
        q, k, cu = _packed(lengths, seed=20 + i)
        inputs.append((torch.randn(77, 16, generator=torch.Generator().manual_seed(i)), q, k, cu.int()))
    tokens, q, k, cu = _on(cuda_device, *inputs[0])

    def run():
        pruned = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend=backend)
        return pruned, F.significance_qk_varlen(q, k, cu, kind=kind, group=4, backend=backend)

    run()  # compile / opt in outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, sig = run()
    for t_cpu, q_cpu, k_cpu, cu_cpu in inputs[1:] + inputs[:1]:
        for dst, src in zip((tokens, q, k, cu), (t_cpu, q_cpu, k_cpu, cu_cpu)):
            dst.copy_(src)
        graph.replay()
        check_sig(sig.cpu(), oracle(q_cpu, k_cpu, cu_cpu, "focal", kind, 4, backend=backend), cu_cpu, 4)
        check_prune(backend, got, q_cpu, k_cpu, cu_cpu, t_cpu, keep, "rank", kind, 4, cu_cpu // 4, None, least=1,
                    device=cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("op", PACKED_OPS)
def test_default_on_cuda_tensors(cuda_device, op):
    """backend='auto' on CUDA tensors: Triton where the op has it, else the CUDA C++ kernel, else (a build
    without its CUDA kernels) the float64 reference; each within its own bound."""
    want = "triton" if op in ops.INSTALL.triton_ops else "cuda" if op in ops.CUDA_KERNEL_OPS else "reference"
    assert F.default_backend("cuda", op) == want
    q, k, cu = _packed((16, 64, 8), seed=8)
    tokens = torch.randn(22, 8)
    if op == "significance_qk_varlen":
        sig = F.significance_qk_varlen(*_on(cuda_device, q, k, cu), kind="logit", group=4)
        check_sig(sig.cpu(), oracle(q, k, cu, "focal", "logit", 4, backend=want), cu, 4)
        return
    got = F.prune_tokens_qk_varlen(*_on(cuda_device, tokens, q, k, cu), [2, 5, 1], kind="logit", group=4)
    check_prune(want, got, q, k, cu, tokens, [2, 5, 1], "rank", "logit", 4, cu // 4, None, least=1, device=cuda_device)


@pytest.mark.cuda
@needs_cuda_kernels
@pytest.mark.cuda_cxx
def test_cuda_head_dim_cap_gpu(cuda_device):
    for t in (8, 0):
        q = torch.zeros(t, 1, 8193, device=cuda_device)
        cu = torch.tensor([0, t], device=cuda_device)
        with pytest.raises(RuntimeError, match=r"significance_qk_varlen supports head dim d <= 8192 on CUDA, got 8193"):
            F.significance_qk_varlen(q, q, cu, kind="logit", group=4, backend="cuda")
    q = torch.randn(8, 1, 8192, device=cuda_device)
    sig = F.significance_qk_varlen(q, q, torch.tensor([0, 8], device=cuda_device), kind="logit", group=4,
                                   backend="cuda")
    assert sig.shape == (2,)
