"""The CUDA C++ kernels against the reference, bit for bit.

They are called as fopru_kernels.<op>(..., backend="cuda"), which reaches them whatever FOPRU_BACKEND
put in the dispatcher's CUDA slot (Triton by default; README "Backends"). Every test is marked
cuda_cxx: scripts/gpu_check.sh reports them apart, as the evidence to make these kernels the default.
Skipped without a GPU or when the library was built without its CUDA kernels; nothing here touches
the GPU at import or collection time.
"""
import importlib.util

import pytest
import torch

import fopru_kernels as F
from cases import ATTN_DTYPES, Case, grid_cases, lay_out, make_inputs
from conftest import call
from fopru_kernels import reference

pytestmark = [pytest.mark.cuda, pytest.mark.cuda_cxx]


class _CxxOps:
    """ops.<op>(*args in schema order), like torch.ops.fopru.<op>, but always the CUDA C++ kernel."""

    def __getattr__(self, op):
        return lambda *args: call(op, args, "cuda")


ops = _CxxOps()

# The selection falls back to keys in global memory when they do not fit in shared memory;
# this switch forces that path so the small grid exercises it too.
FORCE_GLOBAL = "FOPRU_CUDA_FORCE_GLOBAL_KEYS"


@pytest.fixture(autouse=True)
def _needs_cuda_kernels():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if not getattr(F.ops, "HAS_CUDA_KERNELS", False):
        pytest.skip("fopru_kernels._C has no CUDA kernels (library absent or built without CUDA)")


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits on the CPU: 'bit for bit' means -0.0 != 0.0 and NaN == NaN here."""
    t = t.detach().cpu().contiguous()
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def grid_arg(c: Case):
    return None if c.grid is None else list(c.grid)


def check_case(c: Case, device="cuda", attn_layout: str | None = None) -> None:
    """All three ops on `device` against the reference on the CPU copies of the same inputs."""
    tokens, attn = make_inputs(c)  # CPU copies for the reference; the device gets the same layouts
    dt = lay_out(tokens.contiguous().to(device), c.layout)
    da = lay_out(attn.contiguous().to(device), attn_layout or c.layout)
    # prune_tokens is select(significance) + gather (SPEC.md): one pass of the reference over the map
    want_sig = reference.significance(attn, c.score, c.P)
    want_idx = reference.select(want_sig, c.keep, c.strategy, c.grid)
    want_pruned = reference.gather_rows(tokens, want_idx)

    sig = ops.significance(da, c.score, c.P)
    assert sig.device == da.device and sig.dtype == torch.int64
    assert torch.equal(sig.cpu(), want_sig)

    pruned, idx = ops.prune_tokens(dt, da, c.keep, c.strategy, c.score, c.P, grid_arg(c))
    assert pruned.device == dt.device and idx.device == dt.device
    assert pruned.shape == want_pruned.shape and pruned.dtype == tokens.dtype
    assert pruned.is_contiguous() and idx.is_contiguous()
    assert not pruned.requires_grad and not idx.requires_grad
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(bits(pruned), bits(want_pruned))

    sel = ops.select(want_sig.to(device), c.keep, c.strategy, grid_arg(c))
    assert torch.equal(sel.cpu(), want_idx)


def _marked(cases):
    """Full maps of N = 2880 take seconds in the CPU reference: `slow` (N = 4096 below covers them)."""
    return [pytest.param(c, marks=pytest.mark.slow) if c.N > 600 and c.score != "cls" else c for c in cases]


@pytest.mark.parametrize("c", _marked(grid_cases()), ids=Case.id)
def test_grid(c):
    check_case(c)


@pytest.mark.parametrize("c", grid_cases(sizes=(2, 16, 575)), ids=Case.id)
def test_grid_global_keys(c, monkeypatch):
    monkeypatch.setenv(FORCE_GLOBAL, "1")
    check_case(c)


@pytest.mark.parametrize("dtype", ATTN_DTYPES, ids=str)
@pytest.mark.parametrize("n,p", [(24, 1), (575, 1), (64, 3)])
@pytest.mark.parametrize("score", ["received", "focal"])
def test_vector_loads_with_partial_tail(dtype, n, p, score):
    # Rows padded to 16 elements start 16 B-aligned, so the map is read in 16 B vectors, and
    # S = P + N is not a multiple of the vector width: the last vector of each row is partial.
    c = Case(B=2, N=n, H=3, D=8, keep=n // 3, score=score, P=p, grid=(1, n), attn_dtype=dtype, values="logits")
    check_case(c, attn_layout="padded")
    check_case(c.with_(strategy="row", keep=n), attn_layout="padded")


@pytest.mark.parametrize(
    "c",
    [
        Case(B=8, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.float16),
        Case(B=8, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float16),
        Case(B=8, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float32, strategy="row"),
        Case(B=1, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.bfloat16, strategy="row"),
        Case(B=1, N=576, H=16, D=1024, keep=144, score="received", attn_dtype=torch.float16, P=0),
    ],
    ids=Case.id,
)
def test_llava_shapes(c):
    check_case(c)


@pytest.mark.parametrize(
    "c",
    [
        # keys of 16384 tokens fit in shared memory on H100 (~227 KiB), 65536 do not
        Case(B=2, N=16384, H=2, D=16, keep=4096, score="cls", grid=(128, 128)),
        Case(B=2, N=16384, H=2, D=16, keep=4096, score="cls", grid=(128, 128), strategy="row"),
        Case(B=2, N=65536, H=1, D=4, keep=6553, score="cls", grid=(256, 256), values="quantised"),
        Case(B=2, N=65536, H=1, D=4, keep=6400, score="cls", grid=(256, 256), strategy="row"),
        Case(B=1, N=65536, H=1, D=4, keep=65536, score="cls", grid=(1, 65536), strategy="row"),
        # several column tiles in the full-map reduction, scalar and vector loads
        Case(B=1, N=4096, H=1, D=8, keep=1000, score="focal", attn_dtype=torch.float16),
        Case(B=1, N=4096, H=1, D=8, keep=1024, score="focal", attn_dtype=torch.float16, P=0, strategy="row"),
    ],
    ids=Case.id,
)
def test_large_n(c):
    check_case(c)


@pytest.mark.parametrize(
    "c",
    [
        Case(B=0, N=16, keep=4),
        Case(B=0, N=16, keep=4, score="cls"),
        Case(B=3, N=16, keep=0, strategy="row"),
        Case(B=3, N=16, keep=16, score="cls"),
        Case(B=2, N=1, keep=1, score="focal"),
        Case(B=2, N=1, keep=0, score="received"),
        Case(B=2, N=16, D=0, keep=5, score="cls"),
        Case(B=2, N=16, D=3, keep=5, tok_dtype=torch.float16),  # 6-byte rows: 2-byte copies
        Case(B=2, N=16, D=1, keep=5, tok_dtype=torch.bfloat16, layout="strided"),
        Case(B=2, N=16, D=4, keep=5, tok_dtype=torch.float32, layout="strided"),
    ],
    ids=Case.id,
)
def test_edges(c):
    check_case(c)


def test_heavy_ties_take_the_lowest_indices():
    attn = torch.full((3, 2, 17, 17), 0.25, device="cuda")
    tokens = torch.randn(3, 16, 4, device="cuda")
    for score in ("focal", "received", "cls"):
        pruned, idx = ops.prune_tokens(tokens, attn, 5, "rank", score, 1, None)
        assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
        assert torch.equal(pruned, tokens[:, :5])


@pytest.mark.parametrize("layout", ["transposed", "expanded", "extreme"])
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_select_any_strides_and_values(layout, strategy):
    g = torch.Generator().manual_seed(3)
    sig = torch.randint(-(2**40), 2**40, (4, 36), generator=g, dtype=torch.int64)
    if layout == "extreme":  # row sums wrap around like torch's int64 sum
        sig = torch.randint(-(2**63), 2**63 - 1, (4, 36), generator=g, dtype=torch.int64)
        sig[:, ::5] = 2**63 - 1
        sig[:, 1::7] = -(2**63)
    if layout == "expanded":
        sig = sig[:1].expand(4, 36)
    d = sig.contiguous().cuda()
    if layout == "transposed":
        d = d.t().contiguous().t()
    elif layout == "expanded":
        d = d[:1].expand(4, 36)
    for keep in (0, 1, 6, 12, 30, 36):
        if strategy == "row" and keep % 6:
            continue
        want = reference.select(sig, keep, strategy, (6, 6))
        assert torch.equal(ops.select(d, keep, strategy, [6, 6]).cpu(), want)


@pytest.mark.parametrize("score", ["cls", "focal", "received"])
def test_cuda_graph_capture_and_replay(score):
    c = Case(B=2, N=64, H=4, D=32, keep=16, score=score, strategy="row", grid=(8, 8))
    tokens, attn = make_inputs(c)
    dt, da = tokens.cuda(), attn.cuda()
    args = (c.keep, c.strategy, c.score, c.P, grid_arg(c))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch.cuda.graphs advises
        ops.prune_tokens(dt, da, *args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pruned, idx = ops.prune_tokens(dt, da, *args)
    for seed in (1, 2):
        tokens, attn = make_inputs(c.with_(seed=seed))
        dt.copy_(tokens)
        da.copy_(attn)
        graph.replay()
        torch.cuda.synchronize()
        want_pruned, want_idx = reference.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
        eager_pruned, eager_idx = ops.prune_tokens(dt, da, *args)
        assert torch.equal(idx.cpu(), want_idx) and torch.equal(eager_idx.cpu(), want_idx)
        assert torch.equal(pruned.cpu(), want_pruned) and torch.equal(eager_pruned.cpu(), want_pruned)


def test_torch_compile_fullgraph():
    backend = "inductor" if importlib.util.find_spec("triton") is not None else "aot_eager"

    def prune(tokens, attn):  # traced through fopru_cxx::prune_tokens where Triton holds the CUDA slot
        return F.prune_tokens(tokens, attn, 36, strategy="row", score="focal", grid=[12, 12], backend="cuda")

    c = Case(B=2, N=144, H=4, D=64, keep=36, strategy="row", score="focal", grid=(12, 12))
    tokens, attn = make_inputs(c)
    dt, da = tokens.cuda(), attn.cuda()
    compiled = torch.compile(prune, fullgraph=True, backend=backend)
    got_pruned, got_idx = compiled(dt, da)
    want_pruned, want_idx = reference.prune_tokens(tokens, attn, 36, "row", "focal", 1, (12, 12))
    assert torch.equal(got_idx.cpu(), want_idx)
    assert torch.equal(got_pruned.cpu(), want_pruned)


def test_non_default_stream():
    c = Case(B=4, N=576, H=8, D=128, keep=144, score="focal", attn_dtype=torch.float16)
    tokens, attn = make_inputs(c)
    want_pruned, want_idx = reference.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        dt, da = tokens.cuda(), attn.cuda()
        pruned, idx = ops.prune_tokens(dt, da, c.keep, c.strategy, c.score, c.P, None)
        sig = ops.significance(da, c.score, c.P)
    stream.synchronize()
    assert torch.equal(idx.cpu(), want_idx)
    assert torch.equal(pruned.cpu(), want_pruned)
    assert torch.equal(sig.cpu(), reference.significance(attn, c.score, c.P))


def test_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    with torch.cuda.device(0):  # inputs on cuda:1 while cuda:0 is current
        for score in ("cls", "focal"):
            check_case(Case(B=2, N=64, H=2, D=16, keep=20, score=score), device="cuda:1")


def _t(b=2, n=16, d=3):
    return torch.randn(b, n, d, device="cuda")


def _a(b=2, h=2, q=17, s=17, dtype=torch.float32):
    return torch.rand(b, h, q, s, device="cuda").to(dtype)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: ops.prune_tokens(_t(), _a(), 17, "rank", "focal", 1, None), r"keep must be in \[0, N\] = \[0, 16\], got 17"),
        (
            lambda: ops.prune_tokens(_t(), _a(), 6, "row", "focal", 1, None),
            r"keep must be a multiple of cols = 4 for strategy='row', got 6: nearest valid values are 4 and 8",
        ),
        (lambda: ops.prune_tokens(_t(n=17), _a(q=1), 2, "rank", "cls", 0, None), r"score='cls' needs num_prefix >= 1"),
        (lambda: ops.prune_tokens(_t(), _a(q=1), 2, "rank", "received", 1, None), r"score='received' needs a square map"),
        (lambda: ops.prune_tokens(_t(), _a().cpu(), 2, "rank", "focal", 1, None), r"attn must be on the same device as tokens \(cuda:0\), got cpu"),
        (lambda: ops.prune_tokens(_t(), _a(b=3), 2, "rank", "focal", 1, None), r"attn.shape\[0\] \(B\) must equal tokens.shape\[0\] = 2, got 3"),
        (lambda: ops.prune_tokens(_t(), _a(), 2, "rank", "focal", 1, [3, 3]), r"grid must be \(rows, cols\)"),
        (lambda: ops.significance(_a(dtype=torch.float32).int(), "focal", 1), r"attn must be float16, bfloat16, float32 or float64, got int32"),
        (lambda: ops.significance(_a(), "mean", 1), r"score must be 'focal', 'received' or 'cls', got 'mean'"),
        (lambda: ops.select(torch.zeros(2, 16, dtype=torch.int32, device="cuda"), 2, "rank", None), r"sig must be a 2-D \(B, N\) int64 tensor"),
        (lambda: ops.select(torch.zeros(2, 16, dtype=torch.int64, device="cuda"), 2, "top", None), r"strategy must be 'rank' or 'row', got 'top'"),
    ],
    ids=["keep", "row-multiple", "cls-prefix", "not-square", "device", "batch", "grid", "attn-dtype", "score", "sig-dtype", "strategy"],
)
def test_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()
