"""Every error of SPEC.md: a ValueError whose text names the argument, the same on every backend."""
import pytest
import torch

import fopru_kernels as F
from conftest import cpu_backends, gpu_backends

BIG = 2**16  # heads in the size-limit cases: expanded views, so nothing is allocated


def _t(b=2, n=4, d=3, dtype=torch.float32):
    return torch.randn(b, n, d).to(dtype)


def _a(b=2, h=2, q=5, s=5, dtype=torch.float32):
    return torch.rand(b, h, q, s).to(dtype)


PRUNE_ERRORS = {
    "tokens-2d": (dict(tokens=torch.randn(4, 3)), r"tokens must be 3-D \(B, N, D\), got 2-D"),
    "tokens-dtype": (dict(tokens=_t(dtype=torch.int32)), r"tokens must be float16, bfloat16 or float32, got int32"),
    "tokens-fp64": (dict(tokens=_t(dtype=torch.float64)), r"tokens must be .* got float64"),
    "attn-3d": (dict(attn=torch.rand(2, 5, 5)), r"attn must be 4-D \(B, H, Q, S\), got 3-D"),
    "attn-dtype": (dict(attn=_a(dtype=torch.int64)), r"attn must be float16, bfloat16, float32 or float64, got int64"),
    "score": (dict(score="mean"), r"score must be 'focal', 'received' or 'cls', got 'mean'"),
    "strategy": (dict(strategy="top"), r"strategy must be 'rank' or 'row', got 'top'"),
    "prefix-large": (dict(num_prefix=5), r"num_prefix must be in \[0, S\) = \[0, 5\) with S = attn.shape\[3\], got 5"),
    "prefix-negative": (dict(num_prefix=-1), r"num_prefix must be in \[0, S\) .* got -1"),
    "cls-no-prefix": (dict(score="cls", num_prefix=0, attn=_a(q=1, s=4)), r"score='cls' needs num_prefix >= 1"),
    "cls-no-row": (dict(score="cls", attn=_a(q=0)), r"score='cls' needs the CLS query row: attn.shape\[2\] \(Q\)"),
    "received-not-square": (dict(score="received", attn=_a(q=1)), r"score='received' needs a square map: .* = 5, got 1"),
    "focal-not-square": (dict(score="focal", attn=_a(q=3)), r"score='focal' needs a square map"),
    "batch": (dict(attn=_a(b=3)), r"attn.shape\[0\] \(B\) must equal tokens.shape\[0\] = 2, got 3"),
    "tokens-n": (dict(attn=_a(q=6, s=6)), r"attn.shape\[3\] - num_prefix must equal tokens.shape\[1\] \(N\) = 4, got 6 - 1 = 5"),
    "keep-negative": (dict(keep=-1), r"keep must be in \[0, N\] = \[0, 4\], got -1"),
    "keep-large": (dict(keep=5), r"keep must be in \[0, N\] = \[0, 4\], got 5"),
    "grid-product": (dict(grid=(3, 3)), r"grid must be \(rows, cols\) of positive ints with rows \* cols == N = 4, got \(3, 3\)"),
    "grid-length": (dict(grid=(4,)), r"grid must be \(rows, cols\) .* got \(4,\)"),
    "row-multiple": (
        dict(tokens=_t(n=16), attn=_a(q=17, s=17), strategy="row", keep=6),
        r"keep must be a multiple of cols = 4 for strategy='row', got 6: nearest valid values are 4 and 8",
    ),
    "row-not-square": (
        dict(tokens=_t(n=6), attn=_a(q=7, s=7), strategy="row", keep=2),
        r"grid=None means a square grid, but N = 6 is not a perfect square: pass grid=\(rows, cols\)",
    ),
    "size-focal": (
        dict(tokens=_t(b=1, n=1025), attn=torch.zeros(1, 1, 1, 1).expand(1, BIG, 1026, 1026)),
        r"attn is too large for exact int64 sums: H \* Q' \* W' = 65536 \* 1025 \* 1 = 67174400 exceeds 2\^26",
    ),
    "size-cls-row": (
        dict(
            tokens=_t(b=1, n=2048), attn=torch.zeros(1, 1, 1, 1).expand(1, 2 * BIG, 1, 2049),
            score="cls", strategy="row", keep=0, grid=(2, 1024),
        ),
        r"H \* Q' \* W' = 131072 \* 1 \* 1024 = 134217728 exceeds 2\^26",
    ),
    "device": (dict(attn=_a().to("meta")), r"attn must be on the same device as tokens \(cpu\), got meta"),
}


