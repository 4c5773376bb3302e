"""prune_tokens and the two ops it is made of (SPEC.md: significance, select, then a gather of the kept
rows), on every backend against reference.py, bit for bit (torch.equal, never tolerances).

check_case runs the three ops of one tests/cases.py Case on a backend and compares each with one pass
of the reference on the CPU copies of the same inputs. CPU tensors: the C++ kernel ("cpu") and Triton
under TRITON_INTERPRET=1 (a trimmed grid, LLaVA shapes with few heads or a small D, and the launchers'
GPU paths forced through their knobs). CUDA tensors (marker `cuda`): the CUDA C++ kernels (forced with
backend="cuda", marker `cuda_cxx`: scripts/gpu_check.sh reports them apart) and Triton, on the full
grid, LLaVA shapes, large N, CUDA graphs, torch.compile, streams and a second device. Values worked
out by hand and the golden cases are in test_significance.py, the selection alone in test_select.py.
Nothing here touches the GPU at import or collection time.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import ATTN_DTYPES, TOKEN_DTYPES, Case, grid_cases, lay_out, make_inputs
from conftest import cuda_global_keys, gpu_backends, kernel_backends, per_backend
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fopru_kernels as F
from fopru_kernels import reference

CUDA_CXX = [b for b in gpu_backends() if b.values[0] == "cuda"]  # for the CUDA C++ kernels' own paths


def every(cases: list) -> dict[str, list]:
    """per_backend's table for cases that every backend runs."""
    return dict.fromkeys(("cpu", "triton", "cuda"), cases)


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits on the CPU: 'bit for bit' means -0.0 != 0.0 and NaN == NaN here."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


