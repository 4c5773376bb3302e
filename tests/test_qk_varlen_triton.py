"""The Triton kernels of the packed q/k ops (fopru_kernels/triton/significance_qk_varlen.py) on CPU tensors
under TRITON_INTERPRET=1: what the op-level tests of tests/test_qk_varlen.py cannot reach from CPU tensors.

- The work list the per-item kernels share: every block of every segment exactly once, long segments
  first, also across the kernel's own chunks (small chunk sizes forced).
- The GPU's launch shapes (16-token items, so long segments span many items and programs; several
  chunks of segments, items and focal sums), against the float64 oracle with the float32 bound.
- The device-side checks of cu_seqlens, which the host makes only for CPU tensors, so the launchers are
  called directly here, as a GPU call reaches them: sig all INT64_MIN, every idx -1 and row zero.
- cu_seqlens read through its stride and in either integer dtype; group sums and repeated calls exact;
  one launch per stage.
The GPU versions of these checks (CUDA tensors, the op itself) are in tests/test_qk_varlen.py.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch
from qk_varlen_oracle import INT64_MIN, INVALID_CU, check_prune, check_sig, oracle, packed, segment_lse, selection_oracle

import fopru_kernels as F

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
if os.environ.get("TRITON_INTERPRET") == "1":
    from fopru_kernels.triton import select as tsel
    from fopru_kernels.triton import significance_qk_varlen as tqv

MIXED = (4, 120, 12, 0, 52, 8, 36)  # tokens per segment: 8 items of 16 tokens next to 1


@pytest.fixture
def small_chunks(monkeypatch):
    """The work list, focal sums and selection in chunks of a few entries, so that every loop of theirs
    runs several steps and carries state from one to the next."""
    monkeypatch.setattr(tqv, "SEG_BLOCK", 2)
    monkeypatch.setattr(tqv, "ITEM_BLOCK", 4)
    monkeypatch.setattr(tqv, "FOCAL_BLOCK", 4)
    monkeypatch.setattr(tsel, "SELECT_BLOCK", 4)
    monkeypatch.setattr(tsel, "rows_per_program", lambda batch, keep, device: 8)


def _cu(lengths, dtype=torch.int64) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=dtype)


@pytest.mark.parametrize("lengths", [MIXED, (64, 64, 64, 64, 64), (0, 0, 16), (1024, 4, 4)])
@pytest.mark.parametrize("chunks", ["default", "small"])
def test_work_list_covers_every_block_once_longest_first(request, lengths, chunks):
    if chunks == "small":
        request.getfixturevalue("small_chunks")
    block = 16
    cu = _cu(lengths)
    items, status, max_items = tqv.work_list(cu, sum(lengths), 4, block)
    count = int(status[1])
    assert status[0] == 1 and max_items == -(-sum(lengths) // block) + len(lengths)
    got = [tuple(r) for r in items[:count].tolist()]
    want = [(a, b - a, j) for a, b in zip(cu.tolist(), cu.tolist()[1:]) for j in range(-(-(b - a) // block))]
    assert sorted(got) == sorted(want) and len(set(got)) == len(got)
    classes = [(-(-n // block)).bit_length() for _, n, _ in got]
    assert classes == sorted(classes, reverse=True)  # longer segments' items first
    for w, (start, n, j) in enumerate(got):  # a segment's items are consecutive, in block order
        assert j == 0 or got[w - 1] == (start, n, j - 1)


@pytest.mark.parametrize("bad", INVALID_CU + [[0, 8, 24, 28, 28, 20]])
def test_work_list_of_invalid_cu_seqlens_is_empty(bad):
    items, status, _ = tqv.work_list(torch.tensor(bad), 28, 4, 16)
    assert status.tolist() == [0, 0]


@pytest.mark.parametrize("kind", ["logit", "prob"])
@pytest.mark.parametrize("score", ["focal", "received"])
@pytest.mark.parametrize("lse_given", [False, True])
def test_gpu_launch_shapes(small_chunks, monkeypatch, kind, score, lse_given):
    """16-token items and small chunks everywhere, against the oracle; the prune on top."""
    if kind == "logit" and lse_given:
        pytest.skip("lse is only used with kind='prob'")
    monkeypatch.setattr(tqv, "_item_block", lambda kind, t, d, device: 16)
    q, k, cu = packed(MIXED, h=2, d=24, seed=11, constant_keys=(2,))
    lse = segment_lse(q, k, cu, 24**-0.5) if lse_given else None
    sig = F.significance_qk_varlen(q, k, cu, score=score, kind=kind, lse=lse, group=4, backend="triton")
    check_sig(sig, oracle(q, k, cu, score, kind, 4, lse=lse, backend="triton"), cu, 4)
    if score == "focal" and kind == "logit":  # the selection's own chunks (the scoring is shared)
        tokens = torch.randn(sum(MIXED) // 4, 6)
        keep = [1, 12, 2, 0, 6, 1, 4]
        got = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend="triton")
        check_prune("triton", got, q, k, cu, tokens, keep, "rank", kind, 4, cu // 4, None, least=4)


@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_invalid_cu_seqlens_on_the_device(kind):
    """What a GPU call gets (its host never reads cu_seqlens): the launchers on unchecked values."""
    q, k, _ = packed((8, 16, 4), seed=3)
    tokens = torch.randn(7, 5)
    scale = 16**-0.5
    for i, bad in enumerate(INVALID_CU):
        bad = torch.tensor(bad)
        sig = tqv.significance_qk_varlen(q, k, bad, "focal", scale, None, kind, 4)
        assert sig.shape == (7,) and (sig == INT64_MIN).all()
        # selection segments cu_seqlens / group (read by the prune kernel), or valid ones of their own
        for select in (None, torch.tensor([0, 2, 6, 7], dtype=torch.int32))[:2 if i == 0 else 1]:
            pruned, idx, cu_out = tqv.prune_tokens_qk_varlen(tokens, q, k, bad, [1, 1, 1], "rank", "focal", scale,
                                                             None, kind, 4, select, [1, 1, 1], None)
            assert (idx == -1).all() and (pruned == 0).all() and cu_out.tolist() == [0, 1, 2, 3]


def test_invalid_selection_segments_on_the_device():
    """Valid attention segments, one selection segment past T: that one gets -1 and zero rows, the others
    keep the exact selection of the op's own significance."""
    q, k, cu = packed((8, 16, 4), seed=4)
    tokens = torch.randn(7, 5)
    sig = F.significance_qk_varlen(q, k, cu, kind="prob", group=4, backend="triton")
    select = torch.tensor([0, 2, 9, 7])  # segment 1 ends past T / group = 7, segment 2 goes backwards
    pruned, idx, cu_out = tqv.prune_tokens_qk_varlen(tokens, q, k, cu, [2, 1, 0], "rank", "focal", 0.25, None,
                                                     "prob", 4, select, [1, 1, 1], None)
    _, want = selection_oracle(tokens, sig, torch.tensor([0, 2]), [2], "rank", None)
    assert torch.equal(idx[:2], want) and torch.equal(pruned[:2], tokens[want])
    assert idx[2] == -1 and (pruned[2] == 0).all() and cu_out.tolist() == [0, 2, 3, 3]


