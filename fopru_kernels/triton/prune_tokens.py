"""prune_tokens / significance / select as Triton kernels: SPEC.md's map path, bitwise equal to
reference.py.

Launchers take inputs already validated by ``_checks.py`` (``rows``/``cols`` resolved) and follow
SPEC.md exactly: attention values become int64 fixed point (``exact.fx``), sums are integer (so
atomics and any split of the work give the same bits), and selection compares integer keys only
(``select.py``).

Launches per ``prune_tokens`` call (a (unit, x) tile of at most ``select.MAX_TILE`` tokens, which
covers every ViT grid up to 64 x 64):
- ``cls``: one launch of select.py's fused selection + gather kernel; each program recomputes the
  (cheap) CLS significance and selection and gathers its share of the K x D rows.
- ``received`` / ``focal``: a zeroed int64 workspace, ``_map_sums_kernel`` (many programs, atomics),
  then the fused kernel (focal choice + selection + gather).
Larger N falls back to staged kernels: significance, select.py's chunked selection, a gather.

Development numbers (ad hoc scripts never committed, an older revision; see
benchmarks/results/2026-11-26-h200-triton-development.md): H200, Triton 3.6, torch 2.11, CUDA graph
replay, LLaVA-1.5 shapes (N=576, H=16, D=1024, K=144, fp16): cls rank B=1 ~10 us per call (launch
floor 1.1 us, CLS significance ~1 us, the rest the in-register selection, which is issue-bound); focal B=32
~200 us = 68% of device copy bandwidth; focal B=1 ~26 us (the map reduction is latency-bound).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import select as sel
from . import target
from .exact import focal_significance, fx, fx_head_sum
from .launch import device_of, pow2

# Map reduction tile: BLOCK_Q query rows x BLOCK_K keys, keys innermost for coalesced loads.
_MAP_BLOCK_Q = 16
_MAP_BLOCK_K = 128
# Target program count for the map reduction (a few waves on a 132-SM H100).
_MAP_PROGRAMS = 1024


@triton.jit
def _cls_sig_kernel(attn_ptr, sig_ptr, N, H, P, s_ab, s_ah, s_as, blocks,
                    HEAD_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """sig[b, j] = sum_h fx(attn[b, h, 0, P + j]); grid (B * blocks,)."""
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    j = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    heads = tl.arange(0, HEAD_BLOCK).to(tl.int64)[:, None]
    acc = fx_head_sum(attn_ptr + b * s_ab + (P + j)[None, :] * s_as, m[None, :], heads, H, s_ah, HEAD_BLOCK)
    tl.store(sig_ptr + b * N + j, acc, mask=m)


@triton.jit
def _map_sums_kernel(attn_ptr, col_ptr, row_ptr, N, H, P, s_ab, s_ah, s_aq, s_as,
                     qblocks, hgroups, heads_per_group,
                     ROWS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr):
    """col[b, j] += sum fx(attn[b, h, P+i, P+j]) over this program's heads and query rows i, and
    (ROWS) row[b, i] += the same summed over j. Grid (B * hgroups * qblocks,); int64 atomics are
    exact, so the order in which programs land does not matter."""
    pid = tl.program_id(0)
    b = (pid // (hgroups * qblocks)).to(tl.int64)
    hg = (pid // qblocks % hgroups).to(tl.int64)
    i = (pid % qblocks).to(tl.int64) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    imask = i < N
    h0 = hg * heads_per_group
    h1 = tl.minimum(h0 + heads_per_group, H)
    rows = attn_ptr + b * s_ab + (P + i)[:, None] * s_aq
    row_acc = tl.zeros([BLOCK_Q], tl.int64)
    for j0 in range(0, N, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
        jmask = j < N
        m = imask[:, None] & jmask[None, :]
        tile = rows + (P + j)[None, :] * s_as
        # Elementwise over heads, reduce once per key block: the reductions cross threads.
        acc = tl.zeros([BLOCK_Q, BLOCK_K], tl.int64)
        for h in range(h0, h1):
            acc += fx(tl.load(tile + h * s_ah, mask=m, other=0.0))
        tl.atomic_add(col_ptr + b * N + j, tl.sum(acc, axis=0), mask=jmask, sem="relaxed")
        if ROWS:
            row_acc += tl.sum(acc, axis=1)
    if ROWS:
        tl.atomic_add(row_ptr + b * N + i, row_acc, mask=imask, sem="relaxed")


def _map_config(batch: int, heads: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(query rows, keys, heads) per _map_sums_kernel program."""
    if not target.for_gpu(device):  # the interpreter runs programs one after another: few, large tiles
        return 64, min(1024, pow2(n)), max(heads, 1)
    qblocks = triton.cdiv(n, _MAP_BLOCK_Q)
    # Group heads per program (fewer atomics) only while there are programs to spare.
    per_group = max(1, min(heads, batch * qblocks * heads // _MAP_PROGRAMS))
    return _MAP_BLOCK_Q, min(_MAP_BLOCK_K, pow2(n)), per_group


def _map_sums(attn: torch.Tensor, num_prefix: int, rows: bool) -> torch.Tensor:
    """(2 if rows else 1, B, N) int64: col sums [0] and row sums [1] of the patch map."""
    b, h, _, s = attn.shape
    n = s - num_prefix
    sums = torch.zeros(2 if rows else 1, b, n, dtype=torch.int64, device=attn.device)
    block_q, block_k, per_group = _map_config(b, h, n, attn.device)
    qblocks = triton.cdiv(n, block_q)
    hgroups = triton.cdiv(h, per_group)
    grid = b * hgroups * qblocks
    if grid:
        _map_sums_kernel[(grid,)](
            attn, sums[0], sums[-1], n, h, num_prefix, *attn.stride(),
            qblocks, hgroups, per_group, ROWS=rows, BLOCK_Q=block_q, BLOCK_K=block_k, num_warps=4,
        )
    return sums


def significance(attn: torch.Tensor, score: str, num_prefix: int) -> torch.Tensor:
    """Token significance, SPEC.md: attn (B, H, Q, S) -> sig (B, N = S - num_prefix) int64."""
    b, h, _, s = attn.shape
    n = s - num_prefix
    sig = torch.empty(b, n, dtype=torch.int64, device=attn.device)
    if b == 0:
        return sig
    with device_of(attn):
        if score == "cls":
            block = min(pow2(n), 256)
            blocks = triton.cdiv(n, block)
            _cls_sig_kernel[(b * blocks,)](
                attn, sig, n, h, num_prefix, attn.stride(0), attn.stride(1), attn.stride(3),
                blocks, HEAD_BLOCK=min(pow2(h), sel.HEAD_BLOCK), BLOCK=block,
            )
            return sig
        sums = _map_sums(attn, num_prefix, rows=score == "focal")
        if score == "received":
            return sums[0]
        return focal_significance(sums[0], sums[1])


def select(sig: torch.Tensor, keep: int, strategy: str, rows: int, cols: int) -> torch.Tensor:
    """Kept token indices, SPEC.md: sig (B, N) int64 (any strides) -> idx (B, keep) int64,
    strictly increasing in each row."""
    idx = torch.empty(sig.shape[0], keep, dtype=torch.int64, device=sig.device)
    if sig.shape[0] and keep:
        with device_of(sig):
            sel.launch_select(sig, idx, keep, strategy, cols)
    return idx


def prune_tokens(
    tokens: torch.Tensor, attn: torch.Tensor, keep: int, strategy: str, score: str,
    num_prefix: int, rows: int, cols: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D), attn (B, H, Q, num_prefix + N) -> pruned (B, keep, D), idx (B, keep)."""

    def fused_inputs():
        if score == "cls":
            return score, attn, None, None
        sums = _map_sums(attn, num_prefix, rows=score == "focal")
        return score, None, sums[0], sums[-1]

    return sel.select_gather(tokens, keep, strategy, cols, num_prefix,
                             lambda: significance(attn, score, num_prefix), fused_inputs)
