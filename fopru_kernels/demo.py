"""`python -m fopru_kernels demo`: prune a LLaVA-1.5-shaped batch, draw what is kept, time each backend.

The attention is synthetic (no model weights here): each image has a few salient objects, and
every query attends to keys in proportion to their saliency plus noise, so the kept-token maps
show what the two strategies do with the same scores.
"""
from __future__ import annotations

import statistics
import time

import torch

from . import ops

B, ROWS, COLS, H, D, KEEP = 2, 24, 24, 16, 1024, 144
N = ROWS * COLS


def synthetic_attention(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D) fp16 and attention (B, H, 1 + N, 1 + N) fp32 with a CLS token first."""
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.arange(ROWS), torch.arange(COLS), indexing="ij")
    saliency = torch.zeros(B, N)
    for b in range(B):
        for _ in range(3):  # three blobs per image
            cy, cx = torch.randint(3, ROWS - 3, (2,), generator=gen).tolist()
            r = 2.0 + 3.0 * torch.rand(1, generator=gen).item()
            saliency[b] += torch.exp(-((y - cy) ** 2 + (x - cx) ** 2) / (2 * r * r)).flatten()
    logits = 4 * saliency[:, None, None, :] + torch.randn(B, H, 1 + N, N, generator=gen)
    cls_key = torch.randn(B, H, 1 + N, 1, generator=gen)
    attn = torch.cat([cls_key, logits], dim=-1).softmax(-1)
    tokens = torch.randn(B, N, D, generator=gen).half()
    return tokens, attn


def draw(idx: torch.Tensor) -> list[str]:
    kept = torch.zeros(N, dtype=torch.bool)
    kept[idx] = True
    return ["".join("#" if kept[r * COLS + c] else "." for c in range(COLS)) for r in range(ROWS)]


def _median_us(fn, repeats: int = 15) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def main(argv: list[str]) -> int:
    torch.manual_seed(0)
    tokens, attn = synthetic_attention()
    print(f"FoPru demo: B={B} images of {ROWS}x{COLS}={N} patch tokens, H={H}, D={D}, keep={KEEP} (25%)")
    print(f"compiled library: {'yes' if ops.HAS_LIBRARY else 'no (' + str(ops.LIBRARY_ERROR) + ')'}\n")
    for strategy in ("rank", "row"):
        pruned, idx = ops.prune_tokens(tokens, attn, KEEP, strategy=strategy, score="focal")
        print(f"strategy={strategy!r}, score='focal': pruned {tuple(pruned.shape)} {pruned.dtype}, '#' = kept")
        maps = [draw(idx[b]) for b in range(B)]
        print("   ".join(f"image {b}".ljust(COLS) for b in range(B)))
        for r in range(ROWS):
            print("   ".join(m[r] for m in maps))
        print()

    cls_attn = attn[:, :, :1].contiguous()  # the CLS row alone is enough for score='cls'
    print("time per call (median of 15, this machine's CPU), strategy='rank':")
    print(f"{'backend':<10} {'cls (B,16,1,577)':>18} {'focal (B,16,577,577)':>22}")
    ref = {}
    for backend in ["reference"] + [b for b in ops.available_backends("cpu") if b not in ("reference", "triton")]:
        t_cls = _median_us(lambda: ops.prune_tokens(tokens, cls_attn, KEEP, score="cls", backend=backend))
        t_focal = _median_us(lambda: ops.prune_tokens(tokens, attn, KEEP, score="focal", backend=backend), 5)
        ref.setdefault("cls", t_cls)
        ref.setdefault("focal", t_focal)
        print(
            f"{backend:<10} {t_cls:>10.0f} us ({ref['cls'] / t_cls:4.1f}x) "
            f"{t_focal:>12.0f} us ({ref['focal'] / t_focal:4.1f}x)"
        )
    if "cpu" not in ops.available_backends("cpu"):
        print("(build the C++ library with `make build` to time the C++ kernel)")
    ragged(tokens, attn)
    return 0


def ragged(tokens: torch.Tensor, attn: torch.Tensor) -> None:
    """A serving-style packed batch: image 0 whole, image 1 as its top-left 12 x 24 half, in one call."""
    sig = ops.significance(attn, score="focal")
    half = ROWS // 2 * COLS
    packed_tokens = torch.cat([tokens[0], tokens[1, :half]])
    packed_sig = torch.cat([sig[0], sig[1, :half]])
    cu_seqlens = torch.tensor([0, N, N + half])
    keep = [KEEP, KEEP // 2]
    pruned, idx, cu_out = ops.prune_tokens_varlen(packed_tokens, packed_sig, cu_seqlens, keep)
    same = True
    for b, k in enumerate(keep):  # each image's slice is the dense selection of its own segment
        lo, hi = cu_seqlens[b], cu_seqlens[b + 1]
        same &= torch.equal(idx[cu_out[b]:cu_out[b + 1]] - lo, ops.select(packed_sig[None, lo:hi], k)[0])
    print(f"\nragged batch: T={packed_tokens.shape[0]} tokens of 2 images ({N} + {half}), keep={keep} -> "
          f"pruned {tuple(pruned.shape)}, cu_seqlens_out={cu_out.tolist()}; "
          f"equals select() per image: {'yes' if same else 'NO'}")
