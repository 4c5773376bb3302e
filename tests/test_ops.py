"""Op registration: one schema, opcheck, torch.compile, no autograd, the pure-Python fallback, helpers."""
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fopru_kernels as F
from cases import Case, make_inputs
from fopru_kernels import reference
from fopru_kernels.ops import SCHEMAS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="without the library ops.py defines the schema: nothing to compare")
@pytest.mark.parametrize("name", SCHEMAS)
def test_registered_schema_is_the_python_schema(name):
    # The library's schema comes from C++ (TORCH_LIBRARY): it must be the string ops.py would define.
    op = getattr(torch.ops.fopru, name).default
    assert op._schema == torch._C.parse_schema("fopru::" + SCHEMAS[name])


def _opcheck_args():
    c = Case(B=2, N=16, H=2, D=4, keep=5, score="focal", layout="strided")
    tokens, attn = make_inputs(c)
    sig = reference.significance(attn, "focal", 1)
    q, k = torch.randn(2, 2, 17, 8), torch.randn(2, 2, 17, 8)
    lse = torch.logsumexp(q @ k.transpose(-1, -2) * 8**-0.5, dim=-1)
    cu = torch.tensor([0, 6, 16])
    packed_q, packed_k = q[0].transpose(0, 1), k[0].transpose(0, 1)[:, :, :8]  # (16 + 1 = 17, 2, 8): strided
    packed_cu = torch.tensor([0, 4, 4, 16])
    return [
        (torch.ops.fopru.prune_tokens.default, (tokens, attn, 5, "rank", "focal", 1, None)),
        (torch.ops.fopru.prune_tokens.default, (tokens, attn, 8, "row", "received", 1, [4, 4])),
        (torch.ops.fopru.prune_tokens.default, (tokens, attn[:, :, :1], 0, "rank", "cls", 1, None)),
        (torch.ops.fopru.significance.default, (attn, "cls", 1)),
        (torch.ops.fopru.significance.default, (attn, "focal", 1)),
        (torch.ops.fopru.select.default, (sig, 8, "row", [4, 4])),
        (torch.ops.fopru.select.default, (sig, 3, "rank", None)),
        (torch.ops.fopru.significance_qk.default, (q, k, "focal", 1, None, None, "prob", "bhsd")),
        (torch.ops.fopru.significance_qk.default, (q.transpose(1, 2), k.transpose(1, 2), "cls", 1, 0.5, None, "logit", "bshd")),
        (torch.ops.fopru.prune_tokens_qk.default, (tokens, q, k, 8, "row", "received", 1, [4, 4], None, lse, "prob", "bhsd")),
        (torch.ops.fopru.prune_tokens_varlen.default, (tokens[0], sig[0], cu, [3, 4], "rank", None)),
        (torch.ops.fopru.prune_tokens_varlen.default, (tokens[0], sig[0], cu.int(), [3, 5], "row", [2, 3, 2, 5])),
        (torch.ops.fopru.significance_qk_parts.default, (q, k, "focal", 1, None, lse, "prob", "bhsd")),
        (torch.ops.fopru.significance_qk_parts.default, (q.transpose(1, 2), k.transpose(1, 2), "cls", 1, 0.5, None,
                                                         "logit", "bshd")),
        (torch.ops.fopru.significance_from_parts.default, (torch.stack([sig, sig.flip(1)], dim=1),)),
        (torch.ops.fopru.significance_from_parts.default, (sig[:, None],)),
        (torch.ops.fopru.significance_qk_varlen.default, (packed_q[:16], packed_k[:16], packed_cu, "focal", None, None,
                                                          "prob", 4)),
        (torch.ops.fopru.significance_qk_varlen.default, (packed_q[:16], packed_k[:16], packed_cu.int(), "received",
                                                          0.5, None, "logit", 1)),
        (torch.ops.fopru.prune_tokens_qk_varlen.default, (tokens[0, :4], packed_q[:16], packed_k[:16], packed_cu, [1, 0, 2],
                                                          "rank", "focal", None, None, "logit", 4, None, None)),
        (torch.ops.fopru.prune_tokens_qk_varlen.default, (tokens[0, :4], packed_q[:16], packed_k[:16], packed_cu, [2],
                                                          "row", "focal", None, None, "prob", 4,
                                                          torch.tensor([0, 4], dtype=torch.int32), [2, 2])),
    ]


@pytest.mark.parametrize("op,args", _opcheck_args())
def test_opcheck(op, args):
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    c = Case(B=2, N=16, H=2, D=4, keep=5, score="focal")
    tokens, attn = make_inputs(c)

    @torch.compile(fullgraph=True)
    def prune(t, a):
        pruned, idx = torch.ops.fopru.prune_tokens(t * 2, a, 5, "rank", "focal", 1, None)
        return pruned + 1, idx

    pruned, idx = prune(tokens, attn)
    want_pruned, want_idx = reference.prune_tokens(tokens * 2, attn, 5)
    assert torch.equal(idx, want_idx)
    assert torch.equal(pruned, want_pruned + 1)