@pytest.mark.parametrize("kind", ["logit", "prob"])
def test_cu_seqlens_strides_dtypes_group_sums_and_repeats_are_exact(kind):
    """The same segments as an int32 tensor, a strided view (the elements between are out of range) or
    int64 give the same bits; group 4 is group 1 summed in fours; a second call gives the same bits."""
    q, k, cu = packed(MIXED, seed=12)
    want = F.significance_qk_varlen(q, k, cu, kind=kind, group=1, backend="triton")
    wide = torch.full((2 * cu.numel(),), 10**6, dtype=torch.int32)
    wide[::2] = cu
    for view in (cu.int(), wide[::2]):
        assert torch.equal(F.significance_qk_varlen(q, k, view, kind=kind, group=1, backend="triton"), want)
    assert torch.equal(F.significance_qk_varlen(q, k, wide[::2], kind=kind, group=4, backend="triton"),
                       want.view(-1, 4).sum(dim=1))
    assert torch.equal(F.significance_qk_varlen(q, k, cu, kind=kind, group=1, backend="triton"), want)


@pytest.mark.parametrize("kind,lse_given,launches", [("logit", False, 5), ("prob", False, 4), ("prob", True, 3)])
def test_one_launch_per_stage(triton_launches, kind, lse_given, launches):
    """work list, per-head values (logit: item sums, segment sums, then means; prob: lse unless given,
    then means), focal
    choice + group sums; the prune adds its selection + gather."""
    q, k, cu = packed((8, 16, 4), seed=5)
    lse = segment_lse(q, k, cu, 16**-0.5) if lse_given else None
    F.significance_qk_varlen(q, k, cu, kind=kind, lse=lse, group=4, backend="triton")
    assert len(triton_launches) == launches
    triton_launches.clear()
    F.prune_tokens_qk_varlen(torch.randn(7, 3), q, k, cu, [1, 2, 1], kind=kind, lse=lse, group=4, backend="triton")
    assert len(triton_launches) == launches + 1
