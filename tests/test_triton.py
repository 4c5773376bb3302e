"""The Triton kernels against reference.py, bit for bit (torch.equal, never tolerances).

Under TRITON_INTERPRET=1 (the Makefile sets it before Triton is imported) the kernels run on CPU
tensors: a trimmed grid, LLaVA-sized cases, and the paths that only large inputs or GPU launch
shapes reach, forced through the launchers' tuning knobs. With a GPU and no interpreter: the full
grid, LLaVA shapes, CUDA graph capture and replay, torch.compile. Nothing here touches the GPU at
import or collection time.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fopru_kernels as F  # noqa: E402
from cases import Case, grid_cases, make_inputs  # noqa: E402
from fopru_kernels import reference  # noqa: E402
from fopru_kernels._checks import check_prune  # noqa: E402
from fopru_kernels.triton import prune_tokens as tk  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# 1, 2, 16 cover the edge shapes (N = 1, single-row grids); 575 and 577 the odd sizes around a
# LLaVA grid with every score. The whole file takes ~1 min under the interpreter on 2 cores
# (52-73 s measured).
INTERPRETER_GRID = grid_cases(sizes=(1, 2, 16, 575, 577), small=True)


@pytest.fixture
def interpreter():
    if not INTERPRETED:
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported (the Makefile sets it)")


@pytest.fixture
def gpu():
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def check_case(c: Case, device: torch.device = torch.device("cpu"), staged_ops: bool = True) -> None:
    """significance, select and prune_tokens of the Triton backend equal the reference's."""
    tokens, attn = make_inputs(c, device)
    rows, cols = check_prune(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
    ref_sig = reference.significance(attn.cpu(), c.score, c.P)
    ref_pruned, ref_idx = reference.prune_tokens(tokens.cpu(), attn.cpu(), c.keep, c.strategy, c.score, c.P, c.grid)

    if staged_ops:
        assert torch.equal(tk.significance(attn, c.score, c.P).cpu(), ref_sig)
        assert torch.equal(tk.select(ref_sig.to(device), c.keep, c.strategy, rows, cols).cpu(), ref_idx)
    pruned, idx = tk.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, rows, cols)
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.device == tokens.device
    assert pruned.dtype == tokens.dtype and pruned.is_contiguous()
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(pruned.cpu(), ref_pruned)


def llava(b: int, score: str, strategy: str, small_d: bool = False, **kw) -> Case:
    """LLaVA-1.5 shape: CLIP ViT-L/14-336, 24 x 24 patches + CLS, 16 heads, 25% kept."""
    c = Case(B=b, N=576, H=16, D=64 if small_d else 1024, keep=144, strategy=strategy, score=score,
             P=1, attn_dtype=torch.float16, tok_dtype=torch.float16)
    return c.with_(**kw)


# ----------------------------------------------------------------------------- interpreter


@pytest.mark.parametrize("c", INTERPRETER_GRID, ids=[c.id() for c in INTERPRETER_GRID])
def test_grid(interpreter, c):
    check_case(c)


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_llava_cls(interpreter, strategy):
    check_case(llava(2, "cls", strategy, small_d=True, values="logits"))
    check_case(llava(2, "cls", strategy, small_d=True, tok_dtype=torch.bfloat16, layout="strided"))


@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_focal_llava_grid(interpreter, strategy):
    check_case(Case(B=2, N=576, H=2, D=8, keep=144, strategy=strategy, score="focal", values="logits"))


def test_empty_batch(interpreter):
    c = Case(B=0, N=16, keep=4)
    tokens, attn = make_inputs(c)
    assert tk.significance(attn, "focal", 1).shape == (0, 16)
    assert tk.select(torch.zeros(0, 16, dtype=torch.int64), 4, "rank", 4, 4).shape == (0, 4)
    pruned, idx = tk.prune_tokens(tokens, attn, 4, "rank", "focal", 1, 4, 4)
    assert pruned.shape == (0, 4, 8) and idx.shape == (0, 4)


# Staged path of inputs beyond the fused tile: significance -> chunked selection -> gather.
STAGED = [c.with_(H=3) for c in grid_cases(sizes=(2, 16), small=True) if c.keep] + [
    Case(B=2, N=575, H=2, D=4, keep=125, strategy="row", score="cls", grid=(23, 25), layout="strided"),
    Case(B=2, N=35, H=2, D=4, keep=13, score="received", grid=(5, 7), values="quantised", layout="expanded"),
]


@pytest.mark.parametrize("c", STAGED, ids=[c.id() for c in STAGED])
def test_staged_path(interpreter, monkeypatch, c):
    monkeypatch.setattr(tk, "_MAX_TILE", 1)
    monkeypatch.setattr(tk, "_SELECT_BLOCK", 4)  # several unit chunks ...
    monkeypatch.setattr(tk, "_SELECT_TILE", 16)  # ... and several column chunks per row sum
    check_case(c, staged_ops=False)


SELECT_EXTREMES = [(9, "rank", 9), (9, "rank", 4), (12, "row", 6), (12, "rank", 1)]


