"""The map-path benchmark cases (prune_tokens on an attention map): shapes, inputs, the bytes a call
must move, and a runner per backend or baseline. Shared by the report (report.py) and the
pytest-benchmark suite (test_bench_prune.py)."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

import fopru_kernels

from . import baselines

FUSED = ("cuda", "triton", "cpu")
BASELINES = ("reference", "reference_compiled", "published_loop", "eager_cls_chain")

Inputs = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked shape: B images of N patch tokens, H heads, D features, keep K."""

    model: str
    score: str
    B: int
    N: int = 576
    H: int = 16
    D: int = 1024
    keep: int = 144
    num_prefix: int = 1

    @property
    def label(self) -> str:
        return f"{self.model} '{self.score}' B={self.B}"

    @property
    def attn_shape(self) -> tuple[int, int, int, int]:
        s = self.num_prefix + self.N
        return (self.B, self.H, 1 if self.score == "cls" else s, s)

    def attn_bytes(self, attn_dtype: torch.dtype) -> int:
        return math.prod(self.attn_shape) * attn_dtype.itemsize

    def set_bytes(self, attn_dtype: torch.dtype, token_dtype: torch.dtype) -> int:
        """Bytes of one input set (tokens + attention)."""
        return self.attn_bytes(attn_dtype) + self.B * self.N * self.D * token_dtype.itemsize

    def traffic_bytes(self, attn_dtype: torch.dtype, token_dtype: torch.dtype) -> int:
        """Fewest bytes a call moves: the attention read once, K rows per image gathered and written."""
        rows = self.B * self.keep * self.D * token_dtype.itemsize
        return self.attn_bytes(attn_dtype) + 2 * rows


def bench_cases(quick: bool) -> list[BenchCase]:
    """LLaVA-1.5 (CLIP ViT-L/14-336) over batch, LLaVA-NeXT's 5 tiles, and a SigLIP-like encoder
    (N = 2304, no CLS, so 'focal' only). --quick keeps the two smallest LLaVA-1.5 batches."""
    batches = (1, 8) if quick else (1, 8, 32, 128)
    cases = [BenchCase("LLaVA-1.5", score, b) for score in ("cls", "focal") for b in batches]
    if not quick:
        cases += [BenchCase("LLaVA-NeXT 5 tiles", score, 5) for score in ("cls", "focal")]
        cases += [BenchCase("SigLIP N=2304", "focal", b, N=2304, D=1152, keep=576, num_prefix=0) for b in (1, 8)]
    return cases


def make_inputs(
    case: BenchCase, device: torch.device, attn_dtype: torch.dtype, token_dtype: torch.dtype, seed: int
) -> Inputs:
    """Random tokens (B, N, D) and attention (case.attn_shape); never zeros, which hide bad indexing."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randn(case.B, case.N, case.D, generator=gen, device=device, dtype=token_dtype)
    attn = torch.rand(case.attn_shape, generator=gen, device=device, dtype=attn_dtype)
    return tokens, attn


def runner(name: str, case: BenchCase) -> Runner:
    """A callable (tokens, attn) -> (pruned, idx) for a backend or baseline name (not 'reference_compiled')."""
    k, score, p = case.keep, case.score, case.num_prefix
    if name in FUSED or name == "reference":
        return lambda t, a: fopru_kernels.prune_tokens(t, a, k, score=score, num_prefix=p, backend=name)
    if name == "published_loop":
        return lambda t, a: baselines.published_loop(t, a, k, score=score, num_prefix=p)
    if name == "eager_cls_chain":
        return lambda t, a: baselines.eager_cls_chain(t, a, k, num_prefix=p)
    raise ValueError(f"unknown backend {name!r}")


def applies(name: str, case: BenchCase) -> bool:
    """The CLS chain needs a CLS row; everything else runs every case."""
    return name != "eager_cls_chain" or case.score == "cls"
