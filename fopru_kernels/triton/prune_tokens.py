"""FoPru as Triton kernels: significance, selection and gather, bitwise equal to reference.py.

Launchers take inputs already validated by ``_checks.py`` (``rows``/``cols`` resolved) and follow
SPEC.md exactly: attention values become int64 fixed point, sums are integer (so atomics and any
split of the work give the same bits), and selection compares integer keys only.

Selection works on *units*: tokens for ``rank`` (width W = 1) and grid rows for ``row`` (W = cols,
key = row sum). Ordering units by (key desc, unit asc) and expanding each to its W tokens is
exactly SPEC.md's order for both strategies. Selection is threshold-then-compact: a radix search
(histograms of 8-bit digits) over the keys' distance from their minimum finds the count-th largest
key T, units above T are kept, ties at T are kept in index order up to the count, and a prefix sum
gives every kept unit its output slot, so indices come out ascending without a sort.

Launches per ``prune_tokens`` call (a (unit, x) tile of at most ``_MAX_TILE`` tokens, which covers
every ViT grid up to 64 x 64):
- ``cls``: one launch, ``_prune_fused_kernel``; each program recomputes the (cheap) CLS
  significance and selection and gathers its share of the K x D rows.
- ``received`` / ``focal``: a zeroed int64 workspace, ``_map_sums_kernel`` (many programs, atomics),
  then ``_prune_fused_kernel`` (focal choice + selection + gather).
Larger N falls back to staged kernels: significance, ``_select_kernel`` (one program per image,
looping over chunks), ``_gather_kernel``.

Development numbers (ad hoc scripts never committed, an older revision; see
benchmarks/results/2026-11-26-h200-triton-development.md): H200, Triton 3.6, torch 2.11, CUDA graph
replay, LLaVA-1.5 shapes (N=576, H=16, D=1024, K=144, fp16): cls rank B=1 ~10 us per call (launch
floor 1.1 us, CLS significance ~1 us, the rest the in-register selection, which is issue-bound); focal B=32
~200 us = 68% of device copy bandwidth; focal B=1 ~26 us (the map reduction is latency-bound).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import triton
import triton.language as tl

from . import target

FX_SCALE = tl.constexpr(268435456.0)  # 2^28: exact, so float32 and float64 give the same bits
FX_CLAMP = tl.constexpr(256.0)
INT64_MAX = tl.constexpr(9223372036854775807)
INT64_MIN = tl.constexpr(-9223372036854775808)
SCORE_FOCAL = tl.constexpr(0)
SCORE_CLS = tl.constexpr(2)
_SCORE_CODES = {"focal": 0, "received": 1, "cls": 2}

# Fused path: token tile next_pow2(units) * next_pow2(W) held in registers.
_MAX_TILE = 4096
# Bits of the key decided per selection pass (a 2^RADIX_BITS-bin histogram); the search stops
# early once exactly `count` units lie at or above the threshold. On H200 at LLaVA size, 8 bits
# and 4 bits measured alike (~10 us per cls call), 6 bits slower.
_RADIX_BITS = 8
# Map reduction tile: BLOCK_Q query rows x BLOCK_K keys, keys innermost for coalesced loads.
_MAP_BLOCK_Q = 16
_MAP_BLOCK_K = 128
# Target program count for the map reduction (a few waves on a 132-SM H100).
_MAP_PROGRAMS = 1024
_GATHER_TILE = 4096  # elements of the (rows x BLOCK_D) gather tile per loop step
# cls: heads loaded per pipelined step, and the cap on heads x tile elements per step.
_HEAD_BLOCK = 16
_HEAD_TILE = 16384
# Chunked selection (_select_kernel): units per chunk, and units x W elements per row-sum tile.
_SELECT_BLOCK = 1024
_SELECT_TILE = 4096


# ----------------------------------------------------------------------------------- helpers


@triton.jit
def _fx(a):
    """SPEC.md fixed point: trunc(clamp(nan->0(a), -256, 256) * 2^28) as int64."""
    if a.dtype == tl.float64:
        x = a
    else:
        x = a.to(tl.float32)
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x < -FX_CLAMP, -FX_CLAMP, tl.where(x > FX_CLAMP, FX_CLAMP, x))
    return (x * FX_SCALE).to(tl.int64)  # the scaling is exact; the cast truncates toward zero


@triton.jit
def _fx_head_sum(ptrs, mask, heads, H, s_ah, HEAD_BLOCK: tl.constexpr):
    """sum over heads h < H of fx(attn[ptrs + h * s_ah]): ptrs/mask address one head's tile,
    heads = arange(HEAD_BLOCK) shaped to broadcast against them along a leading axis.

    Software-pipelined by hand: a head block's loads are issued one loop iteration before their
    conversion. In the same basic block ptxas interleaves loads and conversions, a few loads per
    ~300 ns L2 round trip, which dominated the latency of the one-launch cls path."""
    a = tl.load(ptrs + heads * s_ah, mask=mask & (heads < H), other=0.0)
    acc = tl.zeros(tl.sum(a, axis=0).shape, tl.int64)
    for h0 in range(HEAD_BLOCK, H + HEAD_BLOCK, HEAD_BLOCK):
        h = heads + h0
        nxt = tl.load(ptrs + h * s_ah, mask=mask & (h < H), other=0.0)
        acc += tl.sum(_fx(a), axis=0)
        a = nxt
    return acc


# SPEC.md's focal rule in exact integers: the column sums win iff
#   N * sum(col^2) - sum(col)^2 > N * sum(row^2) - sum(row)^2, i.e.
#   N * sum(col^2) + sum(row)^2 > N * sum(row^2) + sum(col)^2   (no subtraction: both sides >= 0).
# Triton has no 128-bit integers, so every quantity lives in int64 limbs of 32 bits: sums of
# squares in four limbs, sums as (hi, lo), each side of the comparison in seven limbs. Exact for any
# int64 vectors with N < 2^31 (csrc/fopru.h does the same with __int128 and 64-bit words).


@triton.jit
def _carry(lo, hi):
    """(lo mod 2^32, hi + floor(lo / 2^32)): lo's carry (or borrow: the shift is arithmetic) moved
    into the next limb."""
    c = lo >> 32
    return lo - (c << 32), hi + c


@triton.jit
def _mul32(a, b):
    """a * b for int64 0 <= a, b < 2^32 as (low, high) 32-bit limbs: the product needs 64
    unsigned bits."""
    p = a.to(tl.uint64) * b.to(tl.uint64)
    hi = p >> 32
    return (p - (hi << 32)).to(tl.int64), hi.to(tl.int64)


@triton.jit
def _focal_sums(x, valid):
    """sum(x^2) and sum(x) over the valid entries of the int64 tensor x (any shape): a tuple of
    int64 scalars (sq0, sq1, sq2, sq3, hi, lo) with sum(x^2) = sum_k sq_k 2^(32 k) and
    sum(x) = hi 2^32 + lo. Each summed term is below 2^34, so 2^29 of them fit."""
    x = tl.where(valid, x, 0)
    a = tl.where(x < 0, -x, x).to(tl.uint64, bitcast=True)  # |x|: -(-2^63) wraps to 2^63, right as uint64
    a1 = (a >> 32).to(tl.int64)
    a0 = (a - ((a >> 32) << 32)).to(tl.int64)
    p0, p1 = _mul32(a0, a0)
    q0, q1 = _mul32(a0, a1)
    r0, r1 = _mul32(a1, a1)
    hi = x >> 32
    return (tl.sum(p0), tl.sum(p1 + 2 * q0), tl.sum(2 * q1 + r0), tl.sum(r1), tl.sum(hi), tl.sum(x - (hi << 32)))


@triton.jit
def _focal_add(s, t):
    """s + t for two _focal_sums tuples, carried so every limb but the top one stays below 2^32:
    a loop over chunks can add any number of them."""
    s0, s1 = _carry(s[0] + t[0], s[1] + t[1])
    s1, s2 = _carry(s1, s[2] + t[2])
    s2, s3 = _carry(s2, s[3] + t[3])
    lo, hi = _carry(s[5] + t[5], s[4] + t[4])
    return s0, s1, s2, s3, hi, lo


@triton.jit
def _focal_side(a, b, n):
    """n * sum(a^2) + sum(b)^2 from the _focal_sums tuples a and b: seven 32-bit limbs (a tuple),
    each below 2^32. n < 2^31."""
    a0, a1 = _carry(a[0], a[1])  # sum(a^2) in five limbs below 2^32
    a1, a2 = _carry(a1, a[2])
    a2, a3 = _carry(a2, a[3])
    a3, a4 = _carry(a3, 0)
    n = n.to(tl.int64)
    w0, w1 = _carry(n * a0, n * a1)  # each product < 2^63
    w1, w2 = _carry(w1, n * a2)
    w2, w3 = _carry(w2, n * a3)
    w3, w4 = _carry(w3, n * a4)
    w4, w5 = _carry(w4, 0)
    lo, hi = _carry(b[5], b[4])  # sum(b) = hi 2^32 + lo, 0 <= lo < 2^32
    neg = hi < 0
    borrow = (neg & (lo != 0)).to(tl.int64)
    m0 = tl.where(borrow != 0, 4294967296 - lo, lo)  # |sum(b)| = m2 2^64 + m1 2^32 + m0
    m1, m2 = _carry(tl.where(neg, -hi - borrow, hi), 0)
    p0, p1 = _mul32(m0, m0)
    q0, q1 = _mul32(m0, m1)
    r0, r1 = _mul32(m1, m1)
    s0, s1 = _mul32(m0, m2)
    t0, t1 = _mul32(m1, m2)
    u0, u1 = _mul32(m2, m2)
    w0, w1 = _carry(w0 + p0, w1 + p1 + 2 * q0)
    w1, w2 = _carry(w1, w2 + 2 * q1 + r0 + 2 * s0)
    w2, w3 = _carry(w2, w3 + r1 + 2 * s1 + 2 * t0)
    w3, w4 = _carry(w3, w4 + 2 * t1 + u0)
    w4, w5 = _carry(w4, w5 + u1)
    w5, w6 = _carry(w5, 0)
    return w0, w1, w2, w3, w4, w5, w6


@triton.jit
def _focal_use_col(col, row, n):
    """SPEC.md's focal rule from the _focal_sums of the column and the row sums (n entries each):
    True for the column sums, False (ties too) for the row sums."""
    x = _focal_side(col, row, n)  # n sum(col^2) + sum(row)^2
    y = _focal_side(row, col, n)  # n sum(row^2) + sum(col)^2
    gt = x[0] > y[0]
    for k in tl.static_range(1, 7):  # the highest differing limb decides
        gt = tl.where(x[k] == y[k], gt, x[k] > y[k])
    return gt


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
def _slots(rel, valid, off, ties_wanted, ties_before, kept_before):
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
def _select_units(key, valid, count, RADIX_BITS: tl.constexpr):
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
    slot, _, _ = _slots(rel, valid, off, count - above, 0, 0)
    return slot


@triton.jit
def _gather_rows(src_ptr, dst_ptr, k, tok, kmask, D, s_tn, s_td, BLOCK_D: tl.constexpr):
    """dst[k, :] = src[tok, :] for the rows k of one program (k, tok: int64 vectors); src rows
    have strides (s_tn, s_td), dst rows are contiguous rows of D."""
    src = src_ptr + tok[:, None] * s_tn
    dst = dst_ptr + k[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D).to(tl.int64)
        m = kmask[:, None] & (d[None, :] < D)
        tl.store(dst + d[None, :], tl.load(src + d[None, :] * s_td, mask=m), mask=m)


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _cls_sig_kernel(attn_ptr, sig_ptr, N, H, P, s_ab, s_ah, s_as, blocks,
                    HEAD_BLOCK: tl.constexpr, BLOCK: tl.constexpr):
    """sig[b, j] = sum_h fx(attn[b, h, 0, P + j]); grid (B * blocks,)."""
    pid = tl.program_id(0)
    b = (pid // blocks).to(tl.int64)
    j = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < N
    heads = tl.arange(0, HEAD_BLOCK).to(tl.int64)[:, None]
    acc = _fx_head_sum(attn_ptr + b * s_ab + (P + j)[None, :] * s_as, m[None, :], heads, H, s_ah, HEAD_BLOCK)
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
            acc += _fx(tl.load(tile + h * s_ah, mask=m, other=0.0))
        tl.atomic_add(col_ptr + b * N + j, tl.sum(acc, axis=0), mask=jmask, sem="relaxed")
        if ROWS:
            row_acc += tl.sum(acc, axis=1)
    if ROWS:
        tl.atomic_add(row_ptr + b * N + i, row_acc, mask=imask, sem="relaxed")


@triton.jit
def _focal_sig_kernel(col_ptr, row_ptr, sig_ptr, N, s_b, s_n, BLOCK: tl.constexpr):
    """sig[b] = col[b] or row[b] by SPEC.md's focal rule; col / row element (b, j) at
    b * s_b + j * s_n, sig contiguous (B, N). Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    col = col_ptr + b * s_b
    row = row_ptr + b * s_b
    zero = tl.zeros([], tl.int64)
    cs = (zero, zero, zero, zero, zero, zero)
    rs = (zero, zero, zero, zero, zero, zero)
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        m = j < N
        cs = _focal_add(cs, _focal_sums(tl.load(col + j * s_n, mask=m, other=0), m))
        rs = _focal_add(rs, _focal_sums(tl.load(row + j * s_n, mask=m, other=0), m))
    src = row
    if _focal_use_col(cs, rs, N):
        src = col
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        m = j < N
        tl.store(sig_ptr + b * N + j, tl.load(src + j * s_n, mask=m), mask=m)


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
        sig = _fx_head_sum(cls_row, valid[None, :, :], heads, H, s_ah, HEAD_BLOCK)
    else:
        sig = tl.load(col_ptr + b * N + tok, mask=valid, other=0)
        if SCORE == SCORE_FOCAL:
            row = tl.load(row_ptr + b * N + tok, mask=valid, other=0)
            sig = tl.where(_focal_use_col(_focal_sums(sig, valid), _focal_sums(row, valid), N), sig, row)

    key = tl.broadcast_to(tl.sum(sig, axis=1)[:, None], (UNIT_BLOCK, W_BLOCK))
    tok = tl.reshape(tok, (UNIT_BLOCK * W_BLOCK,))
    slot = _select_units(tl.reshape(key, (UNIT_BLOCK * W_BLOCK,)),
                         tl.reshape(valid, (UNIT_BLOCK * W_BLOCK,)), keep, RADIX_BITS)

    # Invert slot -> token for this program's output rows.
    k = c * ROWS_PER_PROGRAM + tl.arange(0, ROWS_PER_PROGRAM)  # keep <= N < 2^31
    kmask = k < keep
    src = tl.sum(tl.where(slot[None, :] == k[:, None], tok[None, :], 0), axis=1)
    k = k.to(tl.int64)
    tl.store(idx_ptr + b * keep + k, src, mask=kmask)
    _gather_rows(tokens_ptr + b * s_tb, out_ptr + b * keep * D, k, src, kmask, D, s_tn, s_td, BLOCK_D)