@pytest.mark.parametrize("n,strategy,keep", SELECT_EXTREMES)
def test_select_full_int64_range(interpreter, monkeypatch, n, strategy, keep):
    """Keys spanning the whole int64 range (a distance from the minimum of 2^64 - 1) and ties."""
    lo, hi = -(2**63), 2**63 - 1
    vals = torch.tensor([lo, hi, 0, -1, hi, lo + 1, hi - 1, 2**62, -(2**62)], dtype=torch.int64)
    sig = vals[torch.randint(0, len(vals), (3, n), generator=torch.Generator().manual_seed(n + keep))]
    sig[0] = hi
    rows, cols = (n // 3, 3) if strategy == "row" else (1, n)
    if strategy == "row":  # row sums must stay inside int64, as SPEC.md's limit guarantees
        sig = sig // 4
    ref = reference.select(sig, keep, strategy, (rows, cols) if strategy == "row" else None)
    assert torch.equal(tk.select(sig, keep, strategy, rows, cols), ref)
    monkeypatch.setattr(tk, "_SELECT_BLOCK", 2)
    assert torch.equal(tk.select(sig, keep, strategy, rows, cols), ref)


LAUNCH_SHAPES = [
    Case(B=2, N=16, H=5, D=40, keep=7, score="focal", attn_dtype=torch.bfloat16, layout="strided"),
    Case(B=2, N=16, H=5, D=40, keep=8, strategy="row", score="received", values="quantised"),
    Case(B=3, N=35, H=5, D=24, keep=14, strategy="row", score="focal", grid=(5, 7), attn_dtype=torch.float64),
    Case(B=2, N=35, H=5, D=24, keep=13, score="cls", P=2, layout="expanded", tok_dtype=torch.float32),
]


@pytest.mark.parametrize("c", LAUNCH_SHAPES, ids=[c.id() for c in LAUNCH_SHAPES])
def test_gpu_launch_shapes(interpreter, monkeypatch, c):
    """The GPU's launch shapes (two output rows per program, small map tiles, partial head groups
    and CLS head blocks), which the interpreter otherwise avoids for speed."""
    monkeypatch.setattr(tk, "_rows_per_program", lambda batch, keep, device: 2)
    monkeypatch.setattr(tk, "_HEAD_BLOCK", 2)
    monkeypatch.setattr(tk, "_map_config", lambda batch, heads, n, device: (4, 8, 2))
    monkeypatch.setattr(tk, "_block_d", lambda d, rows: 16)
    check_case(c)


LARGE = [
    Case(B=1, N=65536, H=2, D=2, keep=16384, score="cls", attn_dtype=torch.float16, tok_dtype=torch.bfloat16),
    Case(B=1, N=65536, H=2, D=2, keep=4096, strategy="row", score="cls", values="quantised"),
    Case(B=1, N=4225, H=1, D=2, keep=1056, score="focal", grid=(65, 65), attn_dtype=torch.float16),
]


@pytest.mark.parametrize("c", LARGE, ids=[c.id() for c in LARGE])
def test_large_n(interpreter, c):
    check_case(c, staged_ops=False)


# ----------------------------------------------------------------------------- GPU

FULL_GRID = grid_cases()


@pytest.mark.cuda
@pytest.mark.parametrize("c", FULL_GRID, ids=[c.id() for c in FULL_GRID])
def test_grid_gpu(gpu, c):
    check_case(c, gpu)


LLAVA_GPU = [(1, "cls", "rank"), (1, "cls", "row"), (1, "focal", "rank"), (1, "received", "row"),
             (32, "cls", "rank"), (32, "focal", "rank"), (32, "focal", "row")]


@pytest.mark.cuda
@pytest.mark.parametrize("b,score,strategy", LLAVA_GPU)
def test_llava_gpu(gpu, b, score, strategy):
    check_case(llava(b, score, strategy, values="logits" if score == "cls" else "softmax"), gpu)


@pytest.mark.cuda
def test_large_n_gpu(gpu):
    for c in LARGE + STAGED:
        check_case(c, gpu)


def _prune_triton(tokens, attn, keep, strategy, score):
    return F.prune_tokens(tokens, attn, keep, strategy=strategy, score=score, backend="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("score", ["cls", "focal"])
def test_cuda_graph(gpu, score):
    """Capture once, replay on new data: no host sync, no allocation outside the graph pool."""
    cases = [llava(2, score, "rank", seed=s) for s in (0, 1)]
    inputs = [make_inputs(c) for c in cases]
    tokens, attn = make_inputs(cases[0], gpu)
    _prune_triton(tokens, attn, 144, "rank", score)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pruned, idx = _prune_triton(tokens, attn, 144, "rank", score)
    for t_cpu, a_cpu in inputs:
        tokens.copy_(t_cpu)
        attn.copy_(a_cpu)
        graph.replay()
        ref_pruned, ref_idx = reference.prune_tokens(t_cpu, a_cpu, 144, "rank", score)
        assert torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(pruned.cpu(), ref_pruned)


@pytest.mark.cuda
@pytest.mark.parametrize("score", ["cls", "focal"])
def test_torch_compile(gpu, score):
    """fullgraph compile of the forced-Triton call (Dynamo traces the launches) and of the op."""
    torch._dynamo.reset()
    tokens, attn = make_inputs(llava(2, score, "row"), gpu)
    ref_pruned, ref_idx = reference.prune_tokens(tokens.cpu(), attn.cpu(), 144, "row", score)
    fns = [lambda t, a: _prune_triton(t, a, 144, "row", score)]
    if F.default_backend("cuda") == "triton":  # then the op's CUDA kernel is this backend
        fns.append(lambda t, a: torch.ops.fopru.prune_tokens(t, a, 144, "row", score))
    for fn in fns:
        pruned, idx = torch.compile(fn, fullgraph=True)(tokens, attn)
        assert torch.equal(idx.cpu(), ref_idx)
        assert torch.equal(pruned.cpu(), ref_pruned)


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
