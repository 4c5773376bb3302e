"""The focal choice in exact integers (SPEC.md "Significance").

Every backend available here (reference, C++ CPU, Triton under TRITON_INTERPRET=1; CUDA and Triton
on a GPU in the tests marked `cuda`) must make the same choice, and so keep the same tokens, on
near-ties that float64 variances cannot separate: saturated maps, column and row sums that are
permutations of each other, and sums of squares that differ by the smallest possible step. The
oracle here is written apart from reference.py: each vector's population variance as an exact
Fraction (mean of squares minus squared mean), compared directly.
"""
from __future__ import annotations

import random
from fractions import Fraction

import pytest
import torch

import fopru_kernels as F
from cases import Case, make_inputs
from conftest import cpu_backends
from fopru_kernels import reference

FX = 2**28
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def variance(v: list[int]) -> Fraction:
    n = len(v)
    return Fraction(sum(x * x for x in v), n) - Fraction(sum(v), n) ** 2


def wants_col(col: list[int], row: list[int]) -> bool:
    """FoPru: the column sums if their variance is strictly larger, else the row sums."""
    return variance(col) > variance(row)


def map_sums(attn: torch.Tensor, p: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(col, row), each (B, N) int64: the received and the paid fx sums of the patch map."""
    patch = reference.fixed_point(attn[:, :, p:, p:])
    return patch.sum(dim=(1, 2)), patch.sum(dim=(1, 3))


def expected_sig(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """(B, N): per image, col or row by the oracle."""
    picks = [c if wants_col(c.tolist(), r.tolist()) else r for c, r in zip(col, row)]
    return torch.stack(picks) if picks else col.clone()


def float64_undecided(col: torch.Tensor, row: torch.Tensor) -> bool:
    """Whether the float64 rule SPEC.md had before (variances about col's mean) left this image to
    the summation order: |vc - vr| <= 1e-9 max(vc, vr)."""
    c, r = col.double(), row.double()
    m = c.mean()
    vc, vr = ((c - m) ** 2).sum(), ((r - m) ** 2).sum()
    return bool((vc - vr).abs() <= 1e-9 * torch.maximum(vc, vr))


def near_tie(gap: int, n: int = 16, seed: int = 0) -> tuple[list[int], list[int]]:
    """(dcol, drow): ints of about 2^31 with equal totals and sum(dcol^2) - sum(drow^2) = gap, drow
    a shuffle of a random v and dcol = v with one unit moved between two entries (none for gap 0,
    so dcol is a permutation of drow). With equal totals the gap is always even (x^2 = x mod 2).
    Their squares (~2^62) are far too coarse in float64 to see a gap of 2, even about the mean."""
    assert gap % 2 == 0
    rng = random.Random(seed)
    v = [rng.randint(-(2**31), 2**31) for _ in range(n)]
    dcol = list(v)
    if gap:
        v[0] = v[1] + gap // 2 - 1  # moving a unit from v[1] to v[0] changes the sum of squares by
        dcol = list(v)  # 2 (v[0] - v[1] + 1) = gap
        dcol[0] += 1
        dcol[1] -= 1
    drow = list(v)
    rng.shuffle(drow)
    return dcol, drow


def map_with_margins(dcol: list[int], drow: list[int], heads: int = 4, dtype=torch.float64, seed: int = 0):
    """attn (1, heads, 1 + N, 1 + N) whose patch fx sums are col = C + dcol and row = C + drow with
    C = N (heads - 2) 2^35, as in a saturated map. A matrix E has column sums dcol and row sums drow:
    E[0, j] = dcol[j], E[i, 0] = drow[i] (i, j >= 1), E[0, 0] = drow[0] - sum(dcol[1:]). Head 0 holds
    E rounded down to a multiple of 2^12, head 1 the rest, heads 2.. 128.0 (fx 2^35), each as
    k 2^-28 with at most 24 significant bits: exact in float32 too. CLS row and column are noise."""
    n = len(dcol)
    e = torch.zeros(n, n, dtype=torch.int64)
    e[0, 1:] = torch.tensor(dcol[1:])
    e[1:, 0] = torch.tensor(drow[1:])
    e[0, 0] = drow[0] - sum(dcol[1:])
    assert e.abs().max() <= 2**36
    high = torch.div(e, 2**12, rounding_mode="floor") * 2**12
    gen = torch.Generator().manual_seed(seed)
    attn = torch.rand(1, heads, n + 1, n + 1, generator=gen, dtype=torch.float64)
    attn[0, 0, 1:, 1:] = high.double() / FX
    attn[0, 1, 1:, 1:] = (e - high).double() / FX
    attn[0, 2:, 1:, 1:] = 128.0
    return attn.to(dtype)


def near_tie_batch(dtype) -> tuple[torch.Tensor, list[str]]:
    """Three images, sum(col^2) - sum(row^2) = 0, +2, -2: choices row, col, row."""
    gaps = (0, 2, -2)
    attn = torch.cat([map_with_margins(*near_tie(g, seed=11 + g), dtype=dtype, seed=g + 2) for g in gaps])
    return attn, ["col" if g > 0 else "row" for g in gaps]


def check_construction(attn: torch.Tensor, choices: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The near-tie maps are what they claim, so the tests on them can fail: float64 cannot decide
    them, the oracle picks `choices`, and the two choices keep different tokens."""
    col, row = map_sums(attn)
    for b, want in enumerate(choices):
        c, r = col[b].tolist(), row[b].tolist()
        assert sum(c) == sum(r)
        assert float64_undecided(col[b], row[b])
        assert wants_col(c, r) == (want == "col")
        for strategy, keep in (("rank", 5), ("row", 8)):
            assert not torch.equal(reference.select(col[b:b + 1], keep, strategy, (4, 4)),
                                   reference.select(row[b:b + 1], keep, strategy, (4, 4)))
    return col, row


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy,keep", [("rank", 5), ("row", 8)])
def test_near_ties(backend, dtype, strategy, keep):
    attn, choices = near_tie_batch(dtype)
    col, row = check_construction(attn, choices)
    sig = torch.stack([col[b] if c == "col" else row[b] for b, c in enumerate(choices)])
    assert torch.equal(F.significance(attn, "focal", backend=backend), sig)
    tokens = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    pruned, idx = F.prune_tokens(tokens, attn, keep, strategy, "focal", 1, (4, 4), backend=backend)
    want = reference.select(sig, keep, strategy, (4, 4))
    assert torch.equal(idx, want)
    assert torch.equal(pruned, reference.gather_rows(tokens, want))


def saturated_map() -> torch.Tensor:
    """issue 14's map: all but a few of the 3 x 4 x 65 x 65 values clamp to 256; image 2's column
    and row sums are permutations of each other."""
    return torch.rand(3, 4, 65, 65, generator=torch.Generator().manual_seed(0)) * 1e6


@pytest.mark.parametrize("backend", cpu_backends())
def test_saturated_map(backend):
    attn = saturated_map()
    col, row = map_sums(attn)
    want = expected_sig(col, row)
    assert float64_undecided(col[2], row[2]) and not torch.equal(col[2], row[2])
    assert torch.equal(F.significance(attn, "focal", backend=backend), want)
    tokens = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    for strategy, keep in (("rank", 16), ("row", 16)):
        pruned, idx = F.prune_tokens(tokens, attn, keep, strategy, "focal", backend=backend)
        assert torch.equal(idx, reference.select(want, keep, strategy, (8, 8)))
        assert torch.equal(pruned, reference.gather_rows(tokens, idx))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("values", ["saturated", "symmetric"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_saturated_and_symmetric_cases(backend, values, seed):
    # The fuzz's value kinds (tests/cases.py), on every backend against the Fraction oracle.
    c = Case(B=3, N=36, H=3, D=4, keep=12, strategy=("rank", "row")[seed % 2], score="focal", P=seed % 2,
             grid=(6, 6), attn_dtype=(torch.float32, torch.float16, torch.float64)[seed], values=values, seed=seed)
    tokens, attn = make_inputs(c)
    col, row = map_sums(attn, c.P)
    if values == "symmetric":
        assert all(sorted(a) == sorted(b) for a, b in zip(col.tolist(), row.tolist()))
    want = expected_sig(col, row)
    assert torch.equal(F.significance(attn, "focal", c.P, backend=backend), want)
    pruned, idx = F.prune_tokens(tokens, attn, c.keep, c.strategy, "focal", c.P, c.grid, backend=backend)
    assert torch.equal(idx, reference.select(want, c.keep, c.strategy, c.grid))
    assert torch.equal(pruned, reference.gather_rows(tokens, idx))


# ----------------------------------------------------------------------------- on a GPU

GPU_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not F.HAS_CUDA_KERNELS, reason="library built without CUDA kernels")),
]


@pytest.fixture
def gpu(cuda_device):
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels")
    return cuda_device


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("strategy,keep", [("rank", 5), ("row", 8)])
def test_near_ties_gpu(gpu, backend, dtype, strategy, keep):
    attn, choices = near_tie_batch(dtype)
    col, row = check_construction(attn, choices)
    sig = torch.stack([col[b] if c == "col" else row[b] for b, c in enumerate(choices)])
    tokens = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(F.significance(attn.to(gpu), "focal", backend=backend).cpu(), sig)
    pruned, idx = F.prune_tokens(tokens.to(gpu), attn.to(gpu), keep, strategy, "focal", 1, (4, 4), backend=backend)
    want = reference.select(sig, keep, strategy, (4, 4))
    assert torch.equal(idx.cpu(), want)
    assert torch.equal(pruned.cpu(), reference.gather_rows(tokens, want))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_saturated_map_gpu(gpu, backend):
    attn = saturated_map()
    want = expected_sig(*map_sums(attn))
    tokens = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(F.significance(attn.to(gpu), "focal", backend=backend).cpu(), want)
    for strategy in ("rank", "row"):
        _, idx = F.prune_tokens(tokens.to(gpu), attn.to(gpu), 16, strategy, "focal", backend=backend)
        assert torch.equal(idx.cpu(), reference.select(want, 16, strategy, (8, 8)))