def _prune_args(**over):
    args = dict(tokens=_t(), attn=_a(), keep=2, strategy="rank", score="focal", num_prefix=1, grid=None)
    args.update(over)
    return args


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", PRUNE_ERRORS)
def test_prune_tokens_errors(name, backend):
    over, pattern = PRUNE_ERRORS[name]
    if name == "device" and backend not in ("reference", "triton"):
        pytest.skip("mixed-device dispatch goes to the meta kernel, which runs the Python checks")
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens(**_prune_args(**over), backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
def test_significance_and_select_errors(backend):
    with pytest.raises(ValueError, match=r"score='received' needs a square map"):
        F.significance(_a(q=1), score="received", backend=backend)
    with pytest.raises(ValueError, match=r"sig must be a 2-D \(B, N\) int64 tensor"):
        F.select(torch.zeros(2, 4), 1, backend=backend)
    with pytest.raises(ValueError, match=r"keep must be a multiple of cols = 2 .* nearest valid values are 2 and 4"):
        F.select(torch.zeros(1, 4, dtype=torch.int64), 3, strategy="row", backend=backend)


# The map path on CUDA tensors: the CUDA C++ kernels check in C++ (csrc/checks.cpp), Triton's entry
# points in Python (fopru_kernels/_checks.py); the same texts. name -> (call(device, backend), message).
def _gt(device, b=2, n=16, d=3):
    return torch.randn(b, n, d, device=device)


def _ga(device, b=2, h=2, q=17, s=17, dtype=torch.float32):
    return torch.rand(b, h, q, s, device=device).to(dtype)


MAP_ERRORS_GPU = {
    "keep": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev), 17, backend=be),
             r"keep must be in \[0, N\] = \[0, 16\], got 17"),
    "row-multiple": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev), 6, strategy="row", backend=be),
                     r"keep must be a multiple of cols = 4 for strategy='row', got 6: nearest valid values are 4 and 8"),
    "cls-prefix": (lambda dev, be: F.prune_tokens(_gt(dev, n=17), _ga(dev, q=1), 2, score="cls", num_prefix=0, backend=be),
                   r"score='cls' needs num_prefix >= 1"),
    "not-square": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev, q=1), 2, score="received", backend=be),
                   r"score='received' needs a square map"),
    "device": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev).cpu(), 2, backend=be),
               r"attn must be on the same device as tokens \(cuda:0\), got cpu"),
    "batch": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev, b=3), 2, backend=be),
              r"attn.shape\[0\] \(B\) must equal tokens.shape\[0\] = 2, got 3"),
    "grid": (lambda dev, be: F.prune_tokens(_gt(dev), _ga(dev), 2, grid=[3, 3], backend=be), r"grid must be \(rows, cols\)"),
    "attn-dtype": (lambda dev, be: F.significance(_ga(dev).int(), backend=be),
                   r"attn must be float16, bfloat16, float32 or float64, got int32"),
    "score": (lambda dev, be: F.significance(_ga(dev), score="mean", backend=be),
              r"score must be 'focal', 'received' or 'cls', got 'mean'"),
    "sig-dtype": (lambda dev, be: F.select(torch.zeros(2, 16, dtype=torch.int32, device=dev), 2, backend=be),
                  r"sig must be a 2-D \(B, N\) int64 tensor"),
    "strategy": (lambda dev, be: F.select(torch.zeros(2, 16, dtype=torch.int64, device=dev), 2, strategy="top", backend=be),
                 r"strategy must be 'rank' or 'row', got 'top'"),
}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", MAP_ERRORS_GPU)
def test_map_errors_cuda(name, cuda_device, backend):
    run, pattern = MAP_ERRORS_GPU[name]
    with pytest.raises(ValueError, match=pattern):
        run(cuda_device, backend)


def test_backend_name_is_checked():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'gpu'"):
        F.prune_tokens(_t(), _a(), 2, backend="gpu")


def test_cuda_backend_on_cpu_tensors_is_refused():
    if not F.HAS_CUDA_KERNELS:
        with pytest.raises(ValueError, match=r"backend='cuda' needs the library built with its CUDA kernels"):
            F.prune_tokens(_t(), _a(), 2, backend="cuda")
    else:
        with pytest.raises(ValueError, match=r"backend='cuda' needs CUDA tensors, got cpu"):
            F.prune_tokens(_t(), _a(), 2, backend="cuda")


