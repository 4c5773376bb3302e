"""prune_tokens_varlen (SPEC.md "Ragged batches") on every backend against the dense op looped over
images, bit for bit: idx, pruned and cu_seqlens_out with torch.equal, never tolerances.

CPU tensors run every CPU backend (the Triton kernel under TRITON_INTERPRET=1); the GPU tests
(marker cuda) run the Triton and CUDA kernels, the per-image checks of invalid segments that a GPU
makes instead of a sync, CUDA graph capture and torch.compile. Nothing here touches the GPU at
import or collection time.
"""
from __future__ import annotations

import functools
import importlib.util
import itertools

import pytest
import torch
from cases import Batch, make_batch, row_batch
from conftest import INTERPRETED, cpu_backends, cuda_global_keys, gpu_backends
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fopru_kernels as F
from fopru_kernels import reference


def dense_loop(tokens, sig, cu_seqlens, keep, strategy, grids):
    """The oracle: the dense reference select() of each image's segment, offset to global indices."""
    cu = cu_seqlens.tolist()
    parts = [torch.zeros(0, dtype=torch.int64)]
    for b, k in enumerate(keep):
        seg = sig[cu[b]:cu[b + 1]].cpu()[None]
        if seg.shape[1] == 0:  # no tokens: nothing to select (and no valid dense grid)
            continue
        grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
        parts.append(reference.select(seg, k, strategy, grid)[0] + cu[b])
    idx = torch.cat(parts)
    cu_out = torch.tensor([0, *itertools.accumulate(keep)], dtype=cu_seqlens.dtype)
    return tokens.cpu()[idx], idx, cu_out


def check_batch(c: Batch, backend: str, device="cpu") -> None:
    tokens, sig, cu = make_batch(c, device)
    grids = None if c.grids is None else list(c.grids)
    pruned, idx, cu_out = F.prune_tokens_varlen(tokens, sig, cu, list(c.keep), strategy=c.strategy, grids=grids,
                                                backend=backend)
    want_pruned, want_idx, want_cu = dense_loop(tokens, sig, cu, c.keep, c.strategy, grids)
    for got in (pruned, idx, cu_out):
        assert got.device == tokens.device and got.is_contiguous() and not got.requires_grad
    assert pruned.dtype == tokens.dtype and idx.dtype == torch.int64 and cu_out.dtype == cu.dtype
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(cu_out.cpu(), want_cu)
    assert torch.equal(pruned.cpu(), want_pruned)


