"""Significance from q and k (SPEC.md "Significance from q and k"): the C++ CPU, Triton and CUDA
kernels against the float64 oracle reference_qk.py.

The kernels form every value in float32, so `sig` may differ from the oracle's by rounding; SPEC.md
asks for a stated bound on that and exact indices wherever the oracle's selection margin exceeds it.

The bound, per image, head and token, in units of the fixed point's resolution 2^-28: with
u = 2^-24 (float32 rounding), A_ij = |scale| * sum_m |q_im| |k_jm| (the size of every term of the
logit l_ij = scale * q_i . k_j) and C = 32,
- a logit is off by at most C u A_ij: the dot product (and, for the closed-form means
  scale * qbar . k_j, the sum that forms qbar) rounds each term's contribution at most C times.
  Float32 accumulation in tree / blocked order (tl.sum, tensor-core dots, warp reductions) grows
  the error with log2 of the length, and sequential sums grow it like a random walk, sqrt(length);
  both stay under 32 for the S, d <= 2^10 of these tests (a worst-case bound, length * u, would be
  too loose to ever test exact indices at LLaVA size);
- lse is off by at most C u (max_j A_ij + |lse_i| + 1) (its logits, the float32 rounding of its
  magnitude, the log), so p_ij = exp(l_ij - lse_i) is off by p_ij (C u A_ij + that + C u), exp's
  own rounding included;
- a mean of such values is off by the mean of their errors plus C u times the mean of |v|
  (its sum), and fx adds at most 1 (truncation of a value that moved across a step).
Summed over heads this is `bound`, and |sig - sig_ref| <= bound is asserted elementwise (for
focal, where the oracle's variance choice is not decisive, i.e. the gap between the two vectors'
variances about their own means is within what the bound lets it move, sig may lie that close to
either vector). Then idx must equal the oracle's when the
margin at its selection boundary (K-th vs (K+1)-th key for rank, row score for row) exceeds twice
the largest bound (summed over a row for row) and any focal choice is decisive. Every case
must have at least one image so checked, so no case passes vacuously. The kernel's own idx must
also equal the exact selection of its own sig, and pruned its tokens gathered at idx, bit for bit.

The C++ CPU kernel ("cpu": float32 dots summed in order of d, float64 sums of means and of exp)
runs the CPU cases whenever the library is built; under TRITON_INTERPRET=1 the Triton kernels run
them too (small shapes, plus the GPU launch shapes forced through the launchers' knobs); with a GPU, "triton" and "cuda" run the same cases,
LLaVA-sized ones, CUDA graph capture and replay, and torch.compile. Nothing here touches the GPU at
import or collection time.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import fopru_kernels as F  # noqa: E402
from cases import QKCase, make_qk  # noqa: E402
from conftest import gpu_backends, kernel_backends  # noqa: E402
from qk_oracle import oracle  # noqa: E402
from fopru_kernels import reference, reference_qk  # noqa: E402
from fopru_kernels.triton import select as tsel  # noqa: E402
from fopru_kernels.triton import significance_qk as tq  # noqa: E402


# ----------------------------------------------------------------------------- the margin (the bound: qk_oracle.py)


def margin_ok(c: QKCase, sig_ref: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the oracle's selection boundary is wider than twice the bound."""
    if c.keep in (0, c.N):
        return torch.ones(c.B, dtype=torch.bool)
    if c.strategy == "row":
        w = c.cols
        sig_ref, bound, count = sig_ref.view(c.B, -1, w).sum(2), bound.view(c.B, -1, w).sum(2), c.keep // w
    else:
        count = c.keep
    top = sig_ref.sort(dim=1, descending=True).values
    return (top[:, count - 1] - top[:, count]).double() > 2 * bound.amax(dim=1)


# ----------------------------------------------------------------------------- the check


def run(c: QKCase, backend: str, tokens, q, k, lse):
    """(sig, pruned, idx) of one backend, on the CPU."""
    opts = dict(score=c.score, num_prefix=c.P, scale=c.scale, lse=lse, kind=c.kind, layout=c.layout, backend=backend)
    sig = F.significance_qk(q, k, **opts)
    pruned, idx = F.prune_tokens_qk(tokens, q, k, c.keep, strategy=c.strategy, grid=c.grid, **opts)
    assert sig.dtype == torch.int64 and sig.shape == (c.B, c.N) and sig.device == q.device
    assert idx.dtype == torch.int64 and idx.is_contiguous() and idx.shape == (c.B, c.keep)
    assert pruned.dtype == tokens.dtype and pruned.is_contiguous()
    return sig.cpu(), pruned.cpu(), idx.cpu()