@triton.jit
def _unit_keys(sig_ptr, s_sn, u, valid, W, X_BLOCK: tl.constexpr):
    """Key of each unit u: the sum of its W significance values (int64)."""
    acc = tl.zeros(u.shape, tl.int64)
    for x0 in range(0, W, X_BLOCK):
        x = x0 + tl.arange(0, X_BLOCK)
        m = valid[:, None] & (x[None, :] < W)
        acc += tl.sum(tl.load(sig_ptr + (u[:, None] * W + x[None, :]) * s_sn, mask=m, other=0), axis=1)
    return acc


@triton.jit
def _chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr):
    """The chunk of units u = u0 + arange(UNIT_BLOCK) (int64): (u, u < units, the distance of
    each valid unit's key from lo)."""
    u = u0 + tl.arange(0, UNIT_BLOCK).to(tl.int64)
    valid = u < units
    return u, valid, _relative(_unit_keys(sig, s_sn, u, valid, W, X_BLOCK), valid, lo)


@triton.jit
def _threshold(sig, s_sn, units, W, count,
               UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """The radix search of _select_units over units held in global memory (sig with element
    stride s_sn, keys from _unit_keys), looping over chunks: returns (lo, off, above) with lo the
    smallest key, off the count-th largest key's distance from lo, and above the number of units
    strictly beyond it. units == 0 gives no pass."""
    lo = tl.full([], INT64_MAX, tl.int64)
    hi = tl.full([], INT64_MIN, tl.int64)
    for u0 in range(0, units, UNIT_BLOCK):
        u = u0 + tl.arange(0, UNIT_BLOCK).to(tl.int64)
        valid = u < units
        key = _unit_keys(sig, s_sn, u, valid, W, X_BLOCK)
        lo = tl.minimum(lo, tl.min(tl.where(valid, key, INT64_MAX), axis=0))
        hi = tl.maximum(hi, tl.max(tl.where(valid, key, INT64_MIN), axis=0))
    lo = tl.where(units > 0, lo, 0)  # no keys: an empty range, not INT64_MIN - INT64_MAX
    hi = tl.where(units > 0, hi, 0)

    off = tl.full([], 0, tl.uint64)
    shift = tl.where(units > 0, _first_shift(lo, hi, RADIX_BITS), -1)
    while shift >= 0:
        hist = tl.zeros([1 << RADIX_BITS], tl.int32)
        for u0 in range(0, units, UNIT_BLOCK):
            _, valid, rel = _chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
            hist += _digit_hist(rel, valid, off, shift, RADIX_BITS)
        off, exact = _next_offset(off, hist, count, shift, RADIX_BITS)
        shift = tl.where(exact, -1, shift - RADIX_BITS)

    above = 0
    for u0 in range(0, units, UNIT_BLOCK):
        _, valid, rel = _chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
        above += tl.sum((valid & (rel > off)).to(tl.int32), axis=0)
    return lo, off, above


@triton.jit
def _select_kernel(sig_ptr, idx_ptr, s_sb, s_sn, units, W, count, keep,
                   UNIT_BLOCK: tl.constexpr, X_BLOCK: tl.constexpr, RADIX_BITS: tl.constexpr):
    """idx[b] for any N: the selection of _select_units, looping over chunks of units held in
    global memory (sig with any strides). Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    sig = sig_ptr + b * s_sb
    lo, off, above = _threshold(sig, s_sn, units, W, count, UNIT_BLOCK, X_BLOCK, RADIX_BITS)
    ties_before = 0
    kept_before = 0
    for u0 in range(0, units, UNIT_BLOCK):
        u, valid, rel = _chunk_rel(sig, s_sn, u0, units, W, lo, UNIT_BLOCK, X_BLOCK)
        slot, ties, kept = _slots(rel, valid, off, count - above, ties_before, kept_before)
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
    _gather_rows(tokens_ptr + b * s_tb, out_ptr + b * keep * D, k, tok, kmask, D, s_tn, s_td, BLOCK_D)


# ----------------------------------------------------------------------------------- launchers


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def _device_of(t: torch.Tensor):
    """Triton launches on the current device: make it the tensors' device (compiled graphs
    guard devices themselves)."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def _fused_warps(tile: int) -> int:
    """Warps of a fused program. Its selection is issue-bound: at LLaVA size (1024-token tile,
    one program per SM) 8 warps took 9.0 us and 4 warps 10.0 us on H200; 16 were slower."""
    return 4 if tile < 1024 else 8