@pytest.mark.parametrize("backend", cpu_backends())
def test_grids_as_pairs(backend):
    """grids as the (rows, cols) pairs people write give what the flat list gives, for the op and for
    positions_varlen; their (row, col) are each kept token's local index split by its image's cols."""
    c = row_batch([(2, 3), (4, 5)], [1, 2])
    tokens, sig, cu = make_batch(c)
    pairs = [(2, 3), (4, 5)]
    flat = F.prune_tokens_varlen(tokens, sig, cu, list(c.keep), strategy="row", grids=list(c.grids), backend=backend)
    for grids in (pairs, [list(g) for g in pairs], torch.tensor(pairs)):
        got = F.prune_tokens_varlen(tokens, sig, cu, list(c.keep), strategy="row", grids=grids, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, flat))
    idx = flat[1]
    pos = F.positions_varlen(idx, cu, list(c.keep), grids=pairs)
    assert torch.equal(pos, F.positions_varlen(idx, cu, list(c.keep), grids=list(c.grids)))
    local = idx - torch.tensor([0] * 3 + [6] * 10)
    cols = torch.tensor([3] * 3 + [5] * 10)
    assert torch.equal(pos, torch.stack((local // cols, local % cols), dim=-1))


@pytest.mark.parametrize("grids", [[(2, 3), 4, 5], [(2, 3, 1), (4, 5)], [2.0, 3, 4, 5], ["23", "45"]], ids=str)
def test_malformed_grids_are_refused(grids):
    tokens, sig, cu = torch.randn(26, 2), torch.arange(26), torch.tensor([0, 6, 26])
    message = r"grids must be B \(rows, cols\) pairs of ints or the flat list \[rows_0, cols_0, ...\], got "
    with pytest.raises(ValueError, match=message):
        F.prune_tokens_varlen(tokens, sig, cu, [3, 10], strategy="row", grids=grids)
    with pytest.raises(ValueError, match=message):
        F.positions_varlen(torch.arange(13), cu, [3, 10], grids=grids)


# Mixed sizes (0, 1, 2, odd, LLaVA's 576) with keep 0 / 1 / n_b, every dtype, both cu_seqlens
# dtypes, strided inputs and heavy ties; per-image non-square grids for row.
MIXED = (0, 1, 2, 7, 576, 35, 16, 1)
BATCHES = [
    Batch(sizes=MIXED, keep=(0, 1, 1, 3, 144, 35, 0, 1)),
    Batch(sizes=MIXED, keep=(0, 0, 2, 7, 1, 17, 16, 0), tok_dtype=torch.bfloat16, cu_dtype=torch.int64,
          layout="strided", values="quantised", seed=1),
    Batch(sizes=MIXED, keep=(0, 1, 2, 4, 576, 1, 5, 1), tok_dtype=torch.float32, layout="transposed", seed=2),
    Batch(sizes=(5, 0, 9), keep=(5, 0, 9), values="quantised", layout="padded", seed=3),  # keep everything
    Batch(sizes=(3, 0, 4), keep=(0, 0, 0), seed=4),  # nothing kept: T' = 0
    Batch(sizes=(0, 0), keep=(0, 0), seed=5),  # T = 0
    Batch(sizes=(), keep=(), seed=6),  # B = 0
    row_batch([(1, 1), (1, 2), (2, 1), (5, 7), (7, 5), (24, 24), (3, 4)], [1, 0, 2, 3, 7, 6, 1]),
    row_batch([(1, 1), (1, 2), (2, 1), (5, 7), (7, 5), (24, 24), (3, 4)], [0, 1, 1, 5, 1, 24, 3],
               tok_dtype=torch.bfloat16, cu_dtype=torch.int64, layout="strided", values="quantised", seed=7),
    row_batch([(23, 25), (4, 9), (9, 4)], [5, 4, 0], tok_dtype=torch.float32, layout="padded", seed=8),
    # rank with grids given: the grids are checked (rows * cols == n_b), not used
    Batch(sizes=(6, 12), keep=(2, 5), grids=(2, 3, 4, 3), values="quantised", seed=9),
]
# LLaVA-NeXT: a base image and 4 tiles of 24 x 24 patches, packed as 5 images or as one 48 x 60 grid.
NEXT = [
    Batch(sizes=(576,) * 5, keep=(144,) * 5, D=4, cu_dtype=torch.int64, values="quantised"),
    row_batch([(48, 60), (24, 24)], [12, 6], D=4, seed=1),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("c", BATCHES + NEXT, ids=[c.id() for c in BATCHES + NEXT])
def test_batches(c, backend):
    check_batch(c, backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_row_image_without_tokens(backend):
    """A row image of 0 x cols patches is a valid empty segment (grids allow rows = 0)."""
    check_batch(row_batch([(2, 3), (0, 3), (1, 4)], [1, 0, 1]), backend)


@st.composite
def batches(draw):
    """Small ragged batches: sizes 0..12, rank or row with a random factorisation of each n_b."""
    strategy = draw(st.sampled_from(["rank", "row"]))
    b = draw(st.integers(0, 4))
    sizes, keep, grids = [], [], []
    for _ in range(b):
        n = draw(st.integers(0 if strategy == "rank" else 1, 12))
        cols = draw(st.sampled_from([c for c in range(1, n + 1) if n % c == 0] or [1]))
        sizes.append(n)
        keep.append(draw(st.integers(0, n)) if strategy == "rank" else draw(st.integers(0, n // cols)) * cols)
        grids += [n // cols, cols]
    return Batch(sizes=tuple(sizes), keep=tuple(keep), strategy=strategy,
                 grids=tuple(grids) if strategy == "row" else None, D=3,
                 tok_dtype=draw(st.sampled_from([torch.float16, torch.bfloat16, torch.float32])),
                 cu_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
                 layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
                 values=draw(st.sampled_from(["wide", "quantised"])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(c=batches())
def test_fuzz(c):
    for backend in cpu_backends():
        check_batch(c, backend)


# The values of cu_seqlens are checked on the host for CPU tensors (no device to sync with).
BAD_CU = [
    ([1, 5, 9], "cu_seqlens[0]"),  # does not start at 0
    ([0, 5, 8], "cu_seqlens[B]"),  # does not end at T
    ([0, 6, 5, 9], "non-decreasing"),
    ([0, 1, 9], "keep[0]"),  # keep[0] = 2 > n_0 = 1
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("cu,words", BAD_CU)
def test_bad_cu_seqlens_values_cpu(backend, cu, words):
    tokens, sig = torch.randn(9, 4), torch.arange(9)
    keep = [2] * (len(cu) - 1)
    with pytest.raises(ValueError, match="cu_seqlens") as e:
        F.prune_tokens_varlen(tokens, sig, torch.tensor(cu), keep, backend=backend)
    assert words in str(e.value)


@pytest.mark.parametrize("backend", cpu_backends())
def test_bad_grid_for_segment_cpu(backend):
    tokens, sig, cu = torch.randn(12, 4), torch.arange(12), torch.tensor([0, 6, 12])
    with pytest.raises(ValueError, match="cu_seqlens"):  # grids[1] = 3 x 3 != n_1 = 6
        F.prune_tokens_varlen(tokens, sig, cu, [3, 3], strategy="row", grids=[2, 3, 3, 3], backend=backend)


def test_opcheck_cpu():
    tokens, sig, cu = make_batch(BATCHES[1])
    torch.library.opcheck(torch.ops.fopru.prune_tokens_varlen.default,
                          (tokens, sig, cu, list(BATCHES[1].keep), "rank", None))


# ----------------------------------------------------------------------------- Triton launch shapes

triton_only = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")


# Small enough for one program per two output rows under the interpreter (~5 s in all).
SMALL_BLOCK_BATCHES = [
    BATCHES[1],
    row_batch([(5, 7), (1, 2), (7, 5), (0, 4), (3, 4)], [2, 1, 3, 0, 1], tok_dtype=torch.bfloat16, layout="strided",
               values="quantised", seed=10),
    row_batch([(6, 10), (9, 3)], [2, 4], D=5, cu_dtype=torch.int64, seed=11),
]


@triton_only
@pytest.mark.parametrize("c", SMALL_BLOCK_BATCHES, ids=lambda c: c.id())
def test_triton_small_blocks(monkeypatch, c):
    """The GPU's launch shapes, which the interpreter otherwise avoids for speed: several unit chunks
    and column chunks per selection pass, two output rows per program (many programs per image)."""
    from fopru_kernels.triton import select as tsel

    monkeypatch.setattr(tsel, "SELECT_BLOCK", 4)
    monkeypatch.setattr(tsel, "SELECT_TILE", 16)
    monkeypatch.setattr(tsel, "rows_per_program", lambda batch, keep, device: 2)
    monkeypatch.setattr(tsel, "block_d", lambda d, rows: 2)
    check_batch(c, "triton")


# Segments that break the contract; the kernels see them only on a GPU (where the host does not
# read cu_seqlens). Per image: is the segment valid?
INVALID_CU = [
    ([0, 5, 3, 20], [True, False, True]),  # decreasing
    ([0, 5, 25, 20], [True, False, False]),  # beyond T
    ([-3, 5, 10, 20], [False, True, True]),  # before 0
    ([0, 5, 6, 20], [True, False, True]),  # n_1 = 1 < keep_1 = 2
]
INVALID_ROW_CU = ([0, 6, 14, 20], [True, False, True])  # grids say n_1 = 6, the segment has 8


def check_invalid(run, device) -> None:
    """Invalid images get idx -1 and zero rows; the valid ones are exact."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(20, 5, generator=gen).to(device)
    sig = torch.randint(0, 4, (20,), generator=gen).to(device)
    cases = [(cu, ok, "rank", [2, 2, 3], None) for cu, ok in INVALID_CU]
    cases.append((*INVALID_ROW_CU, "row", [2, 4, 2], [3, 2, 3, 2, 3, 2]))
    for cu, ok, strategy, keep, grids in cases:
        pruned, idx, cu_out = run(tokens, sig, torch.tensor(cu, device=device), keep, strategy, grids)
        assert cu_out.tolist() == [0, *itertools.accumulate(keep)]
        start = 0
        for b, k in enumerate(keep):
            rows = slice(start, start + k)
            if ok[b]:
                seg = sig[cu[b]:cu[b + 1]].cpu()[None]
                grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
                want = reference.select(seg, k, strategy, grid)[0] + cu[b]
                assert torch.equal(idx[rows].cpu(), want)
                assert torch.equal(pruned[rows].cpu(), tokens.cpu()[want])
            else:
                assert (idx[rows] == -1).all() and (pruned[rows] == 0).all()
            start += k


@triton_only
def test_triton_invalid_segments():
    """The launcher on unchecked cu_seqlens (what a GPU call gets), on CPU tensors."""
    from fopru_kernels.triton import prune_tokens_varlen as tv

    def run(tokens, sig, cu, keep, strategy, grids):
        cols = [1] * len(keep) if grids is None else grids[1::2]
        return tv.prune_tokens_varlen(tokens, sig, cu, keep, strategy, cols, grids)

    check_invalid(run, "cpu")


def strided_cu(cu: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as every second element of a wider buffer whose other elements are out of range:
    a kernel that ignored the stride would read them as segment bounds."""
    wide = torch.full((2 * cu.numel(),), 10**6, dtype=cu.dtype, device=cu.device)
    wide[::2] = cu
    return wide[::2]


STRIDED_CU = [
    Batch(sizes=(5, 0, 9, 3), keep=(2, 0, 4, 3), seed=21),
    row_batch([(2, 3), (3, 4), (1, 5)], [1, 2, 1], cu_dtype=torch.int64, seed=22),
]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("c", STRIDED_CU, ids=[c.id() for c in STRIDED_CU])
def test_strided_cu_seqlens(backend, c):
    """A strided cu_seqlens view gives what the contiguous tensor gives: every backend reads it
    through its stride (the Triton kernel under TRITON_INTERPRET=1 here)."""
    tokens, sig, cu = make_batch(c)
    grids = None if c.grids is None else list(c.grids)
    want = dense_loop(tokens, sig, cu, c.keep, c.strategy, grids)
    strided = strided_cu(cu)
    assert strided.stride(0) == 2
    got = F.prune_tokens_varlen(tokens, sig, strided, list(c.keep), strategy=c.strategy, grids=grids, backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# The per-image table the Triton launcher copies to the device (triton/launch.py): under CUDA graph
# capture it comes from a pinned arena that is never freed or rewritten, whatever torch's pinned
# allocator does with its own blocks after the capture.
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


@needs_triton
def test_graph_tables_are_never_reused():
    from fopru_kernels.triton.launch import GraphTables

    tables = GraphTables(pin=False, arena_values=6)
    a = tables.table(0, [1, 2, 3])
    assert tables.table(0, [1, 2, 3]) is a  # equal tables share their slot
    b = tables.table(0, [4, 5, 6, 7])  # past the first arena: a second one, the first kept
    c = tables.table(1, [1, 2, 3])  # another device: its own arena
    d = tables.table(0, [8])
    assert [t.tolist() for t in (a, b, c, d)] == [[1, 2, 3], [4, 5, 6, 7], [1, 2, 3], [8]]
    ptrs = {t.data_ptr() for t in (a, b, c, d)}
    assert len(ptrs) == 4  # no two tables share memory
    tables.reserve(2)
    assert tables.table(2, [9] * 6).tolist() == [9] * 6


@needs_triton
def test_eager_calls_leave_half_an_arena_free_for_the_next_capture():
    """reserve (each eager host_table) adds an arena when the last one is more than half used, so a
    capture that follows finds room without a pinned allocation; tables already handed out stay put."""
    from fopru_kernels.triton.launch import GraphTables

    tables = GraphTables(pin=False, arena_values=8)
    tables.reserve(0)
    tables.reserve(0)  # nothing used yet: no second arena
    first = tables.table(0, [1, 2, 3, 4])  # half of the arena: still enough room
    tables.reserve(0)
    allocated = []
    tables._new_arena = lambda size: allocated.append(size) or torch.empty(size, dtype=torch.int64)
    assert tables.table(0, [5]).data_ptr() == first.data_ptr() + 4 * 8  # same arena
    tables.reserve(0)  # 5 of 8 used: the next capture gets a new arena of 16 now
    assert allocated == [16]
    assert tables.table(0, [6, 7, 8, 9, 10, 11, 12, 13]).tolist() == [6, 7, 8, 9, 10, 11, 12, 13]
    assert allocated == [16]  # the capture's table needed no allocation
    assert first.tolist() == [1, 2, 3, 4]


@needs_triton
def test_device_table_takes_the_graph_arena_only_under_capture(monkeypatch):
    """The path choice of launch.host_table: the arena while the device's stream is capturing, a
    fresh (pinned) tensor otherwise; CPU tensors never capture. Simulated: there is no GPU here."""
    from fopru_kernels.triton import launch

    arena = launch.GraphTables(pin=False)
    monkeypatch.setattr(launch, "_GRAPH_TABLES", arena)
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert launch.capturing(cuda0) and not launch.capturing(torch.device("cpu"))
    first = launch.host_table([3, 1, 4], cuda0)
    assert launch.host_table([3, 1, 4], cuda0) is first and first.tolist() == [3, 1, 4]
    assert launch.device_table([3, 1, 4], torch.device("cpu")).tolist() == [3, 1, 4]  # CPU: a plain tensor
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    pinned = []
    monkeypatch.setattr(launch, "_pinned", lambda values: pinned.append(values) or torch.tensor(values))
    eager = launch.host_table([3, 1, 4], cuda0)
    assert pinned == [[3, 1, 4]] and eager is not first and eager.tolist() == [3, 1, 4]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", *gpu_backends()])
@pytest.mark.parametrize("c", BATCHES + NEXT, ids=[c.id() for c in BATCHES + NEXT])
def test_batches_gpu(cuda_device, c, backend):
    check_batch(c, backend, cuda_device)


# The CUDA kernel's own paths: an image whose keys do not fit shared memory next to small ones,
# a 128 x 128 row grid, more images than one launch takes (256), each also down the global-memory
# key path (the test hook torch.ops.fopru_testing.cuda_force_global_keys).
CUDA_PATHS = [
    Batch(sizes=(16384, 64, 64, 64), keep=(4096, 16, 0, 64), D=8, seed=10),
    row_batch([(128, 128), (8, 8)], [32, 2], D=8, seed=11),
    Batch(sizes=(3,) * 300, keep=(1,) * 300, D=4, values="quantised", seed=12),
]


@pytest.mark.cuda
@pytest.mark.cuda_cxx
@pytest.mark.parametrize("force_global", [False, True])
@pytest.mark.parametrize("c", CUDA_PATHS, ids=[c.id() for c in CUDA_PATHS])
def test_cuda_kernel_paths(cuda_device, c, force_global):
    if not F.HAS_CUDA_KERNELS:
        pytest.skip("needs the library's CUDA kernels")
    with cuda_global_keys(force_global):
        check_batch(c, "cuda", cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_fuzz_gpu(cuda_device, backend):
    gen = torch.Generator().manual_seed(0)
    for seed in range(20):
        sizes = torch.randint(0, 40, (int(torch.randint(1, 9, (1,), generator=gen)),), generator=gen).tolist()
        keep = [int(torch.randint(0, n + 1, (1,), generator=gen)) for n in sizes]
        c = Batch(sizes=tuple(sizes), keep=tuple(keep), values=("wide", "quantised")[seed % 2], seed=seed)
        check_batch(c, backend, cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_invalid_segments_gpu(cuda_device, backend):
    check_invalid(functools.partial(F.prune_tokens_varlen, backend=backend), cuda_device)


# (first batch, replay batches): same B, keep and grids; rank replays move the segment bounds.
GRAPH_BATCHES = {
    "row": (row_batch([(24, 24), (2, 3), (12, 24), (1, 6)], [6, 0, 3, 1], D=64),
            [{"seed": 1}, {"seed": 2, "values": "quantised"}]),
    "rank": (Batch(sizes=(576, 300, 0, 200), keep=(144, 75, 0, 50), D=64),
             [{"sizes": (300, 576, 0, 200), "seed": 1},
              {"sizes": (200, 300, 376, 200), "seed": 2, "values": "quantised"}]),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_cuda_graph(cuda_device, strategy, backend):
    """Capture once, replay on new tokens, scores and (rank) segment bounds: no host sync, and the
    per-image table copied during capture stays valid for every replay, also when eager calls with
    other tables of the same size ran in between (they would get, and overwrite, a pinned block that
    torch's host allocator recycled after the capture)."""
    first, replays = GRAPH_BATCHES[strategy]
    keep, grids = list(first.keep), None if first.grids is None else list(first.grids)
    inputs = [make_batch(first.with_(**kw)) for kw in replays]
    tokens, sig, cu = make_batch(first, cuda_device)
    F.prune_tokens_varlen(tokens, sig, cu, keep, strategy=strategy, grids=grids, backend=backend)  # compile outside
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.prune_tokens_varlen(tokens, sig, cu, keep, strategy=strategy, grids=grids, backend=backend)
    for t_cpu, s_cpu, cu_cpu in inputs:
        tokens.copy_(t_cpu)
        sig.copy_(s_cpu)
        cu.copy_(cu_cpu)
        F.prune_tokens_varlen(tokens, sig, cu, [0] * len(keep), strategy=strategy, grids=grids, backend=backend)
        graph.replay()
        for got, want in zip(out, dense_loop(t_cpu, s_cpu, cu_cpu, keep, strategy, grids)):
            assert torch.equal(got.cpu(), want)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("c", STRIDED_CU, ids=[c.id() for c in STRIDED_CU])
def test_strided_cu_seqlens_gpu(cuda_device, backend, c):
    tokens, sig, cu = make_batch(c, cuda_device)
    grids = None if c.grids is None else list(c.grids)
    want = dense_loop(tokens, sig, cu, c.keep, c.strategy, grids)
    got = F.prune_tokens_varlen(tokens, sig, strided_cu(cu), list(c.keep), strategy=c.strategy, grids=grids,
                                backend=backend)
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", *gpu_backends()])
def test_torch_compile(cuda_device, backend):
    """fullgraph compile of the op: its fake kernel sizes the outputs from keep alone, so the ragged
    call traces without reading cu_seqlens."""
    torch._dynamo.reset()
    c = BATCHES[8]
    tokens, sig, cu = make_batch(c, cuda_device)
    keep, grids = list(c.keep), list(c.grids)
    fn = torch.compile(lambda t, s, u: F.prune_tokens_varlen(t, s, u, keep, strategy="row", grids=grids, backend=backend),
                       fullgraph=True)
    for got, want in zip(fn(tokens, sig, cu), dense_loop(tokens, sig, cu, keep, "row", grids)):
        assert torch.equal(got.cpu(), want)