def verify(c: QKCase, tokens, q, k, lse, sig, pruned, idx) -> None:
    """A backend's outputs against the oracle, as the module docstring says."""
    tokens, q, k, lse = tokens.cpu(), q.cpu(), k.cpu(), None if lse is None else lse.cpu()
    sig_ref, bound, decided, alt_ref, alt_bound = oracle(c, q, k, lse)
    err = (sig - sig_ref).abs().double()
    worst = (err - bound).argmax()
    assert bool((err[decided] <= bound[decided]).all()), (
        f"error {err.flatten()[worst].item()} over its bound {bound.flatten()[worst].item()}")
    # An undecided focal choice may go either way, but whole: every value near one vector.
    near = (err <= bound).all(dim=1) | ((sig - alt_ref).abs().double() <= alt_bound).all(dim=1)
    assert bool(near.all())

    grid = c.grid
    _, idx_ref = reference_qk.prune_tokens_qk(tokens, q, k, c.keep, c.strategy, c.score, c.P, grid,
                                              c.scale, lse, c.kind, c.layout)
    checked = decided & margin_ok(c, sig_ref, bound)
    assert checked.any(), "no image with a decisive margin: the case would test nothing"
    assert torch.equal(idx[checked], idx_ref[checked])
    if c.score != "focal":  # focal: the two kernels may split a near-tie of vc and vr apart
        assert torch.equal(idx, reference.select(sig, c.keep, c.strategy, grid))
    assert torch.equal(pruned, reference.gather_rows(tokens, idx))


def check_case(c: QKCase, backend: str, device="cpu") -> None:
    tokens, q, k, lse = make_qk(c, device)
    verify(c, tokens, q, k, lse, *run(c, backend, tokens, q, k, lse))


GRIDS = {4: (2, 2), 16: (4, 4), 48: (6, 8), 49: (7, 7)}


