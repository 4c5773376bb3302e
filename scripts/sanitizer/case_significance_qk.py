"""Small CUDA calls of significance_qk / prune_tokens_qk for compute-sanitizer; not a pytest module.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitizer/case_significance_qk.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python scripts/sanitizer/case_significance_qk.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool synccheck python scripts/sanitizer/case_significance_qk.py

Covers every path of csrc/cuda/significance_qk.cu: cls / received / focal x prob / logit, lse given
(contiguous and strided) or computed, float16 / bfloat16 / float32 (tensor-core and FMA tiles),
16-byte and element-wise row loads (strided q / k), bhsd / bshd, head dims that are not multiples
of 16, S below one 64-row tile, N spanning several key blocks and key-block groups (N = 300: 5 key
blocks, 3 groups with a short last one), P = 0 / 1 / 2, and B = 0 / keep = 0. Each call is checked
against the float64 oracle as tests/test_qk.py does; exit status 0 when everything matched.
"""
import itertools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]  # tests/ (cases, test_qk) and the in-place built package

import fopru_kernels as F  # noqa: E402
from cases import QKCase, make_qk  # noqa: E402
from test_qk import check_case  # noqa: E402


def cases():
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    sizes = ((16, (4, 4)), (80, (8, 10)), (300, (15, 20)))  # one tile; two key / query blocks; 3 groups
    for i, (score, kind, layout) in enumerate(itertools.product(("cls", "received", "focal"), ("prob", "logit"),
                                                                ("bhsd", "bshd"))):
        for j, (n, grid) in enumerate(sizes):
            strategy = "row" if (i + j) % 2 else "rank"
            yield QKCase(
                B=2, N=n, H=(1, 3, 2)[(i + j) % 3], d=(64, 24, 40, 8)[(i + j) % 4],
                P=(1, 2)[j % 2] if score == "cls" else (0, 1, 2)[(i + j) % 3],
                keep=grid[1] * 2 if strategy == "row" else n // 3, strategy=strategy, score=score, kind=kind,
                layout=layout, dtype=dtypes[(i + j) % 3], grid=grid, strided=(i + j) % 4 == 3,
                given_lse=kind == "prob" and (i + j) % 2 == 0, seed=10 * i + j,
            )


def main() -> int:
    if not torch.cuda.is_available() or not F.HAS_CUDA_KERNELS:
        print("case_significance_qk: needs a GPU and the library's CUDA kernels")
        return 1
    count = 0
    for c in cases():
        check_case(c, "cuda", "cuda")
        count += 1
    # B == 0, keep == 0, keep == N
    tokens, q, k, _ = make_qk(QKCase(B=0, N=16), "cuda")
    assert F.significance_qk(q, k, backend="cuda").shape == (0, 16)
    pruned, idx = F.prune_tokens_qk(tokens, q, k, 4, backend="cuda")
    assert pruned.shape == (0, 4, 8) and idx.shape == (0, 4)
    for c in (QKCase(B=2, N=16, keep=0), QKCase(B=2, N=16, keep=16, score="received", given_lse=True)):
        check_case(c, "cuda", "cuda")
        count += 1
    torch.cuda.synchronize()
    print(f"case_significance_qk: {count} cases match the oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