def test_outputs_never_require_grad():
    tokens, attn = make_inputs(Case(B=2, N=16, keep=4, tok_dtype=torch.float32))
    tokens.requires_grad_(True)
    attn.requires_grad_(True)
    pruned, idx = F.prune_tokens(tokens, attn, 4)
    assert not pruned.requires_grad and not idx.requires_grad
    assert not F.significance(attn).requires_grad


def test_pure_python_fallback_defines_the_same_ops():
    # A process without the compiled library still has torch.ops.fopru.*, served by the reference.
    code = (
        "import torch, fopru_kernels as F\n"
        "assert not F.HAS_LIBRARY\n"
        "from fopru_kernels.ops import SCHEMAS\n"
        "for n, s in SCHEMAS.items():\n"
        "    assert getattr(torch.ops.fopru, n).default._schema == torch._C.parse_schema('fopru::' + s)\n"
        "a = torch.rand(2, 2, 17, 17); t = torch.randn(2, 16, 3)\n"
        "p, i = F.prune_tokens(t, a, 4)\n"
        "rp, ri = F.reference.prune_tokens(t, a, 4)\n"
        "assert torch.equal(p, rp) and torch.equal(i, ri)\n"
        "torch.library.opcheck(torch.ops.fopru.prune_tokens.default, (t, a, 8, 'row', 'focal', 1, None))\n"
        "try:\n"
        "    F.prune_tokens(t, a, 17)\n"
        "except ValueError as e:\n"
        "    assert 'keep must be in [0, N] = [0, 16], got 17' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error')\n"
        "print('fallback ok')\n"
    )
    env = dict(os.environ, FOPRU_DISABLE_LIBRARY="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "fallback ok" in out.stdout


def test_retained_count():
    assert F.retained_count(576, 0.25) == 144
    assert F.retained_count(576, 0.25, strategy="row") == 144  # floor(24 * .25) * 24
    assert F.retained_count(575, 0.3, strategy="row", grid=(23, 25)) == 6 * 25
    assert F.retained_count(577, 1.0) == 577
    assert F.retained_count(576, 0.0) == 0


def test_positions():
    idx = torch.tensor([[0, 5, 23], [24, 25, 575]])
    pos = F.positions(idx, grid=(24, 24))
    assert pos.tolist() == [[[0, 0], [0, 5], [0, 23]], [[1, 0], [1, 1], [23, 23]]]
    assert pos.dtype == torch.int64 and pos.shape == (2, 3, 2)
    # grid=None means square, as in every op: idx holds only kept tokens, so N comes as n_tokens.
    assert torch.equal(F.positions(idx, n_tokens=576), pos)
    assert torch.equal(F.positions(idx, grid=(24, 24), n_tokens=576), pos)
    assert F.positions(idx, grid=(48, 12), n_tokens=576).tolist()[1] == [[2, 0], [2, 1], [47, 11]]


def test_positions_errors():
    idx = torch.tensor([[0, 5]])
    with pytest.raises(ValueError, match=r"positions needs grid=\(rows, cols\), or n_tokens=N for grid=None"):
        F.positions(idx)
    with pytest.raises(ValueError, match=r"grid=None means a square grid, but N = 575 is not a perfect square"):
        F.positions(idx, n_tokens=575)
    with pytest.raises(ValueError, match=r"grid must be \(rows, cols\) of positive ints with rows \* cols == N = 576"):
        F.positions(idx, grid=(24, 25), n_tokens=576)
    with pytest.raises(ValueError, match=r"grid must be two positive ints \(rows, cols\), got \(24,\)"):
        F.positions(idx, grid=(24,))


# The Python API: the tensors (and keep) by position, every option by name. Not the torch.ops schemas.
POSITIONAL = {
    "significance": ["attn"],
    "select": ["sig", "keep"],
    "prune_tokens": ["tokens", "attn", "keep"],
    "significance_qk": ["q", "k"],
    "prune_tokens_qk": ["tokens", "q", "k", "keep"],
    "prune_tokens_varlen": ["tokens", "sig", "cu_seqlens", "keep"],
    "positions": ["idx"],
    "positions_varlen": ["idx", "cu_seqlens", "keep"],
    "retained_count": ["n_tokens", "ratio"],
}


@pytest.mark.parametrize("name", POSITIONAL)
def test_options_are_keyword_only(name):
    params = inspect.signature(getattr(F, name)).parameters.values()
    assert [p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD] == POSITIONAL[name]
    assert all(p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) for p in params)


def test_positional_options_are_refused():
    tokens, attn = make_inputs(Case(B=1, N=16, keep=4))
    with pytest.raises(TypeError, match="positional"):
        F.prune_tokens(tokens, attn, 4, "row")
    # the op keeps its schema: options by position there
    assert torch.equal(torch.ops.fopru.prune_tokens(tokens, attn, 4, "rank")[1], F.prune_tokens(tokens, attn, 4)[1])
