"""The focal choice in exact integers (SPEC.md "Significance"), and the staged q/k API built on it
(SPEC.md "Significance from q and k": significance_qk_parts, significance_from_parts).

Every backend available here (reference, C++ CPU, Triton under TRITON_INTERPRET=1; CUDA and Triton
on a GPU in the tests marked `cuda`) must make the same choice, and so keep the same tokens, on
near-ties that float64 variances cannot separate: saturated maps, column and row sums that are
permutations of each other, and sums of squares that differ by the smallest possible step. The
oracle here is written apart from reference.py: each vector's population variance as an exact
Fraction (mean of squares minus squared mean), compared directly.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fopru_kernels as F
from cases import Case, QKCase, make_inputs, make_qk
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
    assert torch.equal(F.significance(attn, score="focal", backend=backend), sig)
    tokens = torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(1))
    pruned, idx = F.prune_tokens(tokens, attn, keep, strategy=strategy, score="focal", grid=(4, 4), backend=backend)
    want = reference.select(sig, keep, strategy, (4, 4))
    assert torch.equal(idx, want)
    assert torch.equal(pruned, reference.gather_rows(tokens, want))


def saturated_map() -> torch.Tensor:
    """A saturated logit map: all but a few of the 3 x 4 x 65 x 65 values clamp to 256; image 2's column
    and row sums are permutations of each other."""
    return torch.rand(3, 4, 65, 65, generator=torch.Generator().manual_seed(0)) * 1e6


@pytest.mark.parametrize("backend", cpu_backends())
def test_saturated_map(backend):
    attn = saturated_map()
    col, row = map_sums(attn)
    want = expected_sig(col, row)
    assert float64_undecided(col[2], row[2]) and not torch.equal(col[2], row[2])
    assert torch.equal(F.significance(attn, score="focal", backend=backend), want)
    tokens = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    for strategy, keep in (("rank", 16), ("row", 16)):
        pruned, idx = F.prune_tokens(tokens, attn, keep, strategy=strategy, score="focal", backend=backend)
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
    assert torch.equal(F.significance(attn, score="focal", num_prefix=c.P, backend=backend), want)
    pruned, idx = F.prune_tokens(tokens, attn, c.keep, strategy=c.strategy, score="focal", num_prefix=c.P, grid=c.grid,
                                 backend=backend)
    assert torch.equal(idx, reference.select(want, c.keep, c.strategy, c.grid))
    assert torch.equal(pruned, reference.gather_rows(tokens, idx))


# ----------------------------------------------------------------------------- from parts


def from_parts_oracle(parts: torch.Tensor) -> torch.Tensor:
    if parts.shape[1] == 1:
        return parts[:, 0]
    return expected_sig(parts[:, 0], parts[:, 1])


def one_unit_parts() -> torch.Tensor:
    """Images whose N * sum(x^2) - sum(x)^2 differ by exactly one unit (or zero) between the column
    and the row sums, at the ends of int64: (t, t + 1) has N^2 var = 1, (u, u) has 0."""
    t, u = 2**62, -(2**62)
    pairs = [
        ((t, t + 1), (u, u)),  # col by 1
        ((u, u), (t, t + 1)),  # row by 1
        ((t, t + 1), (u, u + 1)),  # tie: row
        ((INT64_MAX - 1, INT64_MAX), (INT64_MIN, INT64_MIN)),  # col by 1
        ((INT64_MIN, INT64_MIN + 1), (INT64_MAX, INT64_MAX)),  # col by 1
        ((INT64_MIN, INT64_MAX), (INT64_MAX, INT64_MIN)),  # tie: row
    ]
    return torch.tensor(pairs, dtype=torch.int64)


@pytest.mark.parametrize("backend", cpu_backends())
def test_from_parts_one_unit(backend):
    parts = one_unit_parts()
    assert [wants_col(list(c), list(r)) for c, r in parts.tolist()] == [True, False, False, True, True, False]
    assert torch.equal(F.significance_from_parts(parts, backend=backend), from_parts_oracle(parts))


INT64 = st.one_of(
    st.integers(INT64_MIN, INT64_MAX),
    st.sampled_from([INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1, 0, 1, -1, 2**62, -(2**62), 2**36]),
    st.integers(-3, 3),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    b=st.integers(0, 3),
    c=st.sampled_from([1, 2]),
    n=st.integers(1, 40),
    layout=st.sampled_from(["contiguous", "permuted"]),
)
def test_from_parts_fuzz(data, b, c, n, layout):
    # Any int64 parts at all: the choice is exact for every value (fopru.h), not only for sums of fx.
    mode = data.draw(st.sampled_from(["any", "equal totals", "permutation"]))
    rows = []
    for _ in range(b):
        col = data.draw(st.lists(INT64, min_size=n, max_size=n))
        if mode == "permutation":
            row = data.draw(st.permutations(col))
        else:
            row = data.draw(st.lists(INT64, min_size=n, max_size=n))
            if mode == "equal totals":  # fix the last entry where the total still fits int64
                last = sum(col) - sum(row[:-1])
                row[-1] = last if INT64_MIN <= last <= INT64_MAX else row[-1]
        rows.append([col, row][:c])
    parts = torch.tensor(rows, dtype=torch.int64).reshape(b, c, n)
    if layout == "permuted":  # (B, C, N) with N outermost in memory
        parts = parts.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    want = from_parts_oracle(parts)
    for backend in cpu_backends():
        got = F.significance_from_parts(parts, backend=backend)
        assert got.shape == (b, n) and got.is_contiguous()
        assert torch.equal(got, want), backend


@pytest.mark.parametrize("backend", cpu_backends())
def test_from_parts_is_a_new_tensor(backend):
    parts = torch.arange(12, dtype=torch.int64).reshape(2, 1, 6)
    sig = F.significance_from_parts(parts, backend=backend)
    sig[0, 0] = -5
    assert parts[0, 0, 0] == 0


# ----------------------------------------------------------------------------- staged q/k


def qk(b=2, h=4, s=17, d=8, layout="bhsd", seed=0):
    """float32 q, k of S = s tokens (one prefix) in `layout` and their exact lse (B, H, S)."""
    _, q, k, lse = make_qk(QKCase(B=b, N=s - 1, H=h, d=d, P=1, dtype=torch.float32, layout=layout, given_lse=True,
                                  seed=seed))
    return q, k, lse


def heads(t: torch.Tensor, layout: str, lo: int, hi: int) -> torch.Tensor:
    return t[:, lo:hi] if layout == "bhsd" else t[:, :, lo:hi]


STAGED = [("focal", "prob", False), ("focal", "prob", True), ("focal", "logit", False), ("received", "prob", True),
          ("received", "logit", False), ("cls", "prob", False), ("cls", "logit", False)]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("score,kind,given_lse", STAGED)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_parts_make_significance_qk(backend, score, kind, given_lse, layout):
    q, k, lse = qk(layout=layout, seed=len(score) + len(kind))
    lse = lse if given_lse else None
    args = dict(score=score, num_prefix=1, scale=None, lse=lse, kind=kind, layout=layout)
    parts = F.significance_qk_parts(q, k, **args, backend=backend)
    assert parts.dtype == torch.int64 and parts.is_contiguous()
    assert parts.shape == (2, 2 if score == "focal" else 1, 16)
    sig = F.significance_qk(q, k, **args, backend=backend)
    assert torch.equal(F.significance_from_parts(parts, backend=backend), sig)
    if score == "focal":
        assert not torch.equal(parts[:, 0], parts[:, 1])
    # Tensor parallelism: each rank's heads give their own parts; their sum is the whole.
    split = [heads(t, layout, 0, 1) for t in (q, k)], [heads(t, layout, 1, 4) for t in (q, k)]
    lses = (None, None) if lse is None else (lse[:, :1], lse[:, 1:])
    total = sum(F.significance_qk_parts(*qk_, score=score, lse=l_, kind=kind, layout=layout, backend=backend)
                for qk_, l_ in zip(split, lses))
    assert torch.equal(total, parts)
    assert torch.equal(F.significance_from_parts(total, backend=backend), sig)


@pytest.mark.parametrize("backend", cpu_backends())
def test_parts_empty_batch(backend):
    q, k, _ = qk(b=0)
    assert F.significance_qk_parts(q, k, backend=backend).shape == (0, 2, 16)
    assert F.significance_from_parts(torch.zeros(0, 2, 16, dtype=torch.int64), backend=backend).shape == (0, 16)


def test_staged_ops_compile():
    q, k, _ = qk()

    @torch.compile(fullgraph=True)
    def staged(a, b):
        return torch.ops.fopru.significance_from_parts(torch.ops.fopru.significance_qk_parts(a * 1, b, "focal"))

    assert torch.equal(staged(q, k), F.significance_qk(q, k))


def test_pure_python_fallback_staged_ops():
    # Without the compiled library the staged ops are defined in Python and served by the reference.
    code = (
        "import torch, fopru_kernels as F\n"
        "assert not F.HAS_LIBRARY\n"
        "q, k = torch.randn(2, 2, 10, 4), torch.randn(2, 2, 10, 4)\n"
        "p = torch.ops.fopru.significance_qk_parts(q, k, 'focal')\n"
        "assert p.shape == (2, 2, 9)\n"
        "assert torch.equal(torch.ops.fopru.significance_from_parts(p), F.significance_qk(q, k))\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, FOPRU_DISABLE_LIBRARY="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


# ----------------------------------------------------------------------------- on a GPU

GPU_BACKENDS = [
    "triton",
    pytest.param("cuda", marks=pytest.mark.skipif(not F.HAS_CUDA_KERNELS, reason="library built without CUDA kernels")),
]


@pytest.fixture
def gpu(cuda_device):
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
    assert torch.equal(F.significance(attn.to(gpu), score="focal", backend=backend).cpu(), sig)
    pruned, idx = F.prune_tokens(tokens.to(gpu), attn.to(gpu), keep, strategy=strategy, score="focal", grid=(4, 4),
                                 backend=backend)
    want = reference.select(sig, keep, strategy, (4, 4))
    assert torch.equal(idx.cpu(), want)
    assert torch.equal(pruned.cpu(), reference.gather_rows(tokens, want))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_saturated_map_gpu(gpu, backend):
    attn = saturated_map()
    want = expected_sig(*map_sums(attn))
    tokens = torch.randn(3, 64, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(F.significance(attn.to(gpu), score="focal", backend=backend).cpu(), want)
    for strategy in ("rank", "row"):
        _, idx = F.prune_tokens(tokens.to(gpu), attn.to(gpu), 16, strategy=strategy, score="focal", backend=backend)
        assert torch.equal(idx.cpu(), reference.select(want, 16, strategy, (8, 8)))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_from_parts_gpu(gpu, backend):
    rng = random.Random(3)
    ends = [INT64_MIN, INT64_MAX, 0, 1, -1, 2**62]
    parts = torch.tensor([[[rng.choice(ends) if rng.random() < 0.5 else rng.randint(INT64_MIN, INT64_MAX)
                            for _ in range(37)] for _ in range(2)] for _ in range(5)], dtype=torch.int64)
    for p in (one_unit_parts(), parts, parts[:, :1], parts.permute(2, 0, 1).contiguous().permute(1, 2, 0)):
        assert torch.equal(F.significance_from_parts(p.to(gpu), backend=backend).cpu(), from_parts_oracle(p))


@pytest.mark.cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("score,kind,given_lse", STAGED)
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_parts_make_significance_qk_gpu(gpu, backend, score, kind, given_lse, layout):
    q, k, lse = (t.to(gpu) for t in qk(b=3, h=16, s=577, d=64, layout=layout))
    lse = lse if given_lse else None
    args = dict(score=score, num_prefix=1, scale=None, lse=lse, kind=kind, layout=layout)
    parts = F.significance_qk_parts(q, k, **args, backend=backend)
    assert parts.shape == (3, 2 if score == "focal" else 1, 576)
    sig = F.significance_qk(q, k, **args, backend=backend)
    assert torch.equal(F.significance_from_parts(parts, backend=backend), sig)
    lses = (None, None) if lse is None else (lse[:, :8], lse[:, 8:])
    total = sum(F.significance_qk_parts(heads(q, layout, lo, hi).contiguous(), heads(k, layout, lo, hi).contiguous(),
                                        score=score, lse=None if l_ is None else l_.contiguous(), kind=kind,
                                        layout=layout, backend=backend)
                for (lo, hi), l_ in zip(((0, 8), (8, 16)), lses))
    assert torch.equal(total, parts)
