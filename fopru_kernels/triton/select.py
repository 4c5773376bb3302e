"""Exact selection and row gather as Triton code, shared by the Triton ops (SPEC.md "Selection").

Selection works on *units*: tokens for ``rank`` (width W = 1) and grid rows for ``row`` (W = cols,
key = row sum). Ordering units by (key desc, unit asc) and expanding each to its W tokens is
exactly SPEC.md's order for both strategies. Selection is threshold-then-compact: a radix search
(histograms of 8-bit digits) over the keys' distance from their minimum finds the count-th largest
key T, units above T are kept, ties at T are kept in index order up to the count, and a prefix sum
gives every kept unit its output slot, so indices come out ascending without a sort.

Device code (``@triton.jit``, public for the op modules): ``select_units`` selects from a register
vector; ``threshold`` runs the same search over units in global memory in chunks, and
``chunk_rel`` / ``slots`` then number the kept units chunk by chunk (a cu_seqlens segment is just a
base pointer and a unit count: ``prune_tokens_varlen.py`` selects per segment this way);
``gather_rows`` copies kept rows. Kernels and launchers: ``select_gather`` (selection + gather of
the dense ops: one fused launch while the token tile fits, else ``launch_select`` and a gather),
``launch_select``, and the launch sizes ``unit_width``, ``rows_per_program``, ``block_d``.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import target
from .exact import focal_sums, focal_use_col, fx_head_sum
from .launch import device_of, pow2

INT64_MAX = tl.constexpr(9223372036854775807)
INT64_MIN = tl.constexpr(-9223372036854775808)
SCORE_FOCAL = tl.constexpr(0)
SCORE_CLS = tl.constexpr(2)
SCORE_CODES = {"focal": 0, "received": 1, "cls": 2}

# Fused path: token tile next_pow2(units) * next_pow2(W) held in registers.
MAX_TILE = 4096
# Bits of the key decided per selection pass (a 2^RADIX_BITS-bin histogram); the search stops
# early once exactly `count` units lie at or above the threshold. On H200 at LLaVA size, 8 bits
# and 4 bits measured alike (~10 us per cls call), 6 bits slower (development runs, README).
RADIX_BITS = 8
GATHER_TILE = 4096  # elements of the (rows x BLOCK_D) gather tile per loop step
# cls inside the fused kernel: heads loaded per pipelined step, and the cap on heads x tile
# elements per step.
HEAD_BLOCK = 16
HEAD_TILE = 16384
# Chunked selection (threshold): units per chunk, and units x W elements per row-sum tile.
SELECT_BLOCK = 1024
SELECT_TILE = 4096


# ----------------------------------------------------------------------------------- device code


@triton.jit
def _bit_length(x):
    """Bits needed for the uint64 scalar x (0 for 0): six halving steps, no loop-carried state."""
    n = 0
    for i in tl.static_range(6):
        sh = 32 >> i
        big = (x >> sh) != 0
        n += tl.where(big, sh, 0)
        x = tl.where(big, x >> sh, x)
    return n + (x != 0).to(tl.int32)


@triton.jit
def _relative(key, valid, lo):
    """Distance of each key from the minimum lo as uint64 (exact up to 2^64 - 1; SPEC.md's limit
    bounds |key| by 2^62, so the distance can reach 2^63, one past int64)."""
    return (tl.where(valid, key, lo) - lo).to(tl.uint64, bitcast=True)


@triton.jit
def _digit_hist(rel, valid, off, shift, RADIX_BITS: tl.constexpr):
    """Histogram of the digit min((rel - off) >> shift, 2^RADIX_BITS - 1) of the valid units with
    rel >= off; every other unit lands in bin 0, which the search never reads."""
    inside = valid & (rel >= off)
    digit = tl.minimum((rel - off) >> shift, (1 << RADIX_BITS) - 1).to(tl.int32)
    return tl.histogram(tl.where(inside, digit, 0), 1 << RADIX_BITS)


@triton.jit
def _next_offset(off, hist, count, shift, RADIX_BITS: tl.constexpr):
    """Appends to off the largest digit d whose threshold off + d * 2^shift still has >= count
    units at or above it (d = 0 always does: the search keeps that invariant). Also returns
    whether exactly `count` units are at or above the new off: then they are the selection and
    the search can stop (bin 0 over-counts, so it never claims that falsely)."""
    at_least = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist  # units with digit >= d
    d = tl.arange(0, 1 << RADIX_BITS)
    step = tl.sum(((d > 0) & (at_least >= count)).to(tl.int32), axis=0)
    exact = tl.sum(tl.where(d == step, at_least, 0), axis=0) == count
    return off + (step.to(tl.uint64) << shift), exact


@triton.jit
def _first_shift(lo, hi, RADIX_BITS: tl.constexpr):
    """Shift of the most significant digit of the distances (-RADIX_BITS if all keys are equal)."""
    return (tl.cdiv(_bit_length((hi - lo).to(tl.uint64, bitcast=True)), RADIX_BITS) - 1) * RADIX_BITS


@triton.jit
def slots(rel, valid, off, ties_wanted, ties_before, kept_before):
    """Output slot of every unit (-1 if dropped): units above the threshold off, plus the first
    ties_wanted units at it in index order; kept units numbered in index order. Chunked callers
    pass the ties and kept units of earlier chunks. Returns (slot, ties here, kept here)."""
    tie = (valid & (rel == off)).to(tl.int32)
    tie_rank = ties_before + tl.cumsum(tie, axis=0) - tie
    kept = (valid & (rel > off)) | ((tie != 0) & (tie_rank < ties_wanted))
    k = kept.to(tl.int32)
    slot = tl.where(kept, kept_before + tl.cumsum(k, axis=0) - k, -1)
    return slot, tl.sum(tie, axis=0), tl.sum(k, axis=0)


@triton.jit
def select_units(key, valid, count, RADIX_BITS: tl.constexpr):
    """Slots of the `count` best entries of a register vector (key desc, index asc); -1 elsewhere."""
    lo = tl.min(tl.where(valid, key, INT64_MAX), axis=0)
    hi = tl.max(tl.where(valid, key, INT64_MIN), axis=0)
    rel = _relative(key, valid, lo)
    off = tl.full([], 0, tl.uint64)
    shift = _first_shift(lo, hi, RADIX_BITS)
    while shift >= 0:
        off, exact = _next_offset(off, _digit_hist(rel, valid, off, shift, RADIX_BITS), count, shift, RADIX_BITS)
        shift = tl.where(exact, -1, shift - RADIX_BITS)
    above = tl.sum((valid & (rel > off)).to(tl.int32), axis=0)
    slot, _, _ = slots(rel, valid, off, count - above, 0, 0)
    return slot


@triton.jit
def gather_rows(src_ptr, dst_ptr, k, tok, kmask, D, s_tn, s_td, BLOCK_D: tl.constexpr):
    """dst[k, :] = src[tok, :] for the rows k of one program (k, tok: int64 vectors); src rows
    have strides (s_tn, s_td), dst rows are contiguous rows of D."""
    src = src_ptr + tok[:, None] * s_tn
    dst = dst_ptr + k[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m = kmask[:, None] & (d[None, :] < D)
        tl.store(dst + d[None, :], tl.load(src + d[None, :] * s_td, mask=m), mask=m)


@triton.jit
def unit_keys(sig_ptr, s_sn, u, valid, W, X_BLOCK: tl.constexpr):
    """Key of each unit u: the sum of its W significance values (int64)."""
    acc = tl.zeros(u.shape, tl.int64)
    for x0 in range(0, W, X_BLOCK):
        x = x0 + tl.arange(0, X_BLOCK)
        m = valid[:, None] & (x[None, :] < W)
        acc += tl.sum(tl.load(sig_ptr + (u[:, None] * W + x[None, :]) * s_sn, mask=m, other=0), axis=1)
    return acc


@triton.jit
def chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr):
    """The chunk of units u = u0 + arange(UNIT_BLOCK) (int64): (u, u < units, the distance of
    each valid unit's key from lo)."""
    u = u0 + tl.arange(0, UNIT_BLOCK).to(tl.int64)
    valid = u < units
    return u, valid, _relative(unit_keys(sig, s_sn, u, valid, W, X_BLOCK), valid, lo)


@triton.jit
def threshold(sig, s_sn, units, W, count,
               UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The radix search of select_units over units held in global memory (sig with element
    stride s_sn, keys from unit_keys), looping over chunks: returns (lo, off, above) with lo the
    smallest key, off the count-th largest key's distance from lo, and above the number of units
    strictly beyond it. units == 0 gives no pass."""
    lo = tl.full([], INT64_MAX, tl.int64)
    hi = tl.full([], INT64_MIN, tl.int64)
    for u0 in range(0, units, UNIT_BLOCK):
        u = u0 + tl.arange(0, UNIT_BLOCK).to(tl.int64)
        valid = u < units
        key = unit_keys(sig, s_sn, u, valid, W, X_BLOCK)
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, INT64_MAX), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, INT64_MIN), axis=0))
    lo = tl.where(units > 0, lo, 0)  # no keys: an empty range, not INT64_MIN - INT64_MAX
    hi = tl.where(units > 0, hi, 0)

    off = tl.full([], 0, tl.uint64)
    shift = tl.where(units > 0, _first_shift(lo, hi, RADIX_BITS), -1)
    while shift >= 0:
        hist = tl.zeros([1 << RADIX_BITS], tl.int32)
        for u0 in range(0, units, UNIT_BLOCK):
            _, valid, rel = chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
            hist += _digit_hist(rel, valid, off, shift, RADIX_BITS)
        off, exact = _next_offset(off, hist, count, shift, RADIX_BITS)
        shift = tl.where(exact, -1, shift - RADIX_BITS)

    above = 0
    for u0 in range(0, units, UNIT_BLOCK):
        _, valid, rel = chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
        above += tl.sum((valid & (rel > off)).to(tl.int32), axis=0)
    return lo, off, above


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _prune_fused_kernel(
    tokens_ptr, attn_ptr, col_ptr, row_ptr, out_ptr, idx_ptr,
    N, D, H, P, units, W, keep, chunks,
    s_tb, s_tn, s_td, s_ab, s_ah, s_as,
    SCORE: tl.constexpr, UNIT_BLOCK: tl.constexpr, W_BLOCK: tl.constexpr,
    HEAD_BLOCK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr,
    RADIX_BITS: tl.constexpr,
):
    """Significance tile -> selection -> gather of rows [c * R, (c + 1) * R) of image b.

    Grid (B * chunks,). Tokens are laid out as a (unit, x) tile, token = unit * W + x; every
    program of an image recomputes the same selection, so no grid-wide synchronisation is needed.
    cls reads the CLS row of attn; received/focal read the col/row sums of _map_sums_kernel.

    Selection runs over tokens, each with its unit's key (rank: its own significance; row: its
    grid row's sum). A row's tokens then tie and sit together in index order, so the first `keep`
    tokens by (key desc, index asc) are exactly the best keep / W rows; flattening the tile keeps
    index order, and token vectors stay spread over all threads (row vectors of a few dozen
    entries would be replicated across them).
    """
    pid = tl.program_id(0)
    b = (pid // chunks).to(tl.int64)  # 32-bit division; 64-bit offsets from here on
    c = pid % chunks
    u = tl.arange(0, UNIT_BLOCK)
    x = tl.arange(0, W_BLOCK)
    tok = (u[:, None] * W + x[None, :]).to(tl.int64)
    valid = (u[:, None] < units) & (x[None, :] < W)

    if SCORE == SCORE_CLS:
        heads = tl.arange(0, HEAD_BLOCK).to(tl.int64)[:, None, None]
        cls_row = attn_ptr + b * s_ab + (P + tok)[None, :, :] * s_as
        sig = fx_head_sum(cls_row, valid[None, :, :], heads, H, s_ah, HEAD_BLOCK)
    else:
        sig = tl.load(col_ptr + b * N + tok, mask=valid, other=0)
        if SCORE == SCORE_FOCAL:
            row = tl.load(row_ptr + b * N + tok, mask=valid, other=0)
            sig = tl.where(focal_use_col(focal_sums(sig, valid), focal_sums(row, valid), N), sig, row)

    key = tl.broadcast_to(tl.sum(sig, axis=1)[:, None], (UNIT_BLOCK, W_BLOCK))
    tok = tl.reshape(tok, (UNIT_BLOCK * W_BLOCK,))
    slot = select_units(tl.reshape(key, (UNIT_BLOCK * W_BLOCK,)),
                         tl.reshape(valid, (UNIT_BLOCK * W_BLOCK,)), keep, RADIX_BITS)

    # Invert slot -> token for this program's output rows.
    k = c * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)  # keep <= N < 2^31
    kmask = k < keep
    src = tl.sum(tl.where(slot[None, :] == k[:, None], tok[None, :], 0), axis=1)
    k = k.to(tl.int64)
    tl.store(idx_ptr + b * keep + k, src, mask=kmask)
    gather_rows(tokens_ptr + b * s_tb, out_ptr + b * keep * D, k, src, kmask, D, s_tn, s_td, BLOCK_D)


@triton.jit
def _select_kernel(sig_ptr, idx_ptr, s_sb, s_sn, units, W, count, keep,
                   UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """idx[b] for any N: the selection of select_units, looping over chunks of units held in
    global memory (sig with any strides). Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    sig = sig_ptr + b * s_sb
    lo, off, above = threshold(sig, s_sn, units, W, count, UNIT_BLOCK, X_BLOCK, RADIX_BITS)
    ties_before = 0
    kept_before = 0
    for u0 in range(0, units, UNIT_BLOCK):
        u, valid, rel = chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
        slot, ties, kept = slots(rel, valid, off, count - above, ties_before, kept_before)
        for x0 in range(0, W, X_BLOCK):
            x = x0 + tl.arange(0, X_BLOCK)
            m = (slot >= 0)[:, None] & (x[None, :] < W)
            dst = idx_ptr + b * keep + slot.to(tl.int64)[:, None] * W + x[None, :]
            tl.store(dst, u[:, None] * W + x[None, :], mask=m)
        ties_before += ties
        kept_before += kept


@triton.jit
def _gather_kernel(tokens_ptr, idx_ptr, out_ptr, keep, D, s_tb, s_tn, s_td, chunks,
                   ROWS_PER_PROGRAM: tl.constexpr, BLOCK_D: tl.constexpr):
    """pruned[b, k] = tokens[b, idx[b, k]]; grid (B * chunks,)."""
    pid = tl.program_id(0)
    b = (pid // chunks).to(tl.int64)
    k = (pid % chunks).to(tl.int64) * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)
    kmask = k < keep
    tok = tl.load(idx_ptr + b * keep + k, mask=kmask, other=0)
    gather_rows(tokens_ptr + b * s_tb, out_ptr + b * keep * D, k, tok, kmask, D, s_tn, s_td, BLOCK_D)


# ----------------------------------------------------------------------------------- launchers


def _fused_warps(tile: int) -> int:
    """Warps of a fused program. Its selection is issue-bound: at LLaVA size (1024-token tile,
    one program per SM) 8 warps took 9.0 us and 4 warps 10.0 us on H200; 16 were slower."""
    return 4 if tile < 1024 else 8


def unit_width(n: int, strategy: str, cols: int) -> tuple[int, int]:
    """(units, W): rank selects single tokens, row selects whole grid rows of W = cols tokens."""
    return (n // cols, cols) if strategy == "row" else (n, 1)


def rows_per_program(batch: int, keep: int, device: torch.device) -> int:
    """Output rows per gather program. On a GPU: at most one program per SM, since every program
    of the fused kernel recomputes the selection, an issue-bound job that slows down when two
    programs share an SM. Under the interpreter (CPU tensors) programs run one after another:
    few, large ones."""
    if not target.for_gpu(device):
        return min(pow2(keep), 256)
    return min(pow2(triton.cdiv(batch * keep, target.sm_count(device))), 64)


def block_d(d: int, rows: int) -> int:
    """Columns per step of a gather of `rows` rows of d elements: the whole row, up to the tile."""
    return min(pow2(d), max(16, GATHER_TILE // rows))


def launch_select(sig: torch.Tensor, idx: torch.Tensor, keep: int, strategy: str, cols: int) -> None:
    """idx (B, keep) int64 <- the kept indices of sig (B, N) int64 (any strides), any N: one
    _select_kernel program per image. Launches on the current device."""
    units, w = unit_width(sig.shape[1], strategy, cols)
    unit_block = min(pow2(units), SELECT_BLOCK)
    _select_kernel[(sig.shape[0],)](
        sig, idx, sig.stride(0), sig.stride(1), units, w, keep // w, keep,
        UNIT_BLOCK=unit_block, X_BLOCK=min(pow2(w), max(1, SELECT_TILE // unit_block)),
        RADIX_BITS=RADIX_BITS,
    )


def select_gather(
    tokens: torch.Tensor, keep: int, strategy: str, cols: int, num_prefix: int,
    staged_sig: Callable[[], torch.Tensor],
    fused_inputs: Callable[[], tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection + gather of tokens (B, N, D) -> pruned (B, keep, D), idx (B, keep) int64, on a
    significance the caller computes only for the path taken (prune_tokens.py, significance_qk.py):

    - the token tile fits (at most MAX_TILE): fused_inputs() -> (score, attn, col, row) feeds one
      _prune_fused_kernel launch. score "cls" reads the CLS row of attn (B, H, Q, num_prefix + N),
      col and row None; "received" selects on col (B, N) int64 as given and "focal" picks col or
      row (B, N) int64 by the exact focal rule, attn None for both.
    - else staged_sig() -> sig (B, N) int64 feeds _select_kernel, then _gather_kernel.
    """
    b, n, d = tokens.shape
    out = torch.empty(b, keep, d, dtype=tokens.dtype, device=tokens.device)
    idx = torch.empty(b, keep, dtype=torch.int64, device=tokens.device)
    if b == 0 or keep == 0:
        return out, idx
    units, w = unit_width(n, strategy, cols)
    per_prog = rows_per_program(b, keep, tokens.device)
    chunks = triton.cdiv(keep, per_prog)
    bd = block_d(d, per_prog)
    unit_block, w_block = pow2(units), pow2(w)
    tile = unit_block * w_block
    with device_of(tokens):
        if tile > MAX_TILE:
            launch_select(staged_sig(), idx, keep, strategy, cols)
            _gather_kernel[(b * chunks,)](
                tokens, idx, out, keep, d, *tokens.stride(), chunks,
                ROWS_PER_PROGRAM=per_prog, BLOCK_D=bd,
            )
            return out, idx
        score, attn, col, row = fused_inputs()
        if attn is None:  # attn_ptr, H, P and the attn strides are read only on the cls path
            attn, h, p, attn_strides, head_block = col, 1, 0, (0, 0, 0), 1
        else:  # cls: col_ptr and row_ptr are not read
            col = row = attn
            h, p = attn.shape[1], num_prefix
            attn_strides = attn.stride(0), attn.stride(1), attn.stride(3)
            head_block = min(pow2(h), HEAD_BLOCK, max(1, HEAD_TILE // tile))
        _prune_fused_kernel[(b * chunks,)](
            tokens, attn, col, row, out, idx,
            n, d, h, p, units, w, keep, chunks,
            *tokens.stride(), *attn_strides,
            SCORE=SCORE_CODES[score], UNIT_BLOCK=unit_block, W_BLOCK=w_block,
            HEAD_BLOCK=head_block, ROWS_PER_PROGRAM=per_prog, BLOCK_D=bd, RADIX_BITS=RADIX_BITS,
            num_warps=_fused_warps(tile),
        )
    return out, idx