def test_retained_count_and_positions_errors():
    with pytest.raises(ValueError, match=r"ratio must be in \[0, 1\]"):
        F.retained_count(576, 1.5)
    with pytest.raises(ValueError, match=r"grid=None means a square grid, but N = 575"):
        F.retained_count(575, 0.25, strategy="row")
    with pytest.raises(ValueError, match=r"idx must be a \(B, K\) int64 tensor"):
        F.positions(torch.zeros(3), grid=(2, 2))


def _qk(b=2, h=2, s=5, d=4, dtype=torch.float32):
    return torch.randn(b, h, s, d).to(dtype)


QK_ERRORS = {
    "q-3d": (dict(q=torch.randn(2, 5, 4)), r"q must be 4-D \(B, H, S, d\), got 3-D"),
    "q-3d-bshd": (dict(q=torch.randn(2, 5, 4), layout="bshd"), r"q must be 4-D \(B, S, H, d\), got 3-D"),
    "q-dtype": (dict(q=_qk(dtype=torch.float64)), r"q must be float16, bfloat16 or float32, got float64"),
    "k-shape": (dict(k=_qk(s=6)), r"k must have q's shape \(2, 2, 5, 4\), got \(2, 2, 6, 4\)"),
    "k-dtype": (dict(k=_qk(dtype=torch.float16)), r"k must have q's dtype float32, got float16"),
    "layout": (dict(layout="bsh"), r"layout must be 'bhsd' or 'bshd', got 'bsh'"),
    "kind": (dict(kind="softmax"), r"kind must be 'prob' or 'logit', got 'softmax'"),
    "score": (dict(score="mean"), r"score must be 'focal', 'received' or 'cls', got 'mean'"),
    "prefix": (dict(num_prefix=5), r"num_prefix must be in \[0, S\) = \[0, 5\) with S = 5 tokens in q, got 5"),
    "cls-no-prefix": (dict(score="cls", num_prefix=0, tokens=_t(n=5)), r"score='cls' needs num_prefix >= 1"),
    "scale": (dict(scale=float("nan")), r"scale must be a finite nonzero float or None, got nan"),
    "scale-zero": (dict(scale=0.0), r"scale must be a finite nonzero float or None, got 0.0"),
    "lse-logit": (dict(lse=torch.zeros(2, 2, 5), kind="logit"), r"lse is only used with kind='prob'"),
    "lse-shape": (
        dict(lse=torch.zeros(2, 5, 2)),
        r"lse must be a float32 tensor of shape \(B, H, S\) = \(2, 2, 5\), got float32 \(2, 5, 2\)",
    ),
    "lse-bshd-shape": (  # (B, H, S) whatever q's layout
        dict(q=_qk().transpose(1, 2), k=_qk().transpose(1, 2), layout="bshd", lse=torch.zeros(2, 5, 2)),
        r"lse must be a float32 tensor of shape \(B, H, S\) = \(2, 2, 5\), got float32 \(2, 5, 2\)",
    ),
    "lse-dtype": (dict(lse=torch.zeros(2, 2, 5, dtype=torch.float16)), r"lse must be a float32 tensor .* got float16"),
    "tokens-2d": (dict(tokens=torch.randn(4, 3)), r"tokens must be 3-D \(B, N, D\), got 2-D"),
    "batch": (dict(tokens=_t(b=3)), r"q's batch size B must equal tokens.shape\[0\] = 3, got 2"),
    "tokens-n": (dict(tokens=_t(n=5)), r"q's token count S - num_prefix must equal tokens.shape\[1\] \(N\) = 5, got 5 - 1 = 4"),
    "keep": (dict(keep=5), r"keep must be in \[0, N\] = \[0, 4\], got 5"),
    "row-multiple": (dict(strategy="row", keep=3), r"keep must be a multiple of cols = 2 for strategy='row', got 3"),
    # No heads: refused on every backend, as the packed ops refuse them (SPEC.md).
    "no-heads": (dict(q=_qk(h=0), k=_qk(h=0)), r"q must have at least one head: q.shape\[1\] \(H\) must be >= 1, got 0"),
    "no-heads-bshd": (
        dict(q=_qk(h=0).transpose(1, 2), k=_qk(h=0).transpose(1, 2), layout="bshd"),
        r"q must have at least one head: q.shape\[2\] \(H\) must be >= 1, got 0",
    ),
    "heads": (
        dict(q=torch.zeros(1, 1, 1, 1).expand(2, 2**26 + 1, 5, 4), k=torch.zeros(1, 1, 1, 1).expand(2, 2**26 + 1, 5, 4)),
        r"q has too many heads for exact int64 sums: H \* W' = 67108865 \* 1 = 67108865 exceeds 2\^26",
    ),
}


