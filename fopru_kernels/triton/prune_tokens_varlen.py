"""prune_tokens_varlen as one Triton launch: selection and gather of B packed images of any sizes.

SPEC.md "Ragged batches": image b owns tokens [cu_seqlens[b], cu_seqlens[b + 1]) of the packed
(T, D) tokens and (T,) significance; its kept indices are exactly select() of that segment, offset
to global token indices. The selection is select.py's (threshold-then-compact over units: tokens
for ``rank``, grid rows of W = cols tokens for ``row``), built from its chunked device code.

One program per (image, chunk of ROWS_PER_PROGRAM output rows); each program recomputes its
image's selection from sig (in L2 on a GPU), so no grid-wide synchronisation is needed, and the
programs past an image's keep do nothing. The segment bounds are read on the device, so the host
never syncs: an image whose segment is invalid (bounds decreasing or outside [0, T], n_b < keep[b],
rows_b * cols_b != n_b where grids are given) gets idx = -1 and zero rows, and nothing is read or
written out of bounds.

Host -> device traffic: one small int64 table (keep, output offset, W, expected n_b per image),
copied asynchronously by launch.device_table; nothing is read back. Under CUDA graph capture the
copy becomes a graph node that reads the table's host memory again at every replay, so
device_table takes it from a pinned arena that lives as long as the process (launch.py says why
torch's own pinned allocations are not enough on every torch version this package supports).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import select as sel
from .launch import device_of, device_table, pow2
from .select import chunk_rel, gather_rows, slots, threshold

# int64 columns of the per-image table: keep, first output row, W, expected n_b (-1: any).
META_COLS = tl.constexpr(4)


@triton.jit
def _prune_varlen_kernel(
    tokens_ptr, sig_ptr, cu_ptr, meta_ptr, out_ptr, idx_ptr, cu_out_ptr, status_ptr,
    T, D, s_tn, s_td, s_sn, s_cu, cu_div, chunks,
    UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    BLOCK_D: tl.constexpr, RADIX_BITS: tl.constexpr, SCORED: tl.constexpr,
):
    """Output rows [c * R, (c + 1) * R) of image b (R = ROWS_PER_PROGRAM); grid (B * chunks,).
    Image b's bounds are cu_seqlens[b] / cu_div and cu_seqlens[b + 1] / cu_div. SCORED: sig comes
    from the packed q/k scoring, whose check of its own segments left status[0] (0: invalid, and
    then every image counts as invalid); without SCORED status_ptr is not read.

    Program (b, 0) also writes cu_seqlens_out[b + 1] (and (0, 0) the leading 0), so the output
    prefix sums need no copy of their own."""
    pid = tl.program_id(0)
    b = (pid // chunks).to(tl.int64)  # 32-bit division; 64-bit offsets from here on
    c = pid % chunks
    keep = tl.load(meta_ptr + b * META_COLS)
    out0 = tl.load(meta_ptr + b * META_COLS + 1)
    w = tl.load(meta_ptr + b * META_COLS + 2)
    want_n = tl.load(meta_ptr + b * META_COLS + 3)
    if c == 0:
        tl.store(cu_out_ptr + b + 1, (out0 + keep).to(cu_out_ptr.dtype.element_ty))
        if b == 0:
            tl.store(cu_out_ptr, tl.zeros([], cu_out_ptr.dtype.element_ty))

    start = tl.load(cu_ptr + b * s_cu).to(tl.int64) // cu_div  # cu_seqlens may be a strided view
    end = tl.load(cu_ptr + (b + 1) * s_cu).to(tl.int64) // cu_div
    n = end - start
    ok = (start >= 0) & (start <= end) & (end <= T) & (keep <= n) & ((want_n < 0) | (n == want_n))
    if SCORED:
        ok = ok & (tl.load(status_ptr) != 0)
    # Zero units skip every loop: invalid images and programs past their image's keep.
    units = tl.where(ok & (c * ROWS_PER_PROGRAM < keep), n // w, 0)
    count = keep // w
    sig = sig_ptr + start * s_sn
    lo, off, above = threshold(sig, s_sn, units, w, count, UNIT_BLOCK, X_BLOCK, RADIX_BITS)

    # Invert slot -> unit for this program's output rows: row k is token k % W of kept unit k // W.
    k = c * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM).to(tl.int64)
    kmask = k < keep
    want = k // w
    unit = tl.zeros([ROWS_PER_PROGRAM], tl.int64)
    ties_before = 0
    kept_before = 0
    for u0 in range(0, units, UNIT_BLOCK):
        u, valid, rel = chunk_rel(sig, s_sn, u0, units, w, lo, UNIT_BLOCK, X_BLOCK)
        slot, ties, kept = slots(rel, valid, off, count - above, ties_before, kept_before)
        unit += tl.sum(tl.where(slot[None, :] == want[:, None], u[None, :], 0), axis=1)
        ties_before += ties
        kept_before += kept

    tok = start + unit * w + k % w
    tl.store(idx_ptr + out0 + k, tl.where(ok, tok, -1), mask=kmask)
    if ok:
        gather_rows(tokens_ptr, out_ptr + out0 * D, k, tok, kmask, D, s_tn, s_td, BLOCK_D)  # tok is global
    else:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
            m = kmask[:, None] & (d[None, :] < D)
            zero = tl.zeros([ROWS_PER_PROGRAM, BLOCK_D], out_ptr.dtype.element_ty)
            tl.store(out_ptr + (out0 + k)[:, None] * D + d[None, :], zero, mask=m)


def _meta(keep: list[int], cols: list[int], grids: list[int] | None) -> list[int]:
    """The per-image table, flattened: keep, first output row, W = cols[b], expected n_b
    (rows * cols of grids[b] when grids are given, as the CPU check demands; else -1, any size)."""
    table, start = [], 0
    for b, k in enumerate(keep):
        table += [k, start, cols[b], -1 if grids is None else grids[2 * b] * grids[2 * b + 1]]
        start += k
    return table


def prune_tokens_varlen(
    tokens: torch.Tensor, sig: torch.Tensor, cu_seqlens: torch.Tensor, keep: list[int], strategy: str,
    cols: list[int], grids: list[int] | None = None, *, cu_div: int = 1, status: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged batch, SPEC.md: tokens (T, D), sig (T,) int64, cu_seqlens (B + 1,) int32/int64 ->
    pruned (sum(keep), D) of tokens' dtype, idx (sum(keep),) int64 global token indices and
    cu_seqlens_out (B + 1,) of cu_seqlens' dtype (prefix sums of keep).

    keep: B host ints; cols: B host ints, grid cols for ``row`` and 1 for ``rank`` (what
    _checks.check_prune_varlen returns); grids: the op's flat [rows_0, cols_0, ...] or None, which
    lets the kernel check rows_b * cols_b == n_b on the device. Inputs validated by _checks except
    the values of cu_seqlens, which the kernel checks per image. For prune_tokens_qk_varlen
    (significance_qk_varlen.py): cu_div, the divisor of cu_seqlens' values (group, when the selection
    segments are cu_seqlens / group), and status, the scoring's device status (int64, status[0] == 0:
    its segments were invalid, so every image is), or None.
    """
    b = len(keep)
    t, d = tokens.shape
    total = sum(keep)
    device = tokens.device
    out = torch.empty(total, d, dtype=tokens.dtype, device=device)
    idx = torch.empty(total, dtype=torch.int64, device=device)
    cu_out = torch.empty(b + 1, dtype=cu_seqlens.dtype, device=device)
    if b == 0:
        return out, idx, cu_out.zero_()
    max_keep = max(keep)
    per_prog = sel.rows_per_program(b, max_keep, device)
    chunks = max(1, triton.cdiv(max_keep, per_prog))
    # Units per image are bounded by T; row grids bound them by rows (n_b itself lives on the device).
    units = max(grids[0::2]) if strategy == "row" and grids is not None else t
    unit_block = min(pow2(units), sel.SELECT_BLOCK)
    with device_of(tokens):
        meta = device_table(_meta(keep, cols, grids), device)
        _prune_varlen_kernel[(b * chunks,)](
            tokens, sig, cu_seqlens, meta, out, idx, cu_out, meta if status is None else status,
            t, d, tokens.stride(0), tokens.stride(1), sig.stride(0), cu_seqlens.stride(0), cu_div, chunks,
            UNIT_BLOCK=unit_block, X_BLOCK=min(pow2(max(cols)), max(1, sel.SELECT_TILE // unit_block)),
            ROWS_PER_PROGRAM=per_prog, BLOCK_D=sel.block_d(d, per_prog), RADIX_BITS=sel.RADIX_BITS,
            SCORED=status is not None,
        )
    return out, idx, cu_out
