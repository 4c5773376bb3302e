"""The CUDA C++ kernels of the packed q/k ops (csrc/cuda/significance_qk_varlen.cu): what the op-level tests
of tests/test_qk_varlen.py do not reach (the oracle, the bound and the rules are tests/qk_varlen_oracle.py's).

- Without a GPU: the kernels are registered in the CUDA slots of both ops and the default on CUDA
  tensors picks them where triton is not installed (the error texts of their entry points, shared
  with csrc/checks.cpp, are checked in tests/test_qk_varlen.py next to the C++ / Python comparison).
- On every backend (CPU ones here, GPU ones marked cuda): the row layouts the CUDA kernels read
  element by element rather than in 16-byte chunks (d-strided rows, 16-bit rows of d = 12) and more
  segments than one CTA of the plan kernel takes at a time (512), empty ones among them.
- On a GPU (marked cuda, cuda_cxx for backend='cuda'; they skip without one): each segment's scores
  equal the dense CUDA kernel's on that segment alone, bit for bit (one implementation: the same device
  bodies on the same units); cu_seqlens that break SPEC.md's rules in either integer dtype, including
  no segment at all; the head-dim cap, raised before any device work; the default on CUDA tensors.
Nothing touches the GPU at import or collection time.
"""
from __future__ import annotations

import itertools
import re

import pytest
import torch
from qk_varlen_oracle import INT64_MIN, RAGGED, check_prune, check_sig, oracle, packed, segment_lse
from conftest import gpu_backends
from test_qk_varlen import BACKENDS, PACKED_OPS

import fopru_kernels as F
from fopru_kernels import ops

needs_cuda_build = pytest.mark.skipif(not ops.CUDA_KERNEL_OPS, reason="library built without its CUDA kernels")
needs_cuda_kernels = pytest.mark.skipif(not F.HAS_CUDA_KERNELS, reason="library built without its CUDA kernels")
# CPU backends and, marked cuda, the GPU ones.
EVERY_BACKEND = BACKENDS + [pytest.param(p.values[0], marks=[pytest.mark.cuda, *p.marks]) for p in gpu_backends()]


def _device(backend: str, request) -> torch.device:
    """Where `backend`'s tensors go: a GPU for the GPU backends (`gpu` skips without one, and Triton
    under the interpreter), the CPU otherwise."""
    return request.getfixturevalue("gpu") if backend in ("cuda", "triton") else torch.device("cpu")


