"""Small CUDA calls of prune_tokens_varlen for compute-sanitizer (memcheck, racecheck); not a pytest module.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitizer/case_prune_tokens_varlen.py

Covers rank and row, int32 / int64 cu_seqlens, empty images and keep = 0 / n, strided tokens and sig,
the global-memory key path, and a broken segment (which must give idx = -1 and zero rows without
touching memory out of bounds). Asserts equality with the reference; exit status 0 when all matched.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]  # tests/ (cases, conftest) and the in-place built package

import fopru_kernels as F  # noqa: E402
from cases import Batch, make_batch, row_batch  # noqa: E402
from conftest import cuda_global_keys  # noqa: E402
from fopru_kernels import reference  # noqa: E402

# Heavy ties (quantised scores), 5-element rows unless said otherwise.
BATCHES = [
    Batch(sizes=(16, 0, 35, 1), keep=(5, 0, 35, 1), D=5, values="quantised", seed=1),
    row_batch([(4, 4), (0, 3), (5, 7), (1, 1)], [2, 0, 2, 1], D=5, tok_dtype=torch.bfloat16, cu_dtype=torch.int64,
              layout="strided", values="quantised", seed=2),
    Batch(sizes=(64, 9), keep=(0, 9), D=5, tok_dtype=torch.float32, cu_dtype=torch.int64, layout="strided",
          values="quantised", seed=3),
]


def _check(c: Batch) -> None:
    tokens, sig, cu = make_batch(c, "cuda")
    grids = None if c.grids is None else list(c.grids)
    want = reference.prune_tokens_varlen(tokens.cpu(), sig.cpu(), cu.cpu(), list(c.keep), c.strategy, grids)
    got = F.prune_tokens_varlen(tokens, sig, cu, list(c.keep), strategy=c.strategy, grids=grids, backend="cuda")
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), c.id()


def main() -> int:
    if not torch.cuda.is_available() or not F.HAS_CUDA_KERNELS:
        print("case_prune_tokens_varlen: needs a GPU and the library's CUDA kernels")
        return 1
    count = 0
    for force_global in (False, True):
        with cuda_global_keys(force_global):
            for c in BATCHES:
                _check(c)
                count += 1
    # A broken segment on the GPU (the host never reads cu_seqlens there): image 1 claims tokens past T.
    tokens, sig, _ = make_batch(Batch(sizes=(8, 8), keep=(3, 2), D=4, tok_dtype=torch.float32, values="quantised",
                                      seed=4))
    cu = torch.tensor([0, 8, 20], device="cuda")
    pruned, idx, out = F.prune_tokens_varlen(tokens.cuda(), sig.cuda(), cu, [3, 2], backend="cuda")
    want_idx = reference.select(sig[None, :8], 3)[0]
    assert torch.equal(idx[:3].cpu(), want_idx) and torch.equal(idx[3:].cpu(), torch.full((2,), -1))
    assert torch.equal(pruned[3:].cpu(), torch.zeros(2, 4)) and out.tolist() == [0, 3, 5]
    count += 1
    torch.cuda.synchronize()
    print(f"case_prune_tokens_varlen: {count} cases match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
