"""prune_tokens against the eager reference, the published FoPru loop and the eager CLS chain.

`pytest benchmarks/ --benchmark-only`. LLaVA-1.5 shape (N=576, H=16, D=1024, keep=144, fp16
tokens, strategy 'rank') at B = 1, 8, 32, scored from the CLS row (attn (B, 16, 1, 577)) and from
full maps ('focal', attn (B, 16, 577, 577)). Fused backends missing from this install skip, and so
does every GPU case on a machine without one. extra_info holds GB/s of the minimal traffic.

Before timing, each case checks that what it times does the job the comparison assumes: the fused
backends return the reference's tokens and indices bit for bit, the float baselines keep the
reference's tokens (near-ties aside), and the traffic counts the real tensors. With
`--benchmark-disable` the suite is a smoke test of exactly that.
"""
from __future__ import annotations

import pytest
import torch

import fopru_kernels

from .baselines import same_kept
from .prune_cases import FUSED, BenchCase, runner

# CPU encoders run in float32, GPU ones in half precision; tokens are fp16 on both.
ATTN_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}
TOKEN_DTYPE = torch.float16
IMPLS = {
    "cpu": ("cpu", "reference", "published_loop", "eager_cls_chain"),
    "cuda": ("cuda", "triton", "reference", "published_loop", "eager_cls_chain"),
}


def _params():
    # Ordered so that each (device, shape) is built once by the input cache.
    for device, impls in IMPLS.items():
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for score in ("cls", "focal"):
            for b in (1, 8, 32):
                for impl in impls:
                    if impl == "eager_cls_chain" and score != "cls":
                        continue
                    yield pytest.param(device, score, b, impl, marks=marks, id=f"{device}-{score}-B{b}-{impl}")


@pytest.mark.parametrize(("device", "score", "batch", "impl"), list(_params()))
def test_prune_tokens(run_benchmark, input_cache, device, score, batch, impl):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    dev = torch.device(device)
    if impl in FUSED and impl not in fopru_kernels.available_backends(dev):
        pytest.skip(f"backend {impl!r} is not available for {device} tensors in this install")
    case = BenchCase("LLaVA-1.5", score, batch)
    sets = input_cache.get(case, dev, ATTN_DTYPE[device], TOKEN_DTYPE)
    traffic = case.traffic_bytes(ATTN_DTYPE[device], TOKEN_DTYPE)
    call = runner(impl, case)
    with torch.no_grad():
        pruned, idx = call(*sets[0])
        want_pruned, want_idx, sig = input_cache.expected(case)
        if impl in FUSED:
            assert torch.equal(idx, want_idx) and torch.equal(pruned, want_pruned)
        elif impl != "reference":
            assert same_kept(idx, want_idx, sig), f"{impl} keeps other tokens than the reference"
        assert traffic == sets[0][1].nbytes + 2 * pruned.nbytes  # attention read once, kept rows read + written
        run_benchmark(call, sets, dev, traffic)