@needs_cuda_build
@pytest.mark.parametrize("op", sorted(PACKED_OPS))
def test_cuda_kernels_are_registered(op):
    dump = torch._C._dispatch_dump(f"fopru::{op}")
    assert re.search(r"^CUDA( \(inactive\))?: registered at \S*csrc/cuda/significance_qk_varlen\.cu", dump, re.M), dump
    assert op in ops.CUDA_KERNEL_OPS and F.HAS_CUDA_KERNELS and "cuda" in F.available_backends("cuda")
    # On CUDA tensors the default runs Triton where the op has it, else this kernel.
    assert F.default_backend("cuda", op) == ("triton" if op in ops.INSTALL.triton_ops else "cuda")


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("layout,d", [("d-strided", 8), ("hd", 12), ("contiguous", 16)])
def test_row_layouts(backend, dtype, layout, d, request):
    """16-byte chunks where the layout allows them, element by element elsewhere: d-strided rows, and
    16-bit rows of d = 12 (24 bytes, no whole number of chunks); a 132-token segment spans 3 key blocks."""
    device = _device(backend, request)
    q, k, cu = packed((16, 64, 4, 40, 132), h=3, d=d, dtype=dtype, layout=layout, seed=1)
    for kind in ("logit", "prob"):
        for score in ("focal", "received"):
            sig = F.significance_qk_varlen(q.to(device), k.to(device), cu.to(device, torch.int32), score=score,
                                           kind=kind, group=4, backend=backend)
            check_sig(sig, oracle(q, k, cu, score, kind, 4, backend=backend), cu, 4)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_many_small_segments(backend, kind, request):
    """More segments than one CTA of the CUDA plan kernel takes at a time (512), empty ones among them,
    then one long segment; the prune on top, per attention segment."""
    device = _device(backend, request)
    lengths = (4,) * 150 + (0,) * 300 + (8,) * 80 + (64,)
    q, k, cu = packed(lengths, seed=12)
    dq, dk, dcu = q.to(device), k.to(device), cu.to(device)
    sig = F.significance_qk_varlen(dq, dk, dcu, kind=kind, group=4, backend=backend)
    check_sig(sig, oracle(q, k, cu, "focal", kind, 4, backend=backend), cu, 4)
    keep = [n // 4 if n == 4 else min(n // 4, 1) for n in lengths[:-1]] + [7]
    tokens = torch.randn(sum(lengths) // 4, 6, device=device)
    got = F.prune_tokens_qk_varlen(tokens, dq, dk, dcu, keep, kind=kind, group=4, backend=backend)
    check_prune(backend, got, dq, dk, dcu, tokens, keep, "rank", kind, 4, dcu // 4, None, least=150)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.cuda_cxx
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind,given_lse", [("logit", False), ("prob", False), ("prob", True)])
@pytest.mark.parametrize("score", ["focal", "received"])
def test_segment_scores_equal_the_dense_cuda_kernel(cuda_device, dtype, kind, given_lse, score):
    """One implementation: each segment's significance is the dense CUDA kernel's on that segment alone
    (num_prefix = 0, layout 'bshd', the segment's rows of lse), bit for bit, group sums included; the
    segments span one to 32 key blocks (1, 3 and 4 groups of them) in one launch."""
    q, k, cu = packed(RAGGED + (300, 2048), dtype=dtype, seed=9, constant_keys=(2,))
    lse = segment_lse(q, k, cu, 0.25) if given_lse else None
    q, k, cu = q.to(cuda_device), k.to(cuda_device), cu.to(cuda_device)
    lse = None if lse is None else lse.to(cuda_device)
    _assert_equals_dense(q, k, cu, score, kind, lse, 4)


@pytest.mark.cuda
@pytest.mark.cuda_cxx
@needs_cuda_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_one_token_segments_with_odd_token_stride_equal_the_dense_cuda_kernel(cuda_device, dtype, kind):
    """Rows of d = 64 whose token stride (66 elements) is no multiple of 16 bytes: the packed kernels read
    them element by element, and so must the dense kernel on a 1-token slice (where the token stride
    counts for nothing else), or the logit dots of group-1 segments of one token sum in another order."""
    gen = torch.Generator().manual_seed(21)
    lengths = (1,) * 8 + (7, 1, 1, 9, 1)
    t = sum(lengths)
    q, k = (torch.randn(t, 1, 66, generator=gen).mul(2).to(dtype)[..., :64] for _ in range(2))
    cu = torch.tensor([0, *itertools.accumulate(lengths)])
    q, k, cu = q.to(cuda_device), k.to(cuda_device), cu.to(cuda_device)
    for score in ("focal", "received"):
        _assert_equals_dense(q, k, cu, score, kind, None, 1)


def _assert_equals_dense(q, k, cu, score, kind, lse, group):
    """The CUDA C++ packed kernel's sig of every segment is the dense CUDA kernel's on that segment alone
    (num_prefix = 0, layout 'bshd', the segment's rows of lse), group sums included, bit for bit."""
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, lse=lse, group=group, backend="cuda")
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            dense = F.significance_qk(q[None, a:b], k[None, a:b], score=score, num_prefix=0, kind=kind, layout="bshd",
                                      lse=None if lse is None else lse[None, :, a:b], backend="cuda")
            assert torch.equal(sig[a // group:b // group], dense[0].view(-1, group).sum(dim=1)), (a, b, score)


# Attention segments of T = 24 tokens (group 4) that break SPEC.md's rules in ways INVALID_CU (28 tokens,
# int64) has not: no segment at all, the last bound short of T, past T, in int32 as well as int64.
INVALID_24 = {"no-segment": [0], "short": [0, 8, 20], "past-T": [0, 28, 24], "group": [0, 6, 24]}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("cu_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("name", INVALID_24)
def test_invalid_cu_seqlens_in_either_dtype(cuda_device, backend, cu_dtype, name):
    """The device-side checks: INT64_MIN scores, idx -1 and zero rows, cu_seqlens_out in the selection's
    dtype, nothing raised and nothing read out of bounds."""
    q, k, _ = packed((24,), d=8, seed=13)
    q, k = q.to(cuda_device), k.to(cuda_device)
    cu = torch.tensor(INVALID_24[name], dtype=cu_dtype, device=cuda_device)
    tokens = torch.randn(6, 5, device=cuda_device)
    s = len(INVALID_24[name]) - 1
    for kind in ("logit", "prob"):
        for score in ("focal", "received"):
            sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, group=4, backend=backend)
            assert torch.equal(sig.cpu(), torch.full((6,), INT64_MIN, dtype=torch.int64))
        for select, keep in ((None, [1] * s), (torch.tensor([0, 2, 6], dtype=cu_dtype, device=cuda_device), [1, 3])):
            pruned, idx, cu_out = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4,
                                                           cu_seqlens_select=select, backend=backend)
            assert torch.equal(idx.cpu(), torch.full((sum(keep),), -1, dtype=torch.int64))
            assert torch.equal(pruned.cpu(), torch.zeros(sum(keep), 5))
            assert cu_out.tolist() == [0, *itertools.accumulate(keep)] and cu_out.dtype == cu_dtype


@pytest.mark.cuda
@pytest.mark.parametrize("op", sorted(PACKED_OPS))
def test_default_on_cuda_tensors(cuda_device, op):
    """backend='auto' on CUDA tensors: Triton where the op has it, else the CUDA C++ kernel, else (a build
    without its CUDA kernels) the float64 reference; each within its own bound."""
    want = "triton" if op in ops.INSTALL.triton_ops else "cuda" if op in ops.CUDA_KERNEL_OPS else "reference"
    assert F.default_backend("cuda", op) == want
    q, k, cu = (t.to(cuda_device) for t in packed((16, 64, 8), seed=8))
    if op == "significance_qk_varlen":
        sig = F.significance_qk_varlen(q, k, cu, kind="logit", group=4)
        check_sig(sig, oracle(q, k, cu, "focal", "logit", 4, backend=want), cu, 4)
        return
    tokens = torch.randn(22, 8, device=cuda_device)
    got = F.prune_tokens_qk_varlen(tokens, q, k, cu, [2, 5, 1], kind="logit", group=4)
    check_prune(want, got, q, k, cu, tokens, [2, 5, 1], "rank", "logit", 4, cu // 4, None, least=1)


@pytest.mark.cuda
@pytest.mark.cuda_cxx
@needs_cuda_kernels
def test_head_dim_cap_on_the_gpu(cuda_device):
    """SPEC.md's CUDA limit d <= 8192: refused for any T (0 too); the largest d allowed runs (logit: the
    prob tiles of so long a row exceed any GPU's shared memory, a limit of its own)."""
    for t in (8, 0):
        q = torch.zeros(t, 1, 8193, device=cuda_device)
        cu = torch.tensor([0, t], device=cuda_device)
        with pytest.raises(RuntimeError, match=r"significance_qk_varlen supports head dim d <= 8192 on CUDA, got 8193"):
            F.significance_qk_varlen(q, q, cu, kind="logit", group=4, backend="cuda")
    q = torch.randn(8, 1, 8192, device=cuda_device)
    sig = F.significance_qk_varlen(q, q, torch.tensor([0, 8], device=cuda_device), kind="logit", group=4,
                                   backend="cuda")
    assert sig.shape == (2,)
