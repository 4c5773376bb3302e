"""Packed batches from q and k (SPEC.md "Packed batches from q and k"): significance_qk_varlen and
prune_tokens_qk_varlen against the float64 oracle per segment, i.e. the dense reference_qk.significance_qk
run on each attention segment alone (num_prefix = 0), with the group sums and the selection done here.

Until the optimised kernels land, the ops run their own float64 reference (reference_qk.py: closed-form
logit means, blocked prob means, one vectorised pass over the packed batch) and BACKENDS holds 'auto'
(the registered op) and 'reference'. Both compute in float64 like the oracle but in another order, so
`sig` may differ from it by at most one fixed-point step per head and token (a mean that lands within
float64 rounding of a step): |sig - oracle| <= H * group is asserted, and idx is compared exactly
where the oracle's selection margin exceeds twice that (every case checks at least one segment so).
Kernels join BACKENDS with their own float32 bound (see tests/test_qk.py).
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fopru_kernels as F
from fopru_kernels import reference, reference_qk

BACKENDS = ["auto", "reference"]

# Segment lengths (tokens): a 4-token image next to a 1024-token one, an empty segment, odd multiples of 4.
RAGGED = (4, 1024, 12, 0, 200, 8, 36)


def _packed(lengths, h=2, d=16, dtype=torch.float32, layout="qkv", seed=0, constant_keys=()):
    """q, k (T, H, d) and cu_seqlens for segments of `lengths`. layout 'qkv': views into one (T, 3, H, d)
    projection output (Qwen's qkv Linear, strided); 'hd': (H, T, d) transposed to (T, H, d); 'contiguous'.
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
    else:
        q, k = (torch.randn(t, h, d, generator=gen).mul(2).to(dtype) for _ in range(2))
    for s in constant_keys:
        k[cu[s]:cu[s + 1]] = k[cu[s]].clone()
    return q, k, cu


def oracle(q, k, cu, score, kind, group, scale=None, lse=None):
    """The dense float64 oracle on each segment alone, then the group sums."""
    out = [torch.zeros(0, dtype=torch.int64)]
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            seg_lse = None if lse is None else lse[:, a:b][None]
            out.append(reference_qk.significance_qk(q[None, a:b], k[None, a:b], score, 0, scale, seg_lse, kind, "bshd")[0])
    return torch.cat(out).view(-1, group).sum(dim=1)


def segment_lse(q, k, cu, scale):
    """What FlashAttention varlen returns as softmax_lse: (H, T) float32, each query over its own segment."""
    lse = torch.empty(q.shape[1], q.shape[0])
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        logits = scale * torch.einsum("ihd,jhd->hij", q[a:b].float(), k[a:b].float())
        lse[:, a:b] = torch.logsumexp(logits, dim=-1)
    return lse


def margin_ok(sig, select_cu, keep, tol, grids=None):
    """Per selection segment: True where the K-th and (K+1)-th scores (row scores for a grid) differ by
    more than twice their possible error (tol per merged token)."""
    out, bounds = [], select_cu.tolist()
    for b, ((lo, hi), kk) in enumerate(zip(zip(bounds, bounds[1:]), keep)):
        cols = 1 if grids is None else grids[2 * b + 1]
        top = sig[lo:hi].view(-1, cols).sum(dim=1).sort(descending=True).values
        kk //= cols
        out.append(kk in (0, top.numel()) or bool(top[kk - 1] - top[kk] > 2 * tol * cols))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
@pytest.mark.parametrize("group", [1, 4])
def test_ragged_segments_match_the_dense_oracle_per_segment(backend, kind, score, group):
    q, k, cu = _packed(RAGGED, constant_keys=(2,))
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, group=group, backend=backend)
    want = oracle(q, k, cu, score, kind, group)
    assert sig.shape == (sum(RAGGED) // group,) and sig.dtype == torch.int64
    assert (sig - want).abs().max() <= q.shape[1] * group
    if score == "focal" and kind == "logit":  # both vectors are taken somewhere, so a global choice would fail
        received = oracle(q, k, cu, "received", kind, 1)
        taken = [bool(torch.equal(oracle(q[a:b], k[a:b], torch.tensor([0, b - a]), score, kind, 1), received[a:b]))
                 for a, b in zip(cu.tolist(), cu.tolist()[1:]) if b > a]
        assert True in taken and False in taken


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["qkv", "hd", "contiguous"])
def test_dtypes_and_strides(backend, dtype, layout):
    lengths = (16, 64, 4, 40)
    q, k, cu = _packed(lengths, h=3, d=8, dtype=dtype, layout=layout, seed=1)
    assert layout == "contiguous" or not q.is_contiguous()
    for kind in ("logit", "prob"):
        sig = F.significance_qk_varlen(q, k, cu.int(), kind=kind, group=4, backend=backend)
        assert (sig - oracle(q, k, cu, "focal", kind, 4)).abs().max() <= 3 * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_scale_given(backend):
    q, k, cu = _packed((8, 96, 24), seed=2)
    scale = 0.3
    lse = segment_lse(q, k, cu, scale).t().contiguous().t()  # (H, T) with FlashAttention's (T, H)-major strides
    sig = F.significance_qk_varlen(q, k, cu, score="focal", scale=scale, lse=lse, kind="prob", group=4,
                                   backend=backend)
    assert (sig - oracle(q, k, cu, "focal", "prob", 4, scale, lse)).abs().max() <= 2 * 4
    # lse is used as given: a shifted lse scales every probability, so the scores move with it.
    shifted = F.significance_qk_varlen(q, k, cu, score="focal", scale=scale, lse=lse + 1.0, kind="prob", group=4,
                                       backend=backend)
    assert not torch.equal(shifted, sig)


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
    assert torch.equal(sig, F.significance_qk_varlen(q, k, cu, score="focal", kind=kind, group=4))


