"""SPEC.md's exact integer arithmetic as Triton device code, shared by every Triton kernel:
``fx`` (the fixed point of one attention value, "Fixed-point values") and the focal choice in
exact integers ("The focal choice"): ``focal_sums`` / ``focal_add`` accumulate a vector's sums in
32-bit limbs, ``focal_use_col`` compares two vectors' variances, and ``focal_significance`` applies
the choice per image; ``focal_prefers_col`` decides for one image or one packed segment in global
memory, chunk by chunk (the packed q/k kernels of ``significance_qk_varlen.py`` use it per segment).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pow2

FX_SCALE = tl.constexpr(268435456.0)  # 2^28: exact, so float32 and float64 give the same bits
FX_CLAMP = tl.constexpr(256.0)


@triton.jit
def fx(a):
    """SPEC.md fixed point: trunc(clamp(nan->0(a), -256, 256) * 2^28) as int64."""
    if a.dtype == tl.float64:
        x = a
    else:
        x = a.to(tl.float32)
    x = tl.where(x != x, 0.0, x)
    x = tl.where(x < -FX_CLAMP, -FX_CLAMP, tl.where(x > FX_CLAMP, FX_CLAMP, x))
    return (x * FX_SCALE).to(tl.int64)  # the scaling is exact; the cast truncates toward zero


@triton.jit
def fx_head_sum(ptrs, mask, heads, H, s_ah, HEAD_BLOCK: tl.constexpr):
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
        acc += tl.sum(fx(a), axis=0)
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
def focal_sums(x, valid):
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
def focal_add(s, t):
    """s + t for two focal_sums tuples, carried so every limb but the top one stays below 2^32:
    a loop over chunks can add any number of them."""
    s0, s1 = _carry(s[0] + t[0], s[1] + t[1])
    s1, s2 = _carry(s1, s[2] + t[2])
    s2, s3 = _carry(s2, s[3] + t[3])
    lo, hi = _carry(s[5] + t[5], s[4] + t[4])
    return s0, s1, s2, s3, hi, lo


@triton.jit
def _focal_side(a, b, n):
    """n * sum(a^2) + sum(b)^2 from the focal_sums tuples a and b: seven 32-bit limbs (a tuple),
    each below 2^32. n < 2^31."""
    a0, a1 = _carry(a[0], a[1])  # sum(a^2) in five limbs below 2^32
    a1, a2 = _carry(a1, a[2])
    a2, a3 = _carry(a2, a[3])
    a3, a4 = _carry(a3, 0)
    n = tl.zeros([], tl.int64) + n  # n may be a Python int: Triton specialises an int argument equal to 1
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
def focal_use_col(col, row, n):
    """SPEC.md's focal rule from the focal_sums of the column and the row sums (n entries each):
    True for the column sums, False (ties too) for the row sums."""
    x = _focal_side(col, row, n)  # n sum(col^2) + sum(row)^2
    y = _focal_side(row, col, n)  # n sum(row^2) + sum(col)^2
    gt = x[0] > y[0]
    for k in tl.static_range(1, 7):  # the highest differing limb decides
        gt = tl.where(x[k] == y[k], gt, x[k] > y[k])
    return gt


@triton.jit
def focal_prefers_col(col, row, n, s_n, BLOCK: tl.constexpr):
    """SPEC.md's focal rule for the n entries at col and at row (int64, element stride s_n), chunk
    by chunk (focal_sums, focal_add, focal_use_col): True for the column sums, False (ties too) for
    the row sums. One image of the dense ops or one segment of the packed ones."""
    zero = tl.zeros([], tl.int64)
    cs = (zero, zero, zero, zero, zero, zero)
    rs = (zero, zero, zero, zero, zero, zero)
    for j0 in range(0, n, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        m = j < n
        cs = focal_add(cs, focal_sums(tl.load(col + j * s_n, mask=m, other=0), m))
        rs = focal_add(rs, focal_sums(tl.load(row + j * s_n, mask=m, other=0), m))
    return focal_use_col(cs, rs, n)


@triton.jit
def _focal_sig_kernel(col_ptr, row_ptr, sig_ptr, N, s_b, s_n, BLOCK: tl.constexpr):
    """sig[b] = col[b] or row[b] by SPEC.md's focal rule; col / row element (b, j) at
    b * s_b + j * s_n, sig contiguous (B, N). Grid (B,)."""
    b = tl.program_id(0).to(tl.int64)
    col = col_ptr + b * s_b
    row = row_ptr + b * s_b
    src = row
    if focal_prefers_col(col, row, N, s_n, BLOCK):
        src = col
    for j0 in range(0, N, BLOCK):
        j = j0 + tl.arange(0, BLOCK).to(tl.int64)
        m = j < N
        tl.store(sig_ptr + b * N + j, tl.load(src + j * s_n, mask=m), mask=m)


def focal_significance(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """SPEC.md's focal choice per image: col, row (B, N) int64 with the same strides (any) ->
    sig (B, N) int64 contiguous, each row col[b] or row[b]. Launches on the current device."""
    assert col.stride() == row.stride(), "col and row must share their strides"
    b, n = col.shape
    sig = torch.empty(b, n, dtype=torch.int64, device=col.device)
    if b and n:
        _focal_sig_kernel[(b,)](col, row, sig, n, col.stride(0), col.stride(1), BLOCK=min(pow2(n), 1024))
    return sig