def qk_cases() -> list[QKCase]:
    """Every score x kind x layout x strategy, with sizes (S = 5 ... 51), prefixes, heads, head
    dims, dtypes, strides, given / computed lse, scales and keeps spread over the grid."""
    cases = []
    i = 0
    for score in ("cls", "received", "focal"):
        for kind in ("prob", "logit"):
            for layout in ("bhsd", "bshd"):
                for strategy in ("rank", "row"):
                    for pick in range(2):  # an edge keep (0, 1, N) and one inside
                        n = (4, 16, 49, 48)[(i // 2 + pick) % 4]
                        g = GRIDS[n]
                        keep = (0, 1, n)[i // 2 % 3] if pick == 0 else max(1, n // 3)
                        if strategy == "row":
                            keep = (keep if pick == 0 else g[1] * max(1, g[0] // 3)) // g[1] * g[1]
                        cases.append(QKCase(
                            B=2 + i % 2, N=n, H=1 + i % 3, d=(8, 16, 24, 64)[(i // 3) % 4],
                            P=(1, 2)[i % 2] if score == "cls" else (0, 1, 2)[i % 3],
                            keep=keep, strategy=strategy, score=score, kind=kind, layout=layout,
                            dtype=(torch.float16, torch.bfloat16, torch.float32)[(i // 2 + i // 8) % 3],
                            grid=g if strategy == "row" or n == 48 else None,
                            strided=(i // 5) % 2 == 1, given_lse=kind == "prob" and i % 4 < 2,
                            scale=(None, 0.3, -0.7)[(i // 7) % 3],
                            magnitude=12.0 if kind == "logit" and i % 5 == 0 else 1.0, seed=i,
                        ))
                        i += 1
    return cases


CASES = qk_cases()


# Backends of the CPU-tensor tests: the C++ kernel, and Triton under the interpreter.
CPU_BACKENDS = kernel_backends()
GPU_BACKENDS = gpu_backends()


def llava(b: int, score: str, strategy: str, kind: str, **kw) -> QKCase:
    """LLaVA-1.5's vision tower: CLIP ViT-L/14-336, 24 x 24 patches + CLS, 16 heads of d = 64."""
    return QKCase(B=b, N=576, H=16, d=64, P=1, keep=144, strategy=strategy, score=score, kind=kind,
                  grid=(24, 24), dtype=torch.float16).with_(**kw)


# ----------------------------------------------------------------------------- CPU tensors


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=[c.id() for c in CASES])
def test_cases(backend, c):
    check_case(c, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("score,kind", [("cls", "prob"), ("focal", "prob"), ("focal", "logit")])
def test_llava_sized(backend, score, kind):
    """S = 577 (odd, several tiles of every kernel) with LLaVA's head dim, fewer heads."""
    check_case(llava(1, score, "rank", kind, H=2, layout="bshd"), backend)


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
@pytest.mark.parametrize("score,strategy,kind,given_lse", [
    ("cls", "rank", "prob", True), ("focal", "row", "prob", False), ("received", "rank", "logit", False)])
def test_llava_cpu(score, strategy, kind, given_lse):
    """The C++ kernel at LLaVA-1.5's full size (16 heads), where the interpreter would be too slow."""
    check_case(llava(2, score, strategy, kind, layout="bshd", given_lse=given_lse), "cpu")


LAUNCH_SHAPES = [
    QKCase(B=2, N=49, H=3, d=24, P=2, keep=14, strategy="row", score="focal", kind="prob", strided=True),
    QKCase(B=2, N=48, H=2, d=8, P=0, keep=11, score="received", kind="prob", given_lse=True, grid=(6, 8),
           layout="bshd", dtype=torch.bfloat16),
    QKCase(B=3, N=35, H=3, d=40, P=1, keep=10, score="cls", kind="prob", grid=(5, 7), dtype=torch.float32),
    QKCase(B=2, N=35, H=2, d=16, P=1, keep=14, strategy="row", score="focal", kind="logit", grid=(5, 7),
           layout="bshd", strided=True),
]


@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("c", LAUNCH_SHAPES, ids=[c.id() for c in LAUNCH_SHAPES])
def test_gpu_launch_shapes(interpreter, monkeypatch, c, staged):
    """The GPU's launch shapes (several key and query tiles per head, several token blocks, two
    output rows per gather program), and the staged selection of inputs beyond the fused tile."""
    monkeypatch.setattr(tq, "tile_config", lambda device: (16, 16, 4))
    monkeypatch.setattr(tq, "_vec_block", lambda n, block_d, device: 8)
    monkeypatch.setattr(tq, "_cls_block", lambda batch, n, block_d, device: 4)
    monkeypatch.setattr(tsel, "rows_per_program", lambda batch, keep, device: 2)
    if staged:
        monkeypatch.setattr(tsel, "MAX_TILE", 1)
    check_case(c, "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_batch(backend):
    tokens, q, k, _ = make_qk(QKCase(B=0, N=16))
    assert F.significance_qk(q, k, backend=backend).shape == (0, 16)
    pruned, idx = F.prune_tokens_qk(tokens, q, k, 4, backend=backend)
    assert pruned.shape == (0, 4, 8) and idx.shape == (0, 4)


def _materialised_check(c: QKCase, device, backend: str) -> None:
    """cls / prob scores from q and k select what the map path selects on the materialised
    softmax (both exact selections of values within the bound), wherever the margin is wide."""
    tokens, q, k, _ = make_qk(c, device)
    probs = torch.softmax(c.d**-0.5 * (q.float() @ k.float().transpose(-1, -2)), dim=-1)
    map_sig = F.significance(probs[:, :, :1], score="cls", num_prefix=c.P, backend=backend).cpu()
    map_pruned, map_idx = F.prune_tokens(tokens, probs[:, :, :1], c.keep, strategy=c.strategy, score="cls", num_prefix=c.P,
                                         grid=c.grid, backend=backend)
    sig = F.significance_qk(q, k, score="cls", num_prefix=c.P, backend=backend).cpu()
    pruned, idx = F.prune_tokens_qk(tokens, q, k, c.keep, strategy=c.strategy, score="cls", num_prefix=c.P, grid=c.grid,
                                    backend=backend)
    sig_ref, bound, *_ = oracle(c, q, k, None)
    # The map path's float32 softmax rounds within the same bound as the kernels.
    assert bool(((map_sig - sig_ref).abs().double() <= bound).all())
    assert bool(((sig - map_sig).abs().double() <= 2 * bound).all())
    wide = margin_ok(c, sig_ref, 2 * bound)
    assert wide.any(), "no image with a wide margin: the case would test nothing"
    assert torch.equal(idx.cpu()[wide], map_idx.cpu()[wide])
    assert torch.equal(pruned.cpu()[wide], map_pruned.cpu()[wide])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_matches_materialised_softmax(backend, strategy):
    _materialised_check(QKCase(B=2, N=49, H=3, d=32, P=1, keep=14, strategy=strategy, score="cls",
                               dtype=torch.float32), "cpu", backend)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("c", CASES, ids=[c.id() for c in CASES])
def test_cases_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


# The GPU kernels' tile edges: N across 64-wide key blocks and key-block groups (80, 300), d not a
# multiple of 16 (zero-padded fragments), every dtype (mma for 16-bit, FMA for float32), strided.
TILE_EDGES = [
    QKCase(B=2, N=n, H=2, d=d, P=p, keep=n // 4, score=score, kind=kind, dtype=dt, layout=layout,
           strided=i % 2 == 1, given_lse=kind == "prob" and i % 3 == 0, seed=100 + i)
    for i, (n, d, p, score, kind, dt, layout) in enumerate([
        (80, 40, 1, "received", "prob", torch.float16, "bhsd"),
        (80, 24, 0, "focal", "prob", torch.bfloat16, "bshd"),
        (300, 40, 2, "focal", "prob", torch.float32, "bhsd"),
        (300, 64, 1, "received", "prob", torch.bfloat16, "bshd"),
        (300, 24, 1, "cls", "prob", torch.float16, "bshd"),
        (300, 40, 1, "focal", "logit", torch.float32, "bshd"),
    ])
]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("c", TILE_EDGES, ids=[c.id() for c in TILE_EDGES])
def test_tile_edges_gpu(gpu, backend, c):
    check_case(c, backend, gpu)


# B = 32 once (the float64 oracle of 32 images takes ~20 s); B = 8 runs the same launch paths.
LLAVA_GPU = [(1, "cls", "rank", "prob"), (1, "focal", "row", "prob"), (1, "focal", "rank", "logit"),
             (8, "cls", "rank", "logit"), (8, "received", "rank", "prob"), (32, "focal", "row", "prob"),
             (8, "focal", "rank", "logit")]


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("b,score,strategy,kind", LLAVA_GPU)
def test_llava_gpu(gpu, backend, b, score, strategy, kind):
    check_case(llava(b, score, strategy, kind, layout="bshd", given_lse=kind == "prob" and b > 1), backend, gpu)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("score,kind", [("cls", "prob"), ("focal", "prob"), ("focal", "logit")])
def test_cuda_graph(gpu, backend, score, kind):
    """Capture once, replay on new q / k: no host sync, no allocation outside the graph pool."""
    cases = [llava(2, score, "rank", kind, seed=s, given_lse=kind == "prob") for s in (0, 1)]
    tokens, q, k, lse = make_qk(cases[0], gpu)

    def call():
        return F.prune_tokens_qk(tokens, q, k, 144, score=score, lse=lse, kind=kind, backend=backend)

    call()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pruned, idx = call()
    for c in cases:
        new = make_qk(c, gpu)
        for dst, src in zip((tokens, q, k, lse), new):
            if dst is not None:
                dst.copy_(src)
        graph.replay()
        sig = F.significance_qk(q, k, score=score, num_prefix=1, lse=lse, kind=kind, backend=backend)
        verify(c, *new, sig.cpu(), pruned.cpu(), idx.cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("score,kind", [("cls", "prob"), ("focal", "prob"), ("received", "logit")])
def test_torch_compile(gpu, backend, score, kind):
    """fullgraph compile of fopru_kernels.prune_tokens_qk gives the eager call's outputs."""
    torch._dynamo.reset()
    tokens, q, k, _ = make_qk(llava(2, score, "row", kind, layout="bshd"), gpu)

    def fn(t, qq, kk):
        return F.prune_tokens_qk(t, qq, kk, 144, strategy="row", score=score, kind=kind, layout="bshd", backend=backend)

    pruned, idx = torch.compile(fn, fullgraph=True)(tokens, q, k)
    eager_pruned, eager_idx = fn(tokens, q, k)
    assert torch.equal(idx, eager_idx) and torch.equal(pruned, eager_pruned)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_matches_materialised_softmax_gpu(gpu, backend, strategy):
    _materialised_check(llava(2, "cls", strategy, "prob", dtype=torch.float32), gpu, backend)
