"""The plugin's tensor-parallel significance path on two gloo processes, no vLLM: each rank holds half
the heads of one layer's q and k, and `prune_patches` with the group must keep on every rank exactly
the tokens one process keeps with all heads."""
import os

import torch
import torch.distributed as dist


def inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, n, heads, d = 2, 576, 4, 16
    q = torch.randn(b, 1 + n, heads, d, generator=g) * 2  # (B, S, H, d), as QKVCapture gives them
    k = torch.randn(b, 1 + n, heads, d, generator=g) * 2
    tokens = torch.randn(b, n, 64, generator=g)
    return tokens, q, k


def rank_main(rank: int, world: int, port: int, plans, out_dir: str) -> None:
    from fopru_kernels.integrations.vllm.common import prune_patches

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        tokens, q, k = inputs()
        heads = q.shape[2] // world
        mine = slice(rank * heads, (rank + 1) * heads)
        results = [prune_patches(tokens, q[:, :, mine], k[:, :, mine], plan, 16**-0.5, dist.group.WORLD)
                   for plan in plans]
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
