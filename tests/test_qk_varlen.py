"""Packed batches from q and k (SPEC.md "Packed batches from q and k"): significance_qk_varlen and
prune_tokens_qk_varlen against the float64 oracle per segment, i.e. the dense reference_qk.significance_qk
run on each attention segment alone (num_prefix = 0), with the group sums and the selection done here.

BACKENDS: the C++ CPU kernel ("cpu", float32 like the dense q/k kernel), the Triton kernels ("triton",
float32, on CPU tensors under TRITON_INTERPRET=1) and the float64 reference (reference_qk.py), plus
"auto" (whichever serves CPU tensors in this install). Each is held to its own bound, per merged token
(the oracle and the checks: tests/qk_varlen_oracle.py):
- a float32 kernel: the dense path's stated bound (tests/qk_oracle.py, derived in tests/test_qk.py),
  computed on each segment as a dense image with no prefix token and summed over the group; for focal,
  a segment whose variance comparison lies within that bound (undecided) may take either vector, whole;
- the reference: it computes in float64 like the oracle but in another order, so `sig` may differ by
  at most one fixed-point step per head and token (a mean within float64 rounding of a step): H * group.
idx is compared exactly in every selection segment whose oracle margin between the K-th and (K+1)-th
score (row score for row) exceeds twice the bound and whose focal choices are all decided; every case
checks at least one segment so. On a GPU (marker cuda) the GPU kernels run the same checks with the same
float32 bound, plus CUDA graph capture, torch.compile and the device-side checks of cu_seqlens; the Triton
kernels' own launch shapes and device checks on CPU tensors are tests/test_qk_varlen_triton.py's, the CUDA
C++ kernels' own cases tests/test_qk_varlen_cuda.py's (their error texts are checked here, by the table).
"""
from __future__ import annotations

import itertools

import pytest
import torch
from conftest import gpu_backends
from qk_varlen_oracle import INT64_MIN, INVALID_CU, RAGGED, check_prune, check_sig, margin_ok, oracle, packed, segment_lse

import fopru_kernels as F
from fopru_kernels import reference_qk