_EXPECTED: dict[Case, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def expected(c: Case, tokens: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's (sig, idx, pruned) of case c from its CPU inputs: prune_tokens is select of
    significance and a gather (SPEC.md), so one pass serves the three ops. Kept per case: every
    backend checks the same cases, and the full maps of the large ones take seconds."""
    if c not in _EXPECTED:
        sig = reference.significance(attn, c.score, c.P)
        idx = reference.select(sig, c.keep, c.strategy, c.grid)
        _EXPECTED[c] = sig, idx, reference.gather_rows(tokens, idx)
    return _EXPECTED[c]


def check_case(c: Case, backend: str, device="cpu", attn_layout: str | None = None, staged_ops: bool = True) -> None:
    """significance, prune_tokens and select of `backend` on `device` against the reference.
    attn_layout overrides c.layout for attn; staged_ops=False checks prune_tokens alone (cases whose
    staged ops would take too long under the interpreter)."""
    tokens, attn = make_inputs(c)  # CPU copies for the reference; the device gets the same layouts
    dt = lay_out(tokens.contiguous().to(device), c.layout)
    da = lay_out(attn.contiguous().to(device), attn_layout or c.layout)
    want_sig, want_idx, want_pruned = expected(c, tokens, attn)

    if staged_ops:
        sig = F.significance(da, score=c.score, num_prefix=c.P, backend=backend)
        assert sig.device == da.device and sig.dtype == torch.int64 and sig.shape == want_sig.shape
        assert torch.equal(sig.cpu(), want_sig)

    pruned, idx = F.prune_tokens(dt, da, c.keep, strategy=c.strategy, score=c.score, num_prefix=c.P, grid=c.grid,
                                 backend=backend)
    assert pruned.device == dt.device and idx.device == dt.device
    assert pruned.shape == want_pruned.shape and pruned.dtype == tokens.dtype
    assert idx.shape == want_idx.shape and idx.dtype == torch.int64
    assert pruned.is_contiguous() and idx.is_contiguous()
    assert not pruned.requires_grad and not idx.requires_grad
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(pruned.cpu(), want_pruned)
    assert torch.equal(bits(pruned), bits(want_pruned))

    if staged_ops:
        sel = F.select(want_sig.to(device), c.keep, strategy=c.strategy, grid=c.grid, backend=backend)
        assert torch.equal(sel.cpu(), want_idx)


def llava(b: int, score: str, strategy: str, small_d: bool = False, **kw) -> Case:
    """LLaVA-1.5 shape: CLIP ViT-L/14-336, 24 x 24 patches + CLS, 16 heads, 25% kept."""
    c = Case(B=b, N=576, H=16, D=64 if small_d else 1024, keep=144, strategy=strategy, score=score,
             P=1, attn_dtype=torch.float16, tok_dtype=torch.float16)
    return c.with_(**kw)


# ----------------------------------------------------------------------------- CPU tensors

# 1, 2, 16 cover the edge shapes (N = 1, single-row grids); 575 and 577 the odd sizes around a LLaVA
# grid with every score: the interpreter's share of grid_cases().
INTERPRETER_GRID = grid_cases(sizes=(1, 2, 16, 575, 577), small=True)


@pytest.mark.parametrize("backend,c", per_backend(kernel_backends(), {"cpu": grid_cases(), "triton": INTERPRETER_GRID}))
def test_grid(backend, c):
    check_case(c, backend)


# LLaVA-1.5 at full size for the C++ kernel; the interpreter runs the CLS row with D = 64 and the full
# map with 2 heads and D = 8.
LLAVA_FULL = [
    Case(B=8, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.float32),
    Case(B=2, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float16),
    Case(B=2, N=576, H=16, D=64, keep=144, strategy="row", score="focal", values="logits"),
]
LLAVA_SMALL = [
    *(llava(2, "cls", s, small_d=True, values="logits") for s in ("rank", "row")),
    *(llava(2, "cls", s, small_d=True, tok_dtype=torch.bfloat16, layout="strided") for s in ("rank", "row")),
    *(Case(B=2, N=576, H=2, D=8, keep=144, strategy=s, score="focal", values="logits") for s in ("rank", "row")),
]


@pytest.mark.parametrize("backend,c", per_backend(kernel_backends(), {"cpu": LLAVA_FULL + LLAVA_SMALL,
                                                                      "triton": LLAVA_SMALL}))
def test_llava_shapes(backend, c):
    check_case(c, backend)


# Empty batches and images, keep 0 / N, N = 1, D = 0, and row copies of 1, 2 and 6 bytes.
EDGES = [
    Case(B=0, N=16, keep=4),
    Case(B=0, N=16, keep=4, score="cls"),
    Case(B=3, N=16, keep=0, strategy="row"),
    Case(B=3, N=16, keep=16, score="cls"),
    Case(B=3, N=16, keep=16, values="quantised", score="focal", strategy="row"),
    Case(B=1, N=1, keep=1, score="received"),
    Case(B=2, N=1, keep=1, score="focal"),
    Case(B=2, N=1, keep=0, score="received"),
    Case(B=2, N=16, D=0, keep=5, score="cls"),
    Case(B=2, N=16, D=3, keep=5, tok_dtype=torch.float16),  # 6-byte rows: 2-byte copies
    Case(B=2, N=16, D=1, keep=5, tok_dtype=torch.bfloat16, layout="strided"),
    Case(B=2, N=16, D=4, keep=5, tok_dtype=torch.float32, layout="strided"),
]


@pytest.mark.parametrize("backend,c", per_backend(kernel_backends(), every(EDGES)))
def test_edges(backend, c):
    check_case(c, backend)


# Beyond one fused Triton tile (select.MAX_TILE) and LLaVA's grid: prune_tokens alone under the interpreter.
LARGE = [
    Case(B=1, N=65536, H=2, D=2, keep=16384, score="cls", attn_dtype=torch.float16, tok_dtype=torch.bfloat16),
    Case(B=1, N=65536, H=2, D=2, keep=4096, strategy="row", score="cls", values="quantised"),
    Case(B=1, N=4225, H=1, D=2, keep=1056, score="focal", grid=(65, 65), attn_dtype=torch.float16),
]


@pytest.mark.parametrize("backend,c", per_backend(kernel_backends(), every(LARGE)))
def test_large_n(backend, c):
    check_case(c, backend, staged_ops=backend != "triton")


# Random cases for the C++ kernel (60 of them would take the interpreter minutes).
@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n_rows=st.integers(1, 9),
    n_cols=st.integers(1, 9),
    b=st.integers(0, 3),
    h=st.integers(1, 3),
    p=st.integers(0, 3),
    score=st.sampled_from(["cls", "received", "focal"]),
    strategy=st.sampled_from(["rank", "row"]),
    keep_frac=st.floats(0, 1),
    attn_dtype=st.sampled_from(ATTN_DTYPES),
    tok_dtype=st.sampled_from(TOKEN_DTYPES),
    layout=st.sampled_from(["contiguous", "strided", "expanded"]),
    values=st.sampled_from(["softmax", "logits", "quantised", "special", "saturated", "symmetric"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_fuzz_cpu(n_rows, n_cols, b, h, p, score, strategy, keep_frac, attn_dtype, tok_dtype, layout, values, seed):
    if score == "cls":
        p = max(p, 1)
    n = n_rows * n_cols
    keep = int(keep_frac * n)
    if strategy == "row":
        keep = keep // n_cols * n_cols
    c = Case(
        B=b, N=n, H=h, D=3, keep=keep, strategy=strategy, score=score, P=p, grid=(n_rows, n_cols),
        attn_dtype=attn_dtype, tok_dtype=tok_dtype, layout=layout if b else "contiguous", values=values, seed=seed,
    )
    check_case(c, "cpu")


# ----------------------------------------------------------------------------- Triton's GPU paths on CPU tensors

# Staged path of inputs beyond the fused tile: significance -> chunked selection -> gather.
STAGED = [c.with_(H=3) for c in grid_cases(sizes=(2, 16), small=True) if c.keep] + [
    Case(B=2, N=575, H=2, D=4, keep=125, strategy="row", score="cls", grid=(23, 25), layout="strided"),
    Case(B=2, N=35, H=2, D=4, keep=13, score="received", grid=(5, 7), values="quantised", layout="expanded"),
]


@pytest.mark.parametrize("c", STAGED, ids=Case.id)
def test_triton_staged_path(interpreter, monkeypatch, c):
    from fopru_kernels.triton import select as tsel

    monkeypatch.setattr(tsel, "MAX_TILE", 1)
    monkeypatch.setattr(tsel, "SELECT_BLOCK", 4)  # several unit chunks ...
    monkeypatch.setattr(tsel, "SELECT_TILE", 16)  # ... and several column chunks per row sum
    check_case(c, "triton", staged_ops=False)


LAUNCH_SHAPES = [
    Case(B=2, N=16, H=5, D=40, keep=7, score="focal", attn_dtype=torch.bfloat16, layout="strided"),
    Case(B=2, N=16, H=5, D=40, keep=8, strategy="row", score="received", values="quantised"),
    Case(B=3, N=35, H=5, D=24, keep=14, strategy="row", score="focal", grid=(5, 7), attn_dtype=torch.float64),
    Case(B=2, N=35, H=5, D=24, keep=13, score="cls", P=2, layout="expanded", tok_dtype=torch.float32),
]


@pytest.mark.parametrize("c", LAUNCH_SHAPES, ids=Case.id)
def test_triton_launch_shapes(interpreter, monkeypatch, c):
    """The GPU's launch shapes (two output rows per program, small map tiles, partial head groups
    and CLS head blocks), which the interpreter otherwise avoids for speed."""
    from fopru_kernels.triton import prune_tokens as tk
    from fopru_kernels.triton import select as tsel

    monkeypatch.setattr(tsel, "rows_per_program", lambda batch, keep, device: 2)
    monkeypatch.setattr(tsel, "HEAD_BLOCK", 2)
    monkeypatch.setattr(tk, "_map_config", lambda batch, heads, n, device: (4, 8, 2))
    monkeypatch.setattr(tsel, "block_d", lambda d, rows: 16)
    check_case(c, "triton")


# ----------------------------------------------------------------------------- CUDA tensors


def _slow(cases):
    """Full maps of N = 2880 take seconds in the CPU reference: `slow` for the CUDA C++ kernels, whose
    gpu_check step has the smaller budget (N = 4096 in GPU_LARGE covers them)."""
    return [pytest.param(c, marks=pytest.mark.slow) if c.N > 600 and c.score != "cls" else c for c in cases]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), {"cuda": _slow(grid_cases()), "triton": grid_cases()}))
def test_grid_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(CUDA_CXX, {"cuda": grid_cases(sizes=(2, 16, 575))}))
def test_grid_global_keys(gpu, backend, c):
    # The selection falls back to keys in global memory when they do not fit in shared memory;
    # the test hook forces that path so the small grid exercises it too.
    with cuda_global_keys():
        check_case(c, backend, gpu)


# Rows padded to 16 elements start 16 B-aligned, so the map is read in 16 B vectors, and S = P + N is
# not a multiple of the vector width: the last vector of each row is partial.
VECTOR_TAIL = [
    Case(B=2, N=n, H=3, D=8, keep=n // 3, score=score, P=p, grid=(1, n), attn_dtype=dtype, values="logits")
    for score in ("received", "focal") for n, p in ((24, 1), (575, 1), (64, 3)) for dtype in ATTN_DTYPES
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), every(VECTOR_TAIL)))
def test_vector_loads_with_partial_tail(gpu, backend, c):
    check_case(c, backend, gpu, attn_layout="padded")
    check_case(c.with_(strategy="row", keep=c.N), backend, gpu, attn_layout="padded")


# B = 32 for Triton, the default on CUDA tensors; the CUDA C++ kernels at B = 8 and 1.
LLAVA_GPU = {
    "cuda": [
        Case(B=8, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.float16),
        Case(B=8, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float16),
        Case(B=8, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float32, strategy="row"),
        Case(B=1, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.bfloat16, strategy="row"),
        Case(B=1, N=576, H=16, D=1024, keep=144, score="received", attn_dtype=torch.float16, P=0),
    ],
    "triton": [llava(b, score, strategy, values="logits" if score == "cls" else "softmax")
               for b, score, strategy in [(1, "cls", "rank"), (1, "cls", "row"), (1, "focal", "rank"),
                                          (1, "received", "row"), (32, "cls", "rank"), (32, "focal", "rank"),
                                          (32, "focal", "row")]],
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), LLAVA_GPU))
def test_llava_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), every(EDGES)))
def test_edges_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


GPU_LARGE = [
    # keys of 16384 tokens fit in shared memory on H100 (~227 KiB), 65536 do not
    Case(B=2, N=16384, H=2, D=16, keep=4096, score="cls", grid=(128, 128)),
    Case(B=2, N=16384, H=2, D=16, keep=4096, score="cls", grid=(128, 128), strategy="row"),
    Case(B=2, N=65536, H=1, D=4, keep=6553, score="cls", grid=(256, 256), values="quantised"),
    Case(B=2, N=65536, H=1, D=4, keep=6400, score="cls", grid=(256, 256), strategy="row"),
    Case(B=1, N=65536, H=1, D=4, keep=65536, score="cls", grid=(1, 65536), strategy="row"),
    # several column tiles in the full-map reduction, scalar and vector loads
    Case(B=1, N=4096, H=1, D=8, keep=1000, score="focal", attn_dtype=torch.float16),
    Case(B=1, N=4096, H=1, D=8, keep=1024, score="focal", attn_dtype=torch.float16, P=0, strategy="row"),
    *LARGE,
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), {"cuda": GPU_LARGE, "triton": GPU_LARGE + STAGED}))
def test_large_n_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


# Captured once, replayed on the inputs of two other seeds: a small row grid with every score for the
# CUDA C++ kernels, LLaVA-1.5 for Triton.
GRAPH_CASES = {
    "cuda": [Case(B=2, N=64, H=4, D=32, keep=16, score=s, strategy="row", grid=(8, 8)) for s in ("cls", "received", "focal")],
    "triton": [llava(2, s, "rank") for s in ("cls", "focal")],
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), GRAPH_CASES))
def test_cuda_graph(gpu, backend, c):
    """Capture once, replay on new data: no host sync, no allocation outside the graph pool; an eager
    call on the same buffers agrees."""
    tokens, attn = make_inputs(c)
    dt, da = tokens.to(gpu), attn.to(gpu)

    def prune():
        return F.prune_tokens(dt, da, c.keep, strategy=c.strategy, score=c.score, num_prefix=c.P, grid=c.grid,
                              backend=backend)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (and compile) outside the capture, as torch.cuda.graphs advises
        prune()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pruned, idx = prune()
    for seed in (1, 2):
        tokens, attn = make_inputs(c.with_(seed=seed))
        dt.copy_(tokens)
        da.copy_(attn)
        graph.replay()
        torch.cuda.synchronize()
        want_pruned, want_idx = reference.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
        eager_pruned, eager_idx = prune()
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(eager_idx.cpu(), want_idx)
        assert torch.equal(pruned.cpu(), want_pruned) and torch.equal(eager_pruned.cpu(), want_pruned)


# torch.compile takes seconds per case: one for the CUDA C++ kernels, two for Triton.
COMPILE_CASES = {
    "cuda": [Case(B=2, N=144, H=4, D=64, keep=36, strategy="row", score="focal", grid=(12, 12))],
    "triton": [llava(2, s, "row") for s in ("cls", "focal")],
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend,c", per_backend(gpu_backends(), COMPILE_CASES))
def test_torch_compile(gpu, backend, c):
    """fullgraph compile of the forced-backend call (traced through fopru_cxx::prune_tokens where
    Triton holds the CUDA slot; Dynamo traces Triton's launches) and, where this backend holds the
    slot, of the op itself."""
    torch._dynamo.reset()
    compiler = "inductor" if importlib.util.find_spec("triton") is not None else "aot_eager"
    tokens, attn = make_inputs(c, gpu)
    want_pruned, want_idx = reference.prune_tokens(tokens.cpu(), attn.cpu(), c.keep, c.strategy, c.score, c.P, c.grid)
    fns = [lambda t, a: F.prune_tokens(t, a, c.keep, strategy=c.strategy, score=c.score, num_prefix=c.P, grid=c.grid,
                                       backend=backend)]
    if F.default_backend("cuda") == backend:  # then the op's CUDA kernel is this backend
        fns.append(lambda t, a: torch.ops.fopru.prune_tokens(t, a, c.keep, c.strategy, c.score, c.P, c.grid))
    for fn in fns:
        pruned, idx = torch.compile(fn, fullgraph=True, backend=compiler)(tokens, attn)
        assert torch.equal(idx.cpu(), want_idx)
        assert torch.equal(pruned.cpu(), want_pruned)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_non_default_stream(gpu, backend):
    c = Case(B=4, N=576, H=8, D=128, keep=144, score="focal", attn_dtype=torch.float16)
    tokens, attn = make_inputs(c)
    want_pruned, want_idx = reference.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dt, da = tokens.to(gpu), attn.to(gpu)
        pruned, idx = F.prune_tokens(dt, da, c.keep, strategy=c.strategy, score=c.score, num_prefix=c.P, backend=backend)
        sig = F.significance(da, score=c.score, num_prefix=c.P, backend=backend)
    stream.synchronize()
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(pruned.cpu(), want_pruned)
    assert torch.equal(sig.cpu(), reference.significance(attn, c.score, c.P))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_second_device(gpu, backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):  # inputs on cuda:1 while cuda:0 is current
        for score in ("cls", "focal"):
            check_case(Case(B=2, N=64, H=2, D=16, keep=20, score=score), backend, "cuda:1")


@pytest.mark.cuda
def test_op_runs_triton_where_library_lacks_cuda_kernels(gpu):
    """Without the compiled CUDA kernels, torch.ops.fopru.* on CUDA tensors must reach Triton.
    Checked in a fresh process with the library disabled, since this one has it loaded."""
    code = (
        "import torch, fopru_kernels as F\n"
        "assert not F.HAS_CUDA_KERNELS\n"
        "a = torch.rand(2, 4, 577, 577, device='cuda').softmax(-1); t = torch.randn(2, 576, 64, device='cuda').half()\n"
        "p, i = torch.ops.fopru.prune_tokens(t, a, 144, 'row', 'focal', 1, None)\n"
        "rp, ri = F.reference.prune_tokens(t.cpu(), a.cpu(), 144, 'row', 'focal')\n"
        "assert torch.equal(i.cpu(), ri) and torch.equal(p.cpu(), rp)\n"
        "s = torch.ops.fopru.significance(a[:, :, :1], 'cls', 1)\n"
        "assert torch.equal(s.cpu(), F.reference.significance(a[:, :, :1].cpu(), 'cls', 1))\n"
        "print('triton registration ok')\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, FOPRU_DISABLE_LIBRARY="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "triton registration ok" in out.stdout