def _qk_args(**over):
    args = dict(tokens=_t(), q=_qk(), k=_qk(), keep=2, strategy="rank", score="focal", num_prefix=1, grid=None,
                scale=None, lse=None, kind="prob", layout="bhsd")
    args.update(over)
    return args


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", QK_ERRORS)
def test_prune_tokens_qk_errors(name, backend):
    over, pattern = QK_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_qk(**_qk_args(**over), backend=backend)


PARTS_ERRORS = {
    "parts-2d": (torch.zeros(2, 4, dtype=torch.int64), r"got int64 \(2, 4\)"),
    "parts-dtype": (torch.zeros(2, 2, 4), r"got float32 \(2, 2, 4\)"),
    "parts-c": (torch.zeros(2, 3, 4, dtype=torch.int64), r"got int64 \(2, 3, 4\)"),
    "parts-1d": (torch.zeros(5, dtype=torch.int64), r"got int64 \(5,\)"),
}
PARTS_TEXT = r"parts must be a 3-D \(B, C, N\) int64 tensor with C = 2 \(focal: column and row sums\) or 1, "


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", PARTS_ERRORS)
def test_significance_from_parts_errors(name, backend):
    parts, pattern = PARTS_ERRORS[name]
    with pytest.raises(ValueError, match=PARTS_TEXT + pattern):
        F.significance_from_parts(parts, backend=backend)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", ["kind", "lse-shape", "scale", "prefix", "no-heads", "no-heads-bshd"])
def test_significance_qk_parts_errors(name, backend):
    over, pattern = QK_ERRORS[name]
    args = {key: value for key, value in _qk_args(**over).items() if key not in ("tokens", "keep", "strategy", "grid")}
    with pytest.raises(ValueError, match=pattern):
        F.significance_qk_parts(**args, backend=backend)
    with pytest.raises(ValueError, match=pattern):
        F.significance_qk(**args, backend=backend)


# SPEC.md "Backend limits": the GPU kernels' largest head dim, refused with one text naming d and
# the backend, before anything else of the call (so also for an empty batch).
HEAD_DIM_CAPS = {"triton": (256, "Triton"), "cuda": (8192, "CUDA")}


def _head_dim_calls(d: int, b: int, device) -> dict:
    """The three q/k ops on q, k (b, 1, 3, d), keep 1."""
    q = torch.zeros(b, 1, 3, d, device=device)
    tokens = torch.zeros(b, 2, 4, device=device)
    return {
        "significance_qk": lambda backend: F.significance_qk(q, q, kind="logit", backend=backend),
        "significance_qk_parts": lambda backend: F.significance_qk_parts(q, q, kind="logit", backend=backend),
        "prune_tokens_qk": lambda backend: F.prune_tokens_qk(tokens, q, q, 1, kind="logit", backend=backend),
    }


def check_head_dim_cap(backend: str, device) -> None:
    cap, name = HEAD_DIM_CAPS[backend]
    pattern = rf"fopru: significance_qk supports head dim d <= {cap} on {name}, got {cap + 1}"
    for b in (1, 0):
        for call in _head_dim_calls(cap + 1, b, device).values():
            with pytest.raises(RuntimeError, match=pattern):
                call(backend)
    for call in _head_dim_calls(cap, 1, device).values():
        call(backend)  # the cap itself runs


