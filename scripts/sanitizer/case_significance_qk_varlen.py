"""Small CUDA calls of significance_qk_varlen / prune_tokens_qk_varlen for compute-sanitizer; not a pytest module.

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python scripts/sanitizer/case_significance_qk_varlen.py
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck python scripts/sanitizer/case_significance_qk_varlen.py

Covers every stage of csrc/cuda/significance_qk_varlen.cu: focal / received x prob / logit, lse given
(strided) or computed, float16 / bfloat16 / float32 (tensor-core and FMA tiles), 16-byte and element-wise
row loads, group 1 and 4, empty segments, a segment of 5 key blocks (3 groups) next to 4-token ones, the
prune per attention segment and per selection segment (a video, rank and row), an empty batch, and
invalid cu_seqlens (INT64_MIN scores, idx -1 and zero rows, nothing read or written out of bounds). Each
call is checked against the float64 oracle as tests/test_qk_varlen.py does (tests/qk_varlen_oracle.py);
exit status 0 when all matched.
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]  # tests/ (qk_varlen_oracle) and the in-place built package

import fopru_kernels as F  # noqa: E402
from qk_varlen_oracle import INT64_MIN, check_prune, check_sig, oracle, packed, segment_lse  # noqa: E402

LENGTHS = (4, 300, 0, 12, 8)  # tokens per attention segment: 300 = 5 key blocks in 3 groups


def main() -> int:
    if not torch.cuda.is_available() or not F.HAS_CUDA_KERNELS:
        print("case_significance_qk_varlen: needs a GPU and the library's CUDA kernels")
        return 1
    dev = torch.device("cuda")
    count = 0
    layouts = (("qkv", 16), ("hd", 12), ("d-strided", 8))
    for i, dtype in enumerate((torch.float16, torch.bfloat16, torch.float32)):
        layout, d = layouts[i]
        q, k, cu = packed(LENGTHS, d=d, dtype=dtype, layout=layout, seed=i, constant_keys=(3,))
        for score in ("focal", "received"):
            flash_lse = segment_lse(q, k, cu, 0.5).t().contiguous().t()  # (H, T) in FlashAttention's strides
            for kind, lse in (("logit", None), ("prob", None), ("prob", flash_lse)):
                group = 4 if i % 2 == 0 else 1
                scale = None if lse is None else 0.5
                sig = F.significance_qk_varlen(q.to(dev), k.to(dev), cu.to(dev).int(), score=score, scale=scale,
                                               lse=None if lse is None else lse.to(dev), kind=kind, group=group,
                                               backend="cuda")
                check_sig(sig, oracle(q, k, cu, score, kind, group, scale, lse, "cuda"), cu, group)
                count += 1
    # The prune: per attention segment, and a video pruned over its clip (rank and row).
    q, k, cu = (t.to(dev) for t in packed(LENGTHS, seed=5))
    tokens = torch.randn(sum(LENGTHS) // 4, 24, dtype=torch.bfloat16, device=dev)
    keep = [1, 30, 0, 1, 2]
    for kind in ("logit", "prob"):
        got = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=4, backend="cuda")
        check_prune("cuda", got, q, k, cu, tokens, keep, "rank", kind, 4, cu // 4, None, least=3)
        count += 1
    q, k, cu = (t.to(dev) for t in packed((24, 16, 16, 16), seed=6))
    select = torch.tensor([0, 6, 18], dtype=torch.int32, device=dev)
    tokens = torch.randn(18, 8, device=dev)
    for strategy, keep, grids in (("rank", [4, 7], None), ("row", [3, 4], [2, 3, 6, 2])):
        got = F.prune_tokens_qk_varlen(tokens, q, k, cu, keep, strategy=strategy, kind="prob", group=4,
                                       cu_seqlens_select=select, grids=grids, backend="cuda")
        check_prune("cuda", got, q, k, cu, tokens, keep, strategy, "prob", 4, select, grids, least=2)
        count += 1
    # An empty batch, and invalid cu_seqlens (never read on the host): cu[S] past T, and not a multiple of group.
    empty = torch.zeros(0, 2, 8, device=dev)
    assert F.significance_qk_varlen(empty, empty, torch.tensor([0, 0], device=dev), group=4, backend="cuda").shape == (0,)
    q, k, _ = packed((24,), d=8, seed=7)
    for bad in ([0, 8, 28], [0, 6, 24]):
        cu = torch.tensor(bad, device=dev)
        for kind in ("logit", "prob"):
            sig = F.significance_qk_varlen(q.to(dev), k.to(dev), cu, kind=kind, group=4, backend="cuda")
            assert torch.equal(sig.cpu(), torch.full((6,), INT64_MIN, dtype=torch.int64))
            pruned, idx, cu_out = F.prune_tokens_qk_varlen(torch.randn(6, 5, device=dev), q.to(dev), k.to(dev), cu,
                                                           [1, 2], kind=kind, group=4, backend="cuda")
            assert torch.equal(idx.cpu(), torch.full((3,), -1)) and torch.equal(pruned.cpu(), torch.zeros(3, 5))
            assert cu_out.tolist() == [0, 1, 3]
            count += 1
    torch.cuda.synchronize()
    print(f"case_significance_qk_varlen: {count} cases match the oracle")
    return 0


if __name__ == "__main__":
    sys.exit(main())
