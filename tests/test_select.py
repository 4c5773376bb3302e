"""select (SPEC.md "Selection") on every backend against reference.select, bit for bit: significance of
any strides and of the whole int64 range, and ties, which go to the lowest indices.

CPU tensors: the C++ kernel and Triton under TRITON_INTERPRET=1 (plus, for the ties, whose expected
indices need no reference, the reference and "auto"); CUDA tensors (marker `cuda`): the CUDA C++
kernels (marker `cuda_cxx`) and Triton. select on the map-path grid, next to significance and
prune_tokens, is in test_prune_tokens.py. Nothing here touches the GPU at import or collection time.
"""
import pytest
import torch
from conftest import cpu_backends, gpu_backends, kernel_backends

import fopru_kernels as F
from fopru_kernels import reference

LAYOUTS = ["transposed", "expanded", "extreme"]


def check_strides_and_values(backend: str, device, layout: str, strategy: str) -> None:
    g = torch.Generator().manual_seed(3)
    sig = torch.randint(-(2**40), 2**40, (4, 36), generator=g, dtype=torch.int64)
    if layout == "extreme":  # row sums wrap around like torch's int64 sum
        sig = torch.randint(-(2**63), 2**63 - 1, (4, 36), generator=g, dtype=torch.int64)
        sig[:, ::5] = 2**63 - 1
        sig[:, 1::7] = -(2**63)
    if layout == "expanded":
        sig = sig[:1].expand(4, 36)
    d = sig.contiguous().to(device)
    if layout == "transposed":
        d = d.t().contiguous().t()
    elif layout == "expanded":
        d = d[:1].expand(4, 36)
    for keep in (0, 1, 6, 12, 30, 36):
        if strategy == "row" and keep % 6:
            continue
        want = reference.select(sig, keep, strategy, (6, 6))
        assert torch.equal(F.select(d, keep, strategy=strategy, grid=(6, 6), backend=backend).cpu(), want)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_any_strides_and_values(backend, layout, strategy):
    check_strides_and_values(backend, "cpu", layout, strategy)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("strategy", ["rank", "row"])
def test_any_strides_and_values_gpu(gpu, backend, layout, strategy):
    check_strides_and_values(backend, gpu, layout, strategy)


EXTREMES = [(9, "rank", 9), (9, "rank", 4), (12, "row", 6), (12, "rank", 1)]


def check_full_int64_range(backend: str, device, n: int, strategy: str, keep: int, monkeypatch) -> None:
    """Keys spanning the whole int64 range (a distance from the minimum of 2^64 - 1) and ties; Triton
    again with two units per selection chunk."""
    lo, hi = -(2**63), 2**63 - 1
    vals = torch.tensor([lo, hi, 0, -1, hi, lo + 1, hi - 1, 2**62, -(2**62)], dtype=torch.int64)
    sig = vals[torch.randint(0, len(vals), (3, n), generator=torch.Generator().manual_seed(n + keep))]
    sig[0] = hi
    grid = (n // 3, 3) if strategy == "row" else None
    if strategy == "row":  # row sums must stay inside int64, as SPEC.md's limit guarantees
        sig = sig // 4
    want = reference.select(sig, keep, strategy, grid)
    assert torch.equal(F.select(sig.to(device), keep, strategy=strategy, grid=grid, backend=backend).cpu(), want)
    if backend == "triton":
        from fopru_kernels.triton import select as tsel

        monkeypatch.setattr(tsel, "SELECT_BLOCK", 2)
        assert torch.equal(F.select(sig.to(device), keep, strategy=strategy, grid=grid, backend=backend).cpu(), want)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("n,strategy,keep", EXTREMES)
def test_full_int64_range(backend, n, strategy, keep, monkeypatch):
    check_full_int64_range(backend, "cpu", n, strategy, keep, monkeypatch)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
@pytest.mark.parametrize("n,strategy,keep", EXTREMES)
def test_full_int64_range_gpu(gpu, backend, n, strategy, keep, monkeypatch):
    check_full_int64_range(backend, gpu, n, strategy, keep, monkeypatch)


def _ties(backend: str, device) -> None:
    """Every token equal: the first `keep` indices, on every image, for every score."""
    attn = torch.full((3, 2, 17, 17), 0.25, device=device)
    tokens = torch.randn(3, 16, 4, device=device)
    for score in ("focal", "received", "cls"):
        pruned, idx = F.prune_tokens(tokens, attn, 5, strategy="rank", score=score, backend=backend)
        assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
        assert torch.equal(pruned, tokens[:, :5])


@pytest.mark.parametrize("backend", cpu_backends())
def test_ties_take_the_lowest_indices(backend):
    _ties(backend, "cpu")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", gpu_backends())
def test_ties_take_the_lowest_indices_gpu(gpu, backend):
    _ties(backend, gpu)
