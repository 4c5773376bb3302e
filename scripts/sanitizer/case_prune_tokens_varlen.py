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
sys.path[:0] = [ROOT]  # the in-place built package

import fopru_kernels as F  # noqa: E402
from fopru_kernels import reference  # noqa: E402

FORCE_GLOBAL = "FOPRU_CUDA_FORCE_GLOBAL_KEYS"


def _batch(sizes, d, dtype, seed, strided):
    gen = torch.Generator().manual_seed(seed)
    t = sum(sizes)
    tokens = torch.randn(t, 2 * d if strided else d, generator=gen).to(dtype)
    sig = torch.randint(-3, 4, (2 * t if strided else t,), generator=gen)
    if strided:
        tokens, sig = tokens[:, ::2], sig[::2]
    cu = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist())
    return tokens, sig, cu


def _check(sizes, keep, strategy, grids, dtype, cu_dtype, seed, strided=False):
    tokens, sig, cu = _batch(sizes, 5, dtype, seed, strided)
    cu = cu.to(cu_dtype)
    want = reference.prune_tokens_varlen(tokens, sig, cu, keep, strategy, grids)
    got = F.prune_tokens_varlen(tokens.cuda(), sig.cuda(), cu.cuda(), keep, strategy=strategy, grids=grids, backend="cuda")
    for w, g in zip(want, got):
        assert g.dtype == w.dtype and torch.equal(g.cpu(), w), (sizes, keep, strategy)


def main() -> int:
    if not torch.cuda.is_available() or not F.HAS_CUDA_KERNELS:
        print("case_prune_tokens_varlen: needs a GPU and the library's CUDA kernels")
        return 1
    count = 0
    for force_global in ("0", "1"):
        os.environ[FORCE_GLOBAL] = force_global
        _check([16, 0, 35, 1], [5, 0, 35, 1], "rank", None, torch.float16, torch.int32, 1)
        _check([16, 0, 35, 1], [8, 0, 14, 1], "row", [4, 4, 0, 3, 5, 7, 1, 1], torch.bfloat16, torch.int64, 2, True)
        _check([64, 9], [0, 9], "rank", None, torch.float32, torch.int64, 3, True)
        count += 3
    os.environ[FORCE_GLOBAL] = "0"
    # A broken segment on the GPU (the host never reads cu_seqlens there): image 1 claims tokens past T.
    tokens, sig, _ = _batch([8, 8], 4, torch.float32, 4, False)
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