def _selection_oracle(tokens, sig, select_cu, keep, strategy, grids):
    bounds, parts = select_cu.tolist(), [torch.zeros(0, dtype=torch.int64)]
    for b, kk in enumerate(keep):
        grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
        if bounds[b + 1] > bounds[b]:
            parts.append(reference.select(sig[bounds[b]:bounds[b + 1]][None], kk, strategy, grid)[0] + bounds[b])
    idx = torch.cat(parts)
    return tokens[idx], idx


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_prune_per_attention_segment(backend, kind):
    q, k, cu = _packed(RAGGED, seed=5)
    merged = [n // 4 for n in RAGGED]
    tokens = torch.randn(sum(merged), 24, dtype=torch.bfloat16)
    keep = [1, 100, 0, 0, 50, 2, 9]  # keep = n for the last one
    pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend=backend)
    want = oracle(q, k, cu, "focal", kind, 4)
    ok = margin_ok(want, cu // 4, keep, 2 * 4)
    assert sum(ok) >= 5
    want_pruned, want_idx = _selection_oracle(tokens, want, cu // 4, keep, "rank", None)
    bounds_out = [0, *itertools.accumulate(keep)]
    for b, good in enumerate(ok):
        if good:
            assert torch.equal(idx[bounds_out[b]:bounds_out[b + 1]], want_idx[bounds_out[b]:bounds_out[b + 1]])
    assert torch.equal(pruned, tokens[idx]) and cu_out.tolist() == bounds_out and cu_out.dtype == cu.dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_prune_a_video_over_the_whole_clip(backend, strategy):
    """Attention per frame, selection per media: an image (2 x 3 merged grid) and a 3-frame video of
    2 x 2 merged tokens per frame (grid (6, 2)), as Qwen-VL's full-attention layers see them."""
    lengths = (24, 16, 16, 16)  # tokens: image, then the video's frames
    q, k, cu = _packed(lengths, seed=6)
    select = torch.tensor([0, 6, 18], dtype=torch.int32)
    tokens = torch.randn(18, 8)
    keep, grids = ([3, 4], [2, 3, 6, 2]) if strategy == "row" else ([4, 7], None)
    pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, strategy=strategy, kind="logit", group=4,
                                                   cu_seqlens_select=select, grids=grids, backend=backend)
    sig = oracle(q, k, cu, "focal", "logit", 4)
    assert all(margin_ok(sig, select, keep, 8, grids))
    want_pruned, want_idx = _selection_oracle(tokens, sig, select, keep, strategy, grids)
    assert torch.equal(idx, want_idx) and torch.equal(pruned, want_pruned)
    assert cu_out.dtype == torch.int32 and cu_out.tolist() == [0, keep[0], sum(keep)]


def test_torch_compile_fullgraph():
    q, k, cu = _packed((8, 16), seed=7)
    tokens = torch.randn(6, 4)

    @torch.compile(fullgraph=True)
    def run(t, q, k):
        pruned, idx, cu_out = torch.ops.fopru.prune_tokens_qk_varlen(t * 2, q, k, cu, [1, 2], "rank", "focal", None,
                                                                      None, "logit", 4, None, None)
        return pruned + 1, idx, cu_out

    pruned, idx, cu_out = run(tokens, q, k)
    want_pruned, want_idx, want_cu = reference_qk.prune_tokens_qk_varlen(tokens * 2, q, k, cu, [1, 2], kind="logit",
                                                                         group=4)
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
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", QK_VARLEN_ERRORS)
def test_errors(name, backend):
    over, pattern = QK_VARLEN_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_qk_varlen(**_varlen_qk_args(**over), backend=backend)


def test_backends_without_a_kernel_are_refused():
    args = _varlen_qk_args()
    with pytest.raises(ValueError, match=r"backend='triton' has no Triton kernel for prune_tokens_qk_varlen yet"):
        F.prune_tokens_qk_varlen(**args, backend="triton")
    with pytest.raises(ValueError, match=r"backend='cpu' has no C\+\+ kernel for significance_qk_varlen yet|needs the compiled"):
        F.significance_qk_varlen(args["q"], args["k"], args["cu_seqlens"], backend="cpu")


@pytest.mark.cuda
def test_interim_reference_runs_on_cuda(cuda_device):
    q, k, cu = _packed((16, 64, 8), seed=8)
    tokens = torch.randn(22, 8)
    want = F.prune_tokens_qk_varlen(tokens, q, k, cu, [2, 5, 1], kind="logit", group=4)
    got = F.prune_tokens_qk_varlen(tokens.to(cuda_device), q.to(cuda_device), k.to(cuda_device), cu.to(cuda_device),
                                   [2, 5, 1], kind="logit", group=4)
    assert all(torch.equal(g.cpu(), w) for g, w in zip(got, want))