PACKED_OPS = frozenset({"significance_qk_varlen", "prune_tokens_qk_varlen"})
BACKENDS = ["auto", "reference",
            pytest.param("cpu", marks=pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")),
            pytest.param("triton", marks=pytest.mark.skipif(
                "triton" not in F.available_backends("cpu"), reason="Triton on CPU tensors needs TRITON_INTERPRET=1"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
@pytest.mark.parametrize("group", [1, 4])
def test_ragged_segments_match_the_dense_oracle_per_segment(backend, kind, score, group):
    q, k, cu = packed(RAGGED, constant_keys=(2,))
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, group=group, backend=backend)
    want = oracle(q, k, cu, score, kind, group, backend=backend)
    assert sig.shape == (sum(RAGGED) // group,)
    check_sig(sig, want, cu, group)
    if score == "focal" and kind == "logit":  # both vectors are taken somewhere, so a global choice would fail
        received, focal = (oracle(q, k, cu, sc, kind, 1).sig for sc in ("received", "focal"))
        taken = [bool(torch.equal(focal[a:b], received[a:b])) for a, b in zip(cu.tolist(), cu.tolist()[1:]) if b > a]
        assert True in taken and False in taken


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout", ["qkv", "hd", "contiguous"])
def test_dtypes_and_strides(backend, dtype, layout):
    lengths = (16, 64, 4, 40)
    q, k, cu = packed(lengths, h=3, d=8, dtype=dtype, layout=layout, seed=1)
    assert layout == "contiguous" or not q.is_contiguous()
    for kind in ("logit", "prob"):
        sig = F.significance_qk_varlen(q, k, cu.int(), kind=kind, group=4, backend=backend)
        check_sig(sig, oracle(q, k, cu, "focal", kind, 4, backend=backend), cu, 4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lse_layout", ["flash", "strided"])
def test_lse_and_scale_given(backend, lse_layout):
    q, k, cu = packed((8, 96, 24), seed=2)
    scale = 0.3
    lse = segment_lse(q, k, cu, scale)
    if lse_layout == "flash":  # (H, T) with FlashAttention's (T, H)-major strides
        lse = lse.t().contiguous().t()
    else:  # every second entry of a wider buffer
        lse = torch.stack((lse, torch.full_like(lse, float("nan"))), dim=-1)[..., 0]
    assert not lse.is_contiguous()
    sig = F.significance_qk_varlen(q, k, cu, score="focal", scale=scale, lse=lse, kind="prob", group=4,
                                   backend=backend)
    check_sig(sig, oracle(q, k, cu, "focal", "prob", 4, scale, lse, backend), cu, 4)
    # lse is used as given: a shifted lse scales every probability, so the scores move with it.
    shifted = F.significance_qk_varlen(q, k, cu, score="focal", scale=scale, lse=lse + 1.0, kind="prob", group=4,
                                       backend=backend)
    assert not torch.equal(shifted, sig)


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
def test_cpu_kernel_scores_a_segment_as_the_dense_kernel_scores_an_image(kind, score):
    """One implementation: each segment's significance is the dense C++ kernel's on that segment alone
    (num_prefix = 0, layout 'bshd', the segment's rows of lse), bit for bit, group sums included."""
    q, k, cu = packed(RAGGED, seed=9, constant_keys=(2,))
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
    q, k, cu = packed(RAGGED, h=3, seed=10)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(F.significance_qk_varlen(q, k, cu, kind=kind, group=4, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(got[0], got[1]) and torch.equal(got[0], got[2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batches(backend):
    q = torch.randn(0, 2, 8)
    for cu in (torch.tensor([0]), torch.tensor([0, 0, 0], dtype=torch.int32)):
        sig = F.significance_qk_varlen(q, q, cu, kind="prob", group=4, backend=backend)
        assert sig.shape == (0,) and sig.dtype == torch.int64
        pruned, idx, cu_out = F.prune_tokens_qk_varlen(torch.randn(0, 5), q, q, cu, [0] * (len(cu) - 1), group=4,
                                                       backend=backend)
        assert pruned.shape == (0, 5) and idx.shape == (0,) and torch.equal(cu_out, cu)


def test_prob_blocks_give_the_unblocked_means(monkeypatch):
    q, k, cu = packed((4, 300, 52), seed=3)
    whole = reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind="prob")
    monkeypatch.setattr(reference_qk, "_BLOCK", 1000)  # 3 query rows per block in the 300-token segment
    assert (reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind="prob") - whole).abs().max() <= 2


@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_parts_of_head_subsets_add_up(kind):
    """Tensor parallelism: ranks holding disjoint heads all-reduce their parts into the full result."""
    q, k, cu = packed((8, 64, 28), h=4, seed=4)
    full = reference_qk.significance_qk_varlen_parts(q, k, cu, "focal", kind=kind)
    ranks = [reference_qk.significance_qk_varlen_parts(q[:, hs], k[:, hs], cu, "focal", kind=kind, scale=16**-0.5)
             for hs in (slice(0, 1), slice(1, 4))]
    assert full.shape == (2, 100)
    assert torch.equal(ranks[0] + ranks[1], full)
    sig = reference_qk.significance_varlen_from_parts(ranks[0] + ranks[1], cu, 4)
    assert torch.equal(sig, F.significance_qk_varlen(q, k, cu, score="focal", kind=kind, group=4, backend="reference"))



@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_prune_per_attention_segment(backend, kind):
    q, k, cu = packed(RAGGED, seed=5)
    merged = [n // 4 for n in RAGGED]
    tokens = torch.randn(sum(merged), 24, dtype=torch.bfloat16)
    keep = [1, 100, 0, 0, 50, 2, 9]  # keep = n for the last one
    got = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend=backend)
    check_prune(backend, got, q, k, cu, tokens, keep, "rank", kind, 4, cu // 4, None, least=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_prune_a_video_over_the_whole_clip(backend, strategy, kind):
    """Attention per frame, selection per media: an image (2 x 3 merged grid) and a 3-frame video of
    2 x 2 merged tokens per frame (grid (6, 2)), as Qwen-VL's full-attention layers see them."""
    lengths = (24, 16, 16, 16)  # tokens: image, then the video's frames
    q, k, cu = packed(lengths, seed=6)
    select = torch.tensor([0, 6, 18], dtype=torch.int32)
    tokens = torch.randn(18, 8)
    keep, grids = ([3, 4], [2, 3, 6, 2]) if strategy == "row" else ([4, 7], None)
    got = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, strategy=strategy, kind=kind, group=4,
                                   cu_seqlens_select=select, grids=grids, backend=backend)
    check_prune(backend, got, q, k, cu, tokens, keep, strategy, kind, 4, select, grids, least=2)


def test_torch_compile_fullgraph():
    q, k, cu = packed((8, 16), seed=7)
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
    q, k, cu = packed((8, 4), h=2, d=4)
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
    """backend='cuda' on CPU tensors: a clear refusal."""
    args = _varlen_qk_args()
    cuda = (r"backend='cuda' needs CUDA tensors, got cpu" if F.HAS_CUDA_KERNELS
            else r"backend='cuda' needs the library built with its CUDA kernels")
    with pytest.raises(ValueError, match=cuda):
        F.significance_qk_varlen(args["q"], args["k"], args["cu_seqlens"], backend="cuda")
    with pytest.raises(ValueError, match=cuda):
        F.prune_tokens_qk_varlen(**args, backend="cuda")


def _cxx_cuda_kernel(op: str):
    """The C++ CUDA kernel of `op` as a callable on any tensors, wherever registration.py left it (its own
    CUDA slot, or fopru_cxx::<op> where a Python kernel took the slot). Only for calls its checks refuse:
    a call they accept would go on to launch on the tensors' memory."""
    name = f"fopru_cxx::{op}" if ("fopru_cxx::" + op) in torch._C._dispatch_get_all_op_names() else f"fopru::{op}"
    kernel = torch.library.get_kernel(name, "CUDA")
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)
    return lambda *args: kernel.call_boxed(keys, *args)


needs_cuda_cxx = pytest.mark.skipif(not PACKED_OPS <= F.ops.CUDA_KERNEL_OPS,
                                    reason="no CUDA C++ kernel of the packed ops in this build")


@needs_cuda_cxx
@pytest.mark.parametrize("name", QK_VARLEN_ERRORS)
def test_cuda_entry_points_check_with_the_shared_texts(name):
    """The CUDA C++ entry points run csrc/checks.cpp before any device work: on CPU tensors (so without a
    GPU) each bad argument gets the reference's text, from the prune and, where the scoring arguments
    are bad too, from significance_qk_varlen."""
    args = _varlen_qk_args(**QK_VARLEN_ERRORS[name][0])
    score_args = {n: args[n] for n in ("q", "k", "cu_seqlens", "score", "scale", "lse", "kind", "group")}
    refused = 0
    for op, op_args in (("significance_qk_varlen", score_args), ("prune_tokens_qk_varlen", args)):
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


@needs_cuda_cxx
def test_cuda_head_dim_cap_text():
    """SPEC.md's CUDA limit, raised after the checks and before any device work (so on CPU tensors too)."""
    q, cu = torch.zeros(8, 1, 8193), torch.tensor([0, 8])
    pattern = r"fopru: significance_qk_varlen supports head dim d <= 8192 on CUDA, got 8193"
    with pytest.raises(RuntimeError, match=pattern):
        _cxx_cuda_kernel("significance_qk_varlen")(q, q, cu, "focal", None, None, "logit", 4)
    with pytest.raises(RuntimeError, match=pattern):
        _cxx_cuda_kernel("prune_tokens_qk_varlen")(torch.zeros(2, 3), q, q, cu, [1], "rank", "focal", None, None,
                                                   "logit", 4, None, None)


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
@pytest.mark.parametrize("group", [1, 4])
def test_gpu_ragged_segments(cuda_device, backend, kind, score, group):
    q, k, cu = packed(RAGGED, h=4, d=80, dtype=torch.float16, constant_keys=(2,))
    dq, dk, dcu = q.to(cuda_device), k.to(cuda_device), cu.to(cuda_device, torch.int32)
    sig = F.significance_qk_varlen(dq, dk, dcu, score=score, kind=kind, group=group, backend=backend)
    check_sig(sig, oracle(q, k, cu, score, kind, group, backend=backend), cu, group)
    if kind == "prob":  # FlashAttention's lse layout: (H, T) with (T, H)-major strides
        lse = segment_lse(dq, dk, dcu, 80**-0.5).t().contiguous().t()
        sig = F.significance_qk_varlen(dq, dk, dcu, score=score, lse=lse, kind=kind, group=group, backend=backend)
        check_sig(sig, oracle(q, k, cu, score, kind, group, lse=lse.cpu(), backend=backend), cu, group)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("strategy", ["rank", "row"])
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_gpu_prune_a_video_over_the_whole_clip(cuda_device, backend, strategy, kind):
    q, k, cu = packed((24, 16, 16, 16), seed=6)
    select = torch.tensor([0, 6, 18], dtype=torch.int32)
    tokens = torch.randn(18, 8)
    keep, grids = ([3, 4], [2, 3, 6, 2]) if strategy == "row" else ([4, 7], None)
    dev = [t.to(cuda_device) for t in (tokens, q, k, cu, select)]
    got = F.prune_tokens_qk_varlen(*dev[:4], keep, strategy=strategy, kind=kind, group=4, cu_seqlens_select=dev[4],
                                   grids=grids, backend=backend)
    check_prune(backend, got, *dev[1:4], tokens, keep, strategy, kind, 4, select, grids, least=2)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_invalid_cu_seqlens(cuda_device, backend):
    """On a GPU nobody reads cu_seqlens on the host: the kernels check it, sig is all INT64_MIN and every
    idx -1 with zero rows, nothing raises, nothing is read out of bounds."""
    q, k, cu = packed((8, 16, 4), seed=3)
    q, k = q.to(cuda_device), k.to(cuda_device)
    tokens = torch.randn(7, 5, device=cuda_device)
    for bad in INVALID_CU:
        bad = torch.tensor(bad, device=cuda_device)
        for kind in ("logit", "prob"):
            sig = F.significance_qk_varlen(q, k, bad, kind=kind, group=4, backend=backend)
            assert (sig == INT64_MIN).all()
            pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, k, bad, [1, 1, 1], kind=kind, group=4,
                                                           cu_seqlens_select=torch.tensor([0, 2, 6, 7], device=cuda_device),
                                                           backend=backend)
            assert (idx == -1).all() and (pruned == 0).all() and cu_out.tolist() == [0, 1, 2, 3]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_gpu_cuda_graph(cuda_device, backend, kind):
    """Capture once, replay on new q, k, tokens and segment bounds (same T and S): no host sync; the
    replays equal eager calls on the same inputs."""
    lengths = [(200, 36, 0, 20), (36, 20, 180, 20), (4, 252, 0, 0)]
    inputs = [packed(n, h=4, d=64, dtype=torch.float16, seed=s) for s, n in enumerate(lengths)]
    keep = [5, 1, 0, 5]
    q, k, cu = (t.to(cuda_device) for t in inputs[0])
    tokens = torch.randn(64, 16, device=cuda_device, dtype=torch.float16)
    run = lambda: F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend=backend)  # noqa: E731
    run()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    for s, (q_cpu, k_cpu, cu_cpu) in enumerate(inputs[1:], 1):
        q.copy_(q_cpu)
        k.copy_(k_cpu)
        cu.copy_(cu_cpu)
        tokens.normal_()
        graph.replay()
        want = run()
        for got, w in zip(out, want):
            assert torch.equal(got, w)
        if s == 2:  # keep 5 of a 0-token segment: that segment is invalid, the others are exact
            assert (out[1][6:11] == -1).all()


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_gpu_torch_compile(cuda_device, backend):
    q, k, cu = (t.to(cuda_device) for t in packed((8, 16), seed=7))
    tokens = torch.randn(6, 4, device=cuda_device)
    compiled = torch.compile(lambda t: F.prune_tokens_qk_varlen(t * 2, q, k, cu, [1, 2], kind="logit", group=4,
                                                                backend=backend), fullgraph=True)
    got = compiled(tokens)
    want = F.prune_tokens_qk_varlen(tokens * 2, q, k, cu, [1, 2], kind="logit", group=4, backend=backend)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
