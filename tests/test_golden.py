"""The golden cases of tests/data/golden_cases.json, on every CPU backend: expected outputs from
independent implementations of SPEC.md (tests/data/README.md says which; the focal near-ties come from
tests/data/make_focal_golden.py, in Python integers and fractions)."""
import json
from pathlib import Path

import pytest
import torch

import fopru_kernels as F
from conftest import cpu_backends
from fopru_kernels import reference

CASES = json.loads((Path(__file__).parent / "data" / "golden_cases.json").read_text())["cases"]
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def _attn(case) -> torch.Tensor:
    values = [float("nan") if v is None else v for v in case["attn"]]
    return torch.tensor(values, dtype=DTYPES[case["attn_dtype"]]).reshape(case["attn_shape"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_reference_matches_golden(case):
    sig, choice = reference.significance_and_choice(_attn(case), case["score"], case["num_prefix"])
    assert sig.tolist() == case["expected_significance"]
    assert choice == case["expected_choice"]
    idx = reference.select(sig, case["keep"], case["strategy"], tuple(case["grid"]))
    assert idx.tolist() == case["expected_idx"]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
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
