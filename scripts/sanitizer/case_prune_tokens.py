"""Small CUDA calls of every op for compute-sanitizer (memcheck, racecheck); not a pytest module.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitizer/case_prune_tokens.py

Covers cls / received / focal x rank / row, float16 / bfloat16 / float32 / float64 attention, every
layout (contiguous, strided, expanded, padded rows: scalar and 16-byte vector map loads), 16/8/4/2-byte
and strided row copies, and the global-memory key path. Asserts equality with the reference; exit
status 0 when everything matched.
"""
import itertools
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]  # tests/ (cases, test_prune_tokens) and the in-place built package

import fopru_kernels as F  # noqa: E402
from cases import Case  # noqa: E402
from conftest import cuda_global_keys  # noqa: E402
from test_prune_tokens import check_case  # noqa: E402


def cases():
    # 4 x 4 square grid and a 5 x 7 one; heads, prefixes and dtypes rotate over the grid.
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    tok_dtypes = (torch.float16, torch.float32, torch.bfloat16)
    layouts = ("contiguous", "strided", "expanded", "padded")
    grids = ((4, 4), (5, 7))
    for k, (grid, score, strategy) in enumerate(itertools.product(grids, ("cls", "received", "focal"), ("rank", "row"))):
        n = grid[0] * grid[1]
        keep = 2 * grid[1] if strategy == "row" else n // 3
        layout = layouts[k % 4]
        c = Case(
            B=2, N=n, H=2, D=(8, 3, 5, 4)[k % 4], keep=keep, strategy=strategy, score=score,
            P=(1, 0, 2)[k % 3] if score != "cls" else 1, grid=grid,
            attn_dtype=dtypes[k % 4], tok_dtype=tok_dtypes[k % 3],
            layout="contiguous" if layout == "padded" else layout, values=("softmax", "quantised", "special")[k % 3],
            seed=k,
        )
        yield c, ("padded" if layout == "padded" else None)


def main() -> int:
    if not torch.cuda.is_available() or not F.HAS_CUDA_KERNELS:
        print("case_prune_tokens: needs a GPU and the library's CUDA kernels")
        return 1
    count = 0
    for force_global in (False, True):
        with cuda_global_keys(force_global):
            for c, attn_layout in cases():
                check_case(c, "cuda", "cuda", attn_layout=attn_layout)
                count += 1
    # keep == N, keep == 1, N == 1
    for c in (Case(B=2, N=16, keep=16, score="cls"), Case(B=1, N=16, keep=1), Case(B=2, N=1, keep=1, score="received")):
        check_case(c, "cuda", "cuda")
        count += 1
    torch.cuda.synchronize()
    print(f"case_prune_tokens: {count} cases match the reference")
    return 0


if __name__ == "__main__":
    sys.exit(main())
