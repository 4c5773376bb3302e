"""The float baselines the fused backends are timed against. Timing only: never a correctness oracle.

`published_loop` follows the FoPru authors' integration: a Python loop over images, float
averaging over heads, a `.item()` host sync per image to pick the vector with the larger variance,
`torch.sort` and a per-image gather. `eager_cls_chain` is the batched CLS-attention chain of
FasterVLM / VisionZip style code (mean, topk, sort, gather; no loop, no sync).
Both work on float scores, so ties and near-ties may pick other tokens than SPEC.md's fixed point;
`same_kept` checks that they pick the same tokens otherwise (the reports and the smoke tests use it).
"""
from __future__ import annotations

import torch


def published_loop(
    tokens: torch.Tensor, attn: torch.Tensor, keep: int, score: str = "focal", num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """FoPru 'rank' as the authors' integration runs it, one image at a time.

    tokens: (B, N, D); attn: (B, H, Q, num_prefix + N), Q == S for 'focal', Q >= 1 for 'cls'.
    Returns pruned (B, keep, D) and idx (B, keep) int64, ascending.
    """
    if score not in ("focal", "cls"):
        raise ValueError(f"published_loop supports score 'focal' or 'cls', got {score!r}")
    p = num_prefix
    pruned, kept = [], []
    with torch.no_grad():
        for b in range(tokens.shape[0]):
            if score == "cls":
                sig = attn[b, :, 0, p:].float().mean(0)
            else:
                a = attn[b].float().mean(0)[p:, p:]  # (N, N) head mean of the patch part
                received, paid = a.mean(0), a.mean(1)
                # The host sync per image is part of what is being measured.
                sig = received if received.var().item() > paid.var().item() else paid
            ids = torch.sort(sig, descending=True).indices[:keep]
            ids = torch.sort(ids).values
            pruned.append(tokens[b, ids])
            kept.append(ids)
    return torch.stack(pruned), torch.stack(kept)


def eager_cls_chain(
    tokens: torch.Tensor, attn: torch.Tensor, keep: int, num_prefix: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched CLS-attention pruning in eager PyTorch: head mean of the CLS row, topk, sort, gather.

    tokens: (B, N, D); attn: (B, H, Q >= 1, num_prefix + N).
    Returns pruned (B, keep, D) and idx (B, keep) int64, ascending.
    """
    with torch.no_grad():
        sig = attn[:, :, 0, num_prefix:].float().mean(1)
        ids = sig.topk(keep, dim=1).indices.sort(dim=1).values
        pruned = tokens.gather(1, ids[:, :, None].expand(-1, -1, tokens.shape[2]))
    return pruned, ids


def same_kept(idx: torch.Tensor, exact_idx: torch.Tensor, sig: torch.Tensor, rel: float = 1e-4) -> bool:
    """Whether a float baseline kept the tokens of the exact selection, near-ties aside: what a
    baseline must do for its time to compare with the op's.

    idx, exact_idx: (B, K) int64 (the baseline's and the reference's, rank strategy); sig: (B, N)
    int64, the reference's significance. A token kept by one and not the other is allowed only when
    its significance lies within `rel` of the image's boundary (the smallest exact kept significance):
    float rounding may order such near-ties either way. A different score (the wrong focal vector,
    heads or prefix mixed up) moves tokens far from the boundary and fails.
    """
    if idx.shape != exact_idx.shape:
        return False
    if exact_idx.shape[1] == 0:
        return True
    idx, exact_idx, sig = idx.cpu(), exact_idx.cpu(), sig.cpu()
    kept = torch.zeros(sig.shape, dtype=torch.bool).scatter_(1, idx, True)
    exact = torch.zeros(sig.shape, dtype=torch.bool).scatter_(1, exact_idx, True)
    boundary = sig.gather(1, exact_idx).min(dim=1, keepdim=True).values.double()
    far = (sig.double() - boundary).abs() > rel * boundary.abs()
    return not bool(((kept ^ exact) & far).any())
