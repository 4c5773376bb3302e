"""significance on inputs whose scores are known without reference.py, on every CPU backend (the
reference, the C++ kernel, Triton under TRITON_INTERPRET=1, and "auto"), with the tokens they keep:
- small maps worked out by hand (values on a 1/8 grid, so fixed point is exact);
- the golden cases of tests/data/golden_cases.json: expected outputs from independent implementations
  of SPEC.md (tests/data/README.md says which; the focal near-ties come from
  tests/data/make_focal_golden.py, in Python integers and fractions).
The focal choice on near-ties and the staged q/k significance are in test_focal.py; every backend
against the reference on the grid in test_prune_tokens.py.
"""
import json
from pathlib import Path

import pytest
import torch
from conftest import cpu_backends

import fopru_kernels as F
from fopru_kernels import reference

# ----------------------------------------------------------------------------- worked out by hand

U = 2**28  # fixed-point unit: fx(0.125) = U / 8


def _cls_attn() -> torch.Tensor:
    # (B=1, H=2, Q=1, S=5): CLS row of two heads, key 0 is CLS itself (not a patch).
    return torch.tensor([[[[0.5, 0.125, 0.5, 0.25, 0.125]], [[0.5, 0.25, 0.125, 0.25, 0.5]]]])


def _map_attn() -> torch.Tensor:
    # (B=1, H=1, S=5, S=5), P=1. Patch part: col sums [.5, .5, .25, .25], row sums [0, 0, .75, .75];
    # the CLS row and column (0.5 everywhere) are outside the patch part and must not count.
    patch = torch.tensor(
        [
            [0.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 0.0],
            [0.25, 0.25, 0.125, 0.125],
            [0.25, 0.25, 0.125, 0.125],
        ]
    )
    full = torch.full((5, 5), 0.5)
    full[1:, 1:] = patch
    return full[None, None]


# (attn builder, score, strategy, keep, grid, expected significance in units of 1/8, expected idx)
HANDWORKED = {
    # sig = [.375, .625, .5, .625]: the two .625 win; keep 3 adds .5 (index 2).
    "cls-rank": (_cls_attn, "cls", "rank", 2, (2, 2), [3, 5, 4, 5], [1, 3]),
    "cls-rank-3": (_cls_attn, "cls", "rank", 3, (2, 2), [3, 5, 4, 5], [1, 2, 3]),
    # row scores [1.0, 1.125]: grid row 1.
    "cls-row": (_cls_attn, "cls", "row", 2, (2, 2), [3, 5, 4, 5], [2, 3]),
    # received = column sums [.5, .5, .25, .25]: the tie at .5 goes to index 0.
    "received-rank": (_map_attn, "received", "rank", 1, (2, 2), [4, 4, 2, 2], [0]),
    # row scores [1.0, 0.5]: grid row 0.
    "received-row": (_map_attn, "received", "row", 2, (2, 2), [4, 4, 2, 2], [0, 1]),
    # focal: m = .375, var(col) = 4 * .125^2 < var(row) = 4 * .375^2, so the row sums [0, 0, .75, .75] win.
    "focal-rank-row-wins": (_map_attn, "focal", "rank", 1, (2, 2), [0, 0, 6, 6], [2]),
    "focal-row-row-wins": (_map_attn, "focal", "row", 2, (2, 2), [0, 0, 6, 6], [2, 3]),
}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("name", HANDWORKED)
def test_handworked(name, backend):
    make, score, strategy, keep, grid, sig_eighths, expected = HANDWORKED[name]
    attn = make()
    n = attn.shape[3] - 1
    tokens = torch.randn(1, n, 4)
    sig = F.significance(attn, score=score, num_prefix=1, backend=backend)
    assert sig.tolist() == [[v * U // 8 for v in sig_eighths]]
    pruned, idx = F.prune_tokens(tokens, attn, keep, strategy=strategy, score=score, num_prefix=1, grid=grid, backend=backend)
    assert idx.tolist() == [expected]
    assert torch.equal(pruned, tokens[:, expected])


@pytest.mark.parametrize("backend", cpu_backends())
def test_focal_equal_variance_goes_to_row(backend):
    # Patch [[.125, .75], [.125, .125]]: col sums [.25, .875], row sums [.875, .25]: equal variance.
    attn = torch.full((1, 1, 3, 3), 0.5)
    attn[0, 0, 1:, 1:] = torch.tensor([[0.125, 0.75], [0.125, 0.125]])
    sig = F.significance(attn, score="focal", num_prefix=1, backend=backend)
    assert sig.tolist() == [[7 * U // 8, 2 * U // 8]]
    _, idx = F.prune_tokens(torch.randn(1, 2, 3), attn, 1, strategy="rank", score="focal", num_prefix=1, grid=(1, 2),
                            backend=backend)
    assert idx.tolist() == [[0]]


# ----------------------------------------------------------------------------- golden cases

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_cases.json").read_text())["cases"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _attn(case) -> torch.Tensor:
    values = [float("nan") if v is None else v for v in case["attn"]]
    return torch.tensor(values, dtype=DTYPES[case["attn_dtype"]]).reshape(case["attn_shape"])


@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_reference_matches_golden(case):
    sig, choice = reference.significance_and_choice(_attn(case), case["score"], case["num_prefix"])
    assert sig.tolist() == case["expected_significance"]
    assert choice == case["expected_choice"]
    idx = reference.select(sig, case["keep"], case["strategy"], tuple(case["grid"]))
    assert idx.tolist() == case["expected_idx"]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", GOLDEN, ids=[c["name"] for c in GOLDEN])
def test_backend_matches_golden(case, backend):
    attn = _attn(case)
    b, _, _, s = attn.shape
    n = s - case["num_prefix"]
    tokens = torch.arange(b * n * 3, dtype=torch.float32).reshape(b, n, 3)
    grid = tuple(case["grid"])
    sig = F.significance(attn, score=case["score"], num_prefix=case["num_prefix"], backend=backend)
    assert sig.tolist() == case["expected_significance"]
    idx = F.select(sig, case["keep"], strategy=case["strategy"], grid=grid, backend=backend)
    assert idx.tolist() == case["expected_idx"]
    pruned, idx2 = F.prune_tokens(
        tokens, attn, case["keep"], strategy=case["strategy"], score=case["score"], num_prefix=case["num_prefix"], grid=grid,
        backend=backend,
    )
    assert idx2.tolist() == case["expected_idx"]
    assert torch.equal(pruned, reference.gather_rows(tokens, idx2))
