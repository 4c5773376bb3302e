"""The q/k path and ragged batches against their baselines.

`pytest benchmarks/ --benchmark-only`. q/k: prune_tokens_qk at LLaVA-1.5 shape (B images, H=16,
S=577, d=64, D=1024, keep=144, q/k (B, H, S, d)) per fused backend against the float64 oracle
(reference_qk.py, which materialises each image's H x S x S map). Ragged batches: 8 images of
256 to 2304 patches (6144 tokens, D=1024, a quarter kept) in one prune_tokens_varlen call against
the loop over images an engine runs today (one dense select + gather per image). The GPU report
of the same (against SDPA, TTFT) is `python -m benchmarks.serving`. extra_info holds GB/s of
the minimal traffic (q and k read once, kept rows read and written).

Before timing, each case checks that what it times does the job the comparison assumes: the q/k
op's significance is the oracle's within float rounding and its selection and gather are exact on
it; the ragged op and the per-image loop return the reference's rows bit for bit; the traffic
counts the real tensors. With `--benchmark-disable` the suite is a smoke test of exactly that.
"""
from __future__ import annotations

import itertools

import pytest
import torch

import fopru_kernels
from fopru_kernels import reference, reference_qk
from fopru_kernels.reference import FX_SCALE

QK_IMPLS = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton")}
QK_VARIANTS = (("cls", "prob"), ("focal", "logit"), ("received", "prob"))
QK_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}  # the encoder's activations
VARLEN_GRIDS = (24, 16, 24, 48, 24, 32, 24, 16)  # square patch grids of the 8 images
D, KEEP = 1024, 144


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    return torch.device(name)


def _qk_params():
    for device, impls in QK_IMPLS.items():
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for score, kind in QK_VARIANTS:
            for b in (1, 8):
                for impl in impls:
                    yield pytest.param(device, score, kind, b, impl, marks=marks,
                                       id=f"{device}-{score}-{kind}-B{b}-{impl}")


@pytest.mark.parametrize(("device", "score", "kind", "batch", "impl"), list(_qk_params()))
def test_prune_tokens_qk(run_benchmark, device, score, kind, batch, impl):
    dev = _device(device)
    if impl != "reference" and impl not in fopru_kernels.available_backends(dev):
        pytest.skip(f"backend {impl!r} is not available for {device} tensors in this install")
    gen = torch.Generator(device=dev).manual_seed(0)
    dt = QK_DTYPE[device]
    sets = [
        (torch.randn(batch, 576, D, generator=gen, device=dev, dtype=torch.float16),
         torch.randn(batch, 16, 577, 64, generator=gen, device=dev, dtype=dt),
         torch.randn(batch, 16, 577, 64, generator=gen, device=dev, dtype=dt))
        for _ in range(2)
    ]
    if impl == "reference":
        def call(t, q, k):
            return reference_qk.prune_tokens_qk(t, q, k, KEEP, score=score, kind=kind)
    else:
        def call(t, q, k):
            return fopru_kernels.prune_tokens_qk(t, q, k, KEEP, score=score, kind=kind, backend=impl)
    traffic = 2 * sets[0][1].nbytes + 2 * batch * KEEP * D * 2
    with torch.no_grad():
        tokens, q, k = sets[0]
        pruned, idx = call(tokens, q, k)
        assert torch.equal(pruned, reference.gather_rows(tokens, idx))
        if impl != "reference":
            sig = fopru_kernels.significance_qk(q, k, score=score, kind=kind, backend=impl)
            oracle = reference_qk.significance_qk(q, k, score=score, kind=kind)
            assert float((sig - oracle).abs().max()) / FX_SCALE < 1e-3  # float32 rounding, not another score
            assert torch.equal(idx, reference.select(sig, KEEP))
        assert traffic == q.nbytes + k.nbytes + 2 * pruned.nbytes  # q and k read once, kept rows read + written
        run_benchmark(call, sets, dev, traffic)


def _varlen_inputs(dev: torch.device, seed: int):
    gen = torch.Generator(device=dev).manual_seed(seed)
    sizes = [g * g for g in VARLEN_GRIDS]
    t = sum(sizes)
    tokens = torch.randn(t, D, generator=gen, device=dev, dtype=torch.float16)
    sig = torch.randint(0, 1 << 40, (t,), generator=gen, device=dev)
    cu = torch.tensor([0, *itertools.accumulate(sizes)], device=dev)
    return tokens, sig, cu


def _varlen_params():
    for device, impls in (("cpu", ("cpu", "loop")), ("cuda", ("cuda", "triton", "loop"))):
        marks = [pytest.mark.cuda] if device == "cuda" else []
        for strategy in ("rank", "row"):
            for impl in impls:
                yield pytest.param(device, strategy, impl, marks=marks, id=f"{device}-{strategy}-{impl}")


@pytest.mark.parametrize(("device", "strategy", "impl"), list(_varlen_params()))
def test_prune_tokens_varlen(run_benchmark, device, strategy, impl):
    dev = _device(device)
    if impl != "loop" and impl not in fopru_kernels.available_backends(dev):
        pytest.skip(f"backend {impl!r} is not available for {device} tensors in this install")
    keep = [g // 4 * g for g in VARLEN_GRIDS]  # a quarter of the rows (rank keeps as many tokens)
    grids = [v for g in VARLEN_GRIDS for v in (g, g)]
    bounds = [0, *itertools.accumulate(g * g for g in VARLEN_GRIDS)]  # host copy, as an engine has
    sets = [_varlen_inputs(dev, s) for s in range(2)]
    if impl == "loop":
        def call(tokens, sig, cu):
            outs = []
            for b, g in enumerate(VARLEN_GRIDS):
                seg = slice(bounds[b], bounds[b + 1])
                idx = fopru_kernels.select(sig[None, seg], keep[b], strategy=strategy, grid=(g, g))
                outs.append(reference.gather_rows(tokens[None, seg], idx)[0])
            return torch.cat(outs)
    else:
        def call(tokens, sig, cu):
            return fopru_kernels.prune_tokens_varlen(tokens, sig, cu, keep, strategy=strategy, grids=grids, backend=impl)
    traffic = sets[0][1].nbytes + 2 * sum(keep) * D * 2
    with torch.no_grad():
        tokens, sig, cu = sets[0]
        pruned = call(tokens, sig, cu)
        pruned = pruned if impl == "loop" else pruned[0]
        want = reference.prune_tokens_varlen(tokens.cpu(), sig.cpu(), cu.cpu(), keep, strategy, grids)[0]
        assert torch.equal(pruned.cpu(), want)
        assert traffic == sig.nbytes + 2 * pruned.nbytes  # sig read once, kept rows read + written
        run_benchmark(call, sets, dev, traffic)