def _units(n: int, strategy: str, cols: int) -> tuple[int, int]:
    """(units, W): rank selects single tokens, row selects whole grid rows of W = cols tokens."""
    return (n // cols, cols) if strategy == "row" else (n, 1)


def _rows_per_program(batch: int, keep: int, device: torch.device) -> int:
    """Output rows per gather program. On a GPU: at most one program per SM, since every program
    of the fused kernel recomputes the selection, an issue-bound job that slows down when two
    programs share an SM. Under the interpreter (CPU tensors) programs run one after another:
    few, large ones."""
    if not target.for_gpu(device):
        return min(_pow2(keep), 256)
    return min(_pow2(triton.cdiv(batch * keep, target.sm_count(device))), 64)


def _block_d(d: int, rows: int) -> int:
    return min(_pow2(d), max(16, _GATHER_TILE // rows))


def _map_config(batch: int, heads: int, n: int, device: torch.device) -> tuple[int, int, int]:
    """(query rows, keys, heads) per _map_sums_kernel program."""
    if not target.for_gpu(device):  # the interpreter runs programs one after another: few, large tiles
        return 64, min(1024, _pow2(n)), max(heads, 1)
    qblocks = triton.cdiv(n, _MAP_BLOCK_Q)
    # Group heads per program (fewer atomics) only while there are programs to spare.
    per_group = max(1, min(heads, batch * qblocks * heads // _MAP_PROGRAMS))
    return _MAP_BLOCK_Q, min(_MAP_BLOCK_K, _pow2(n)), per_group


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
    with _device_of(attn):
        if score == "cls":
            block = min(_pow2(n), 256)
            blocks = triton.cdiv(n, block)
            _cls_sig_kernel[(b * blocks,)](
                attn, sig, n, h, num_prefix, attn.stride(0), attn.stride(1), attn.stride(3),
                blocks, HEAD_BLOCK=min(_pow2(h), _HEAD_BLOCK), BLOCK=block,
            )
            return sig
        sums = _map_sums(attn, num_prefix, rows=score == "focal")
        if score == "received":
            return sums[0]
        return focal_significance(sums[0], sums[1])


def focal_significance(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """SPEC.md's focal choice per image: col, row (B, N) int64 with the same strides (any) ->
    sig (B, N) int64 contiguous, each row col[b] or row[b]. Launches on the current device."""
    assert col.stride() == row.stride(), "col and row must share their strides"
    b, n = col.shape
    sig = torch.empty(b, n, dtype=torch.int64, device=col.device)
    if b and n:
        _focal_sig_kernel[(b,)](col, row, sig, n, col.stride(0), col.stride(1), BLOCK=min(_pow2(n), 1024))
    return sig


def _launch_select(sig: torch.Tensor, idx: torch.Tensor, keep: int, strategy: str, cols: int) -> None:
    units, w = _units(sig.shape[1], strategy, cols)
    unit_block = min(_pow2(units), _SELECT_BLOCK)
    _select_kernel[(sig.shape[0],)](
        sig, idx, sig.stride(0), sig.stride(1), units, w, keep // w, keep,
        UNIT_BLOCK=unit_block, X_BLOCK=min(_pow2(w), max(1, _SELECT_TILE // unit_block)),
        RADIX_BITS=_RADIX_BITS,
    )


def select(sig: torch.Tensor, keep: int, strategy: str, rows: int, cols: int) -> torch.Tensor:
    """Kept token indices, SPEC.md: sig (B, N) int64 (any strides) -> idx (B, keep) int64,
    strictly increasing in each row."""
    idx = torch.empty(sig.shape[0], keep, dtype=torch.int64, device=sig.device)
    if sig.shape[0] and keep:
        with _device_of(sig):
            _launch_select(sig, idx, keep, strategy, cols)
    return idx


def _launch_prune(
    tokens: torch.Tensor, keep: int, strategy: str, cols: int, num_prefix: int,
    staged_sig: Callable[[], torch.Tensor],
    fused_inputs: Callable[[], tuple[str, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection + gather of tokens (B, N, D) -> pruned (B, keep, D), idx (B, keep) int64, on a
    significance the caller computes only for the path taken (prune_tokens here, prune_tokens_qk
    in significance_qk.py):

    - the token tile fits (at most _MAX_TILE): fused_inputs() -> (score, attn, col, row) feeds one
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
    units, w = _units(n, strategy, cols)
    per_prog = _rows_per_program(b, keep, tokens.device)
    chunks = triton.cdiv(keep, per_prog)
    block_d = _block_d(d, per_prog)
    unit_block, w_block = _pow2(units), _pow2(w)
    tile = unit_block * w_block
    with _device_of(tokens):
        if tile > _MAX_TILE:
            _launch_select(staged_sig(), idx, keep, strategy, cols)
            _gather_kernel[(b * chunks,)](
                tokens, idx, out, keep, d, *tokens.stride(), chunks,
                ROWS_PER_PROGRAM=per_prog, BLOCK_D=block_d,
            )
            return out, idx
        score, attn, col, row = fused_inputs()
        if attn is None:  # attn_ptr, H, P and the attn strides are read only on the cls path
            attn, h, p, attn_strides, head_block = col, 1, 0, (0, 0, 0), 1
        else:  # cls: col_ptr and row_ptr are not read
            col = row = attn
            h, p = attn.shape[1], num_prefix
            attn_strides = attn.stride(0), attn.stride(1), attn.stride(3)
            head_block = min(_pow2(h), _HEAD_BLOCK, max(1, _HEAD_TILE // tile))
        _prune_fused_kernel[(b * chunks,)](
            tokens, attn, col, row, out, idx,
            n, d, h, p, units, w, keep, chunks,
            *tokens.stride(), *attn_strides,
            SCORE=_SCORE_CODES[score], UNIT_BLOCK=unit_block, W_BLOCK=w_block,
            HEAD_BLOCK=head_block, ROWS_PER_PROGRAM=per_prog, BLOCK_D=block_d, RADIX_BITS=_RADIX_BITS,
            num_warps=_fused_warps(tile),
        )
    return out, idx


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

    return _launch_prune(tokens, keep, strategy, cols, num_prefix,
                         lambda: significance(attn, score, num_prefix), fused_inputs)