@pytest.mark.skipif("triton" not in F.available_backends("cpu"), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_triton_head_dim_cap():
    check_head_dim_cap("triton", "cpu")


def _varlen_args(**over):
    args = dict(tokens=torch.randn(7, 3), sig=torch.arange(7), cu_seqlens=torch.tensor([0, 3, 7]), keep=[1, 2],
                strategy="rank", grids=None)
    args.update(over)
    return args


VARLEN_ERRORS = {
    "tokens-3d": (dict(tokens=torch.randn(1, 7, 3)), r"tokens must be 2-D \(T, D\), got 3-D"),
    "sig-dtype": (dict(sig=torch.zeros(7)), r"sig must be a 1-D \(T,\) int64 tensor"),
    "sig-length": (dict(sig=torch.arange(6)), r"sig.shape\[0\] must equal tokens.shape\[0\] \(T\) = 7, got 6"),
    "cu-dtype": (dict(cu_seqlens=torch.tensor([0.0, 7.0])), r"cu_seqlens must be a 1-D \(B \+ 1,\) int32 or int64 tensor"),
    "keep-count": (dict(keep=[1]), r"keep must hold B = len\(cu_seqlens\) - 1 = 2 ints, got 1"),
    "keep-negative": (dict(keep=[1, -1]), r"keep must be >= 0 for every image, got \[1, -1\]"),
    "strategy": (dict(strategy="top"), r"strategy must be 'rank' or 'row', got 'top'"),
    "row-no-grids": (dict(strategy="row"), r"strategy='row' needs grids=\[rows_0, cols_0, rows_1, cols_1, ...\]"),
    "grids-length": (dict(grids=[1, 3]), r"grids must hold 2 \* B = 4 ints .* got \[1, 3\]"),
    "grids-zero-cols": (dict(grids=[3, 0, 2, 2]), r"grids must hold 2 \* B = 4 ints .* cols > 0, got \[3, 0, 2, 2\]"),
    "row-multiple": (
        dict(strategy="row", grids=[1, 3, 2, 2], keep=[3, 1]),
        r"keep\[1\] must be a multiple of cols = 2 for strategy='row', got 1: nearest valid values are 0 and 2",
    ),
    "cu-start": (dict(cu_seqlens=torch.tensor([1, 3, 7])), r"cu_seqlens\[0\] must be 0, got 1"),
    "cu-end": (dict(cu_seqlens=torch.tensor([0, 3, 6])), r"cu_seqlens\[B\] must equal tokens.shape\[0\] \(T\) = 7, got 6"),
    "cu-decreasing": (
        dict(cu_seqlens=torch.tensor([0, 8, 7]), keep=[1, 0]),
        r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\] = 8 > cu_seqlens\[2\] = 7",
    ),
    "keep-large": (dict(keep=[4, 0]), r"keep\[0\] must be in \[0, n\] = \[0, 3\] \(n from cu_seqlens\), got 4"),
    "grid-product": (
        dict(grids=[1, 3, 3, 1]), r"grids\[1\] = \(3, 1\) must have rows \* cols == n = 4 \(n from cu_seqlens\)"
    ),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", VARLEN_ERRORS)
def test_prune_tokens_varlen_errors(name, backend):
    over, pattern = VARLEN_ERRORS[name]
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_varlen(**_varlen_args(**over), backend=backend)


# On a GPU the q/k and varlen ops check their input in C++ (csrc/checks.cpp) or in Python (Triton's
# launchers): the same texts. The values of cu_seqlens are not checked there (that would be a sync),
# so those cases stay CPU-only.
@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", [n for n in QK_ERRORS if n != "heads"])
def test_prune_tokens_qk_errors_cuda(name, cuda_device, backend):
    over, pattern = QK_ERRORS[name]
    args = {k: v.to(cuda_device) if isinstance(v, torch.Tensor) else v for k, v in _qk_args(**over).items()}
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_qk(**args, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", [n for n in VARLEN_ERRORS if n not in ("cu-start", "cu-end", "cu-decreasing", "keep-large", "grid-product")])
def test_prune_tokens_varlen_errors_cuda(name, cuda_device, backend):
    over, pattern = VARLEN_ERRORS[name]
    args = {k: v.to(cuda_device) if isinstance(v, torch.Tensor) else v for k, v in _varlen_args(**over).items()}
    with pytest.raises(ValueError, match=pattern):
        F.prune_tokens_varlen(**args, backend=backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_head_dim_cap_cuda(cuda_device, backend):
    check_head_dim_cap(backend, cuda_device)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("name", PARTS_ERRORS)
def test_significance_from_parts_errors_cuda(name, cuda_device, backend):
    parts, pattern = PARTS_ERRORS[name]
    with pytest.raises(ValueError, match=PARTS_TEXT + pattern):
        F.significance_from_parts(parts.to(cuda_device), backend=backend)
