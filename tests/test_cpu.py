"""The C++ CPU kernel against the reference, bit for bit, over the shared grid and random fuzzing."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fopru_kernels as F
from cases import ATTN_DTYPES, TOKEN_DTYPES, Case, grid_cases, make_inputs
from fopru_kernels import reference

pytestmark = pytest.mark.skipif(not F.HAS_LIBRARY, reason=f"compiled library absent: {F.ops.LIBRARY_ERROR}")


def assert_matches_reference(c: Case, backend: str = "cpu") -> None:
    tokens, attn = make_inputs(c)
    want_sig = reference.significance(attn, c.score, c.P)
    assert torch.equal(F.significance(attn, score=c.score, num_prefix=c.P, backend=backend), want_sig)
    want_pruned, want_idx = reference.prune_tokens(tokens, attn, c.keep, c.strategy, c.score, c.P, c.grid)
    pruned, idx = F.prune_tokens(tokens, attn, c.keep, strategy=c.strategy, score=c.score, num_prefix=c.P, grid=c.grid,
                                 backend=backend)
    assert torch.equal(idx, want_idx)
    assert torch.equal(pruned, want_pruned)
    assert pruned.is_contiguous() and idx.is_contiguous()
    assert torch.equal(F.select(want_sig, c.keep, strategy=c.strategy, grid=c.grid, backend=backend), want_idx)


@pytest.mark.parametrize("c", grid_cases(), ids=Case.id)
def test_grid(c):
    assert_matches_reference(c)


@pytest.mark.parametrize(
    "c",
    [
        Case(B=8, N=576, H=16, D=1024, keep=144, score="cls", attn_dtype=torch.float32),
        Case(B=2, N=576, H=16, D=1024, keep=144, score="focal", attn_dtype=torch.float16),
        Case(B=2, N=576, H=16, D=64, keep=144, strategy="row", score="focal", values="logits"),
        Case(B=0, N=16, keep=4),
        Case(B=1, N=1, keep=1, score="received"),
        Case(B=3, N=16, keep=16, values="quantised", score="focal", strategy="row"),
    ],
    ids=Case.id,
)
def test_llava_shapes_and_edges(c):
    assert_matches_reference(c)


def test_heavy_ties_all_equal():
    # Every token equal: the first `keep` indices, on every image.
    attn = torch.full((3, 2, 17, 17), 0.25)
    tokens = torch.randn(3, 16, 4)
    pruned, idx = F.prune_tokens(tokens, attn, 5, strategy="rank", score="focal", backend="cpu")
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 3
    assert torch.equal(pruned, tokens[:, :5])


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
def test_fuzz_against_reference(n_rows, n_cols, b, h, p, score, strategy, keep_frac, attn_dtype, tok_dtype, layout, values, seed):
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
    assert_matches_reference(c)
