"""Significance from the layer's q and k as Triton kernels (SPEC.md "Significance from q and k").

Launchers take inputs already validated by ``_checks.py`` (scale resolved to a float). q and k are
read in place through their strides ((B, S, H, d) inputs are viewed as (B, H, S, d), never copied).
Every value is formed in float32 (tensor-core dots accumulate in float32), becomes SPEC.md's int64
fixed point once per head, and heads are summed in int64, so atomics over heads are exact and the
result does not depend on the order in which programs land. Selection and gather are the exact
kernels of ``prune_tokens.py``.

Launches per call (lse: natural-log logsumexp over all S keys; "given" means passed by the caller):
- ``cls``: ``_cls_kernel`` (one program per image and key block, heads summed in registers); for
  ``prob`` without lse, ``_lse_kernel`` on row 0 first.
- ``received`` / ``focal``, ``logit``: closed forms ``colmean_j = scale * qbar . k_j`` and
  ``rowmean_i = scale * q_i . kbar``: a zeroed int64 buffer, then ``_logit_means_kernel`` (one
  program per (image, head)); O(B H S d), no S x S work.
- ``received`` / ``focal``, ``prob``: ``_lse_kernel`` over the patch queries unless lse is given, a
  zeroed int64 buffer, then ``_prob_means_kernel``, FlashAttention-backward-like: one program per
  (image, head, block of key columns) holds its keys and loops over query blocks, p = exp(l - lse)
  from ``tl.dot`` in float32, column sums in registers, one fx and one int64 atomic per column.
  ``focal`` row means are direct sums over the patch keys, not ``(1 - sum_{j<P} p_ij) / N``: that
  closed form is only as good as the caller's lse, while the direct sum is SPEC.md's formula for
  any lse. Each program stores its partial row sums (float32, its key block only) and
  ``_row_means_kernel`` adds them in key-block order, so the result is deterministic.
- Then ``focal`` picks col or row with ``prune_tokens.py``'s exact integer rule, in
  ``focal_significance`` or inside the fused selection + gather kernel.

Not measured on a GPU yet: the GPU block sizes below are first choices, not tuned values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import prune_tokens as tk
from . import target
from .prune_tokens import _device_of, _fx, _pow2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
_LOG2E = 1.4426950408889634

# _prob_means_kernel / _lse_kernel tiles on a GPU: BLOCK_M query rows x BLOCK_N keys.
_GPU_BLOCK_M = 64
_GPU_BLOCK_N = 64
# Interpreter (CPU tensors): programs run one after another, so few, large tiles.
_CPU_BLOCK = 128
# Elements of a (tokens x d) tile in _cls_kernel / _logit_means_kernel.
_VEC_TILE = 4096


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _dot_logits(qt, kt, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """qt (M, D) . kt (N, D)^T -> (M, N) float32. IEEE keeps float32 inputs out of tf32 (whose
    10-bit mantissa would dwarf the error bound SPEC.md's tests allow); UPCAST works around the
    interpreter's bfloat16 tl.dot, which multiplies the raw uint16 bits."""
    if UPCAST:
        qt = qt.to(tl.float32)
        kt = kt.to(tl.float32)
    if IEEE:
        return tl.dot(qt, tl.trans(kt), input_precision="ieee")
    return tl.dot(qt, tl.trans(kt))


@triton.jit
def _lse_kernel(q_ptr, k_ptr, lse_ptr, S, H, d, row0, rows, qk_scale,
                s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, mblocks,
                UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """lse[b, h, i] = logsumexp_j(scale * q_i . k_j) over all S keys, for rows i in
    [row0, row0 + rows); online max and sum in base 2 (qk_scale = scale * log2 e), as in
    FlashAttention's forward pass. lse is a contiguous (B, H, S) buffer. Grid (B * H * mblocks,)."""
    pid = tl.program_id(0)
    bh = pid // mblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i = row0 + (pid % mblocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < row0 + rows
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    qt = tl.load(q_ptr + b * s_qb + h * s_qh + i[:, None] * s_qs + dd[None, :] * s_qd,
                 mask=imask[:, None] & dmask[None, :], other=0.0)
    keys = k_ptr + b * s_kb + h * s_kh
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    # Every key block holds a valid key, so m is finite after the first one and no -inf - -inf
    # reaches exp2.
    for j0 in range(0, S, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        jmask = j < S
        kt = tl.load(keys + j[:, None] * s_ks + dd[None, :] * s_kd, mask=jmask[:, None] & dmask[None, :], other=0.0)
        l2 = tl.where(jmask[None, :], _dot_logits(qt, kt, UPCAST, IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(l2, axis=1))
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(l2 - m_new[:, None]), axis=1)
        m = m_new
    tl.store(lse_ptr + (b * H + h) * S + i, (m + tl.log2(total)) * LN2, mask=imask)


@triton.jit
def _cls_kernel(q_ptr, k_ptr, lse_ptr, sig_ptr, N, H, P, d, scale,
                s_qb, s_qh, s_qd, s_kb, s_kh, s_ks, s_kd, s_lb, s_lh, jblocks,
                PROB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """sig[b, j] = sum_h fx(v[b, h, 0, P + j]), v = scale * q_0 . k_j (or exp(v - lse[b, h, 0])
    for PROB); q_ptr / lse_ptr address row 0. Grid (B * jblocks,).

    Software-pipelined by hand, as _fx_head_sum in prune_tokens.py: head h + 1's loads are issued
    before head h's dot products, so the head loop is not one memory round trip per head."""
    pid = tl.program_id(0)
    b = (pid // jblocks).to(tl.int64)
    j = (pid % jblocks).to(tl.int64) * BLOCK_J + tl.arange(0, BLOCK_J)
    jmask = j < N
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    q0 = q_ptr + b * s_qb + dd * s_qd
    keys = k_ptr + b * s_kb + (P + j)[:, None] * s_ks + dd[None, :] * s_kd
    kmask = jmask[:, None] & dmask[None, :]
    lse0 = lse_ptr + b * s_lb
    qv = tl.load(q0, mask=dmask, other=0.0)
    kt = tl.load(keys, mask=kmask, other=0.0)
    norm = tl.load(lse0) if PROB else tl.zeros([], tl.float32)
    acc = tl.zeros([BLOCK_J], tl.int64)
    for h in range(1, H + 1):
        more = h < H
        h64 = tl.cast(h, tl.int64)
        qv_next = tl.load(q0 + h64 * s_qh, mask=dmask & more, other=0.0)
        kt_next = tl.load(keys + h64 * s_kh, mask=kmask & more, other=0.0)
        norm_next = tl.load(lse0 + h64 * s_lh, mask=more, other=0.0) if PROB else norm
        v = tl.sum(kt.to(tl.float32) * (qv.to(tl.float32) * scale)[None, :], axis=1)
        if PROB:
            v = tl.exp(v - norm)
        acc += _fx(v)
        qv, kt, norm = qv_next, kt_next, norm_next
    tl.store(sig_ptr + b * N + j, acc, mask=jmask)


@triton.jit
def _logit_means_kernel(q_ptr, k_ptr, col_ptr, row_ptr, N, H, P, d, mean_scale,
                        s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
                        ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logit means in closed form for one (image, head): col[b, j] += fx(scale * qbar . k_j) and
    (ROWS) row[b, i] += fx(scale * q_i . kbar), bars = means over the N patch tokens.
    Grid (B * H,); int64 atomics over heads."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    queries = q_ptr + b * s_qb + h * s_qh + dd[None, :] * s_qd
    keys = k_ptr + b * s_kb + h * s_kh + dd[None, :] * s_kd
    qsum = tl.zeros([BLOCK_D], tl.float32)
    ksum = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, N, BLOCK_S):
        t = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        m = (t < N)[:, None] & dmask[None, :]
        qsum += tl.sum(tl.load(queries + (P + t)[:, None] * s_qs, mask=m, other=0.0).to(tl.float32), axis=0)
        if ROWS:
            ksum += tl.sum(tl.load(keys + (P + t)[:, None] * s_ks, mask=m, other=0.0).to(tl.float32), axis=0)
    qbar = qsum * mean_scale  # mean_scale = scale / N
    kbar = ksum * mean_scale
    for s0 in range(0, N, BLOCK_S):
        t = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        tmask = t < N
        m = tmask[:, None] & dmask[None, :]
        kt = tl.load(keys + (P + t)[:, None] * s_ks, mask=m, other=0.0).to(tl.float32)
        tl.atomic_add(col_ptr + b * N + t, _fx(tl.sum(kt * qbar[None, :], axis=1)), mask=tmask, sem="relaxed")
        if ROWS:
            qt = tl.load(queries + (P + t)[:, None] * s_qs, mask=m, other=0.0).to(tl.float32)
            tl.atomic_add(row_ptr + b * N + t, _fx(tl.sum(qt * kbar[None, :], axis=1)), mask=tmask, sem="relaxed")


@triton.jit
def _prob_means_kernel(q_ptr, k_ptr, lse_ptr, col_ptr, part_ptr, N, H, P, d, qk_scale,
                       s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_lb, s_lh, s_ls, jblocks,
                       ROWS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Probability means over the patch block of one (image, head, key block):
    col[b, j] += fx((1/N) sum_i p[P+i, P+j]) and (ROWS) part[b, h, jb, i] = sum_{j in block}
    p[P+i, P+j], with p = exp2(qk_scale * q_i . k_j - log2(e) * lse_i). Grid (B * H * jblocks,)."""
    pid = tl.program_id(0)
    bh = pid // jblocks
    jb = pid % jblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    j = jb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < N
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    kt = tl.load(k_ptr + b * s_kb + h * s_kh + (P + j)[:, None] * s_ks + dd[None, :] * s_kd,
                 mask=jmask[:, None] & dmask[None, :], other=0.0)
    queries = q_ptr + b * s_qb + h * s_qh + dd[None, :] * s_qd
    norms = lse_ptr + b * s_lb + h * s_lh
    part = part_ptr + (bh.to(tl.int64) * jblocks + jb) * N
    # Column sums accumulate elementwise and are reduced once at the end: a reduction across
    # the tile's rows crosses warps, too costly per query block.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i0 in range(0, N, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        imask = i < N
        qt = tl.load(queries + (P + i)[:, None] * s_qs, mask=imask[:, None] & dmask[None, :], other=0.0)
        norm2 = tl.load(norms + (P + i) * s_ls, mask=imask, other=0.0) * LOG2E
        p = tl.exp2(_dot_logits(qt, kt, UPCAST, IEEE) * qk_scale - norm2[:, None])
        p = tl.where(imask[:, None] & jmask[None, :], p, 0.0)
        acc += p
        if ROWS:
            tl.store(part + i, tl.sum(p, axis=1), mask=imask)
    tl.atomic_add(col_ptr + b * N + j, _fx(tl.sum(acc, axis=0) / N), mask=jmask, sem="relaxed")


@triton.jit
def _row_means_kernel(part_ptr, row_ptr, N, H, jblocks, iblocks, BLOCK: tl.constexpr):
    """row[b, i] = sum_h fx((1/N) sum_jb part[b, h, jb, i]), key blocks added in order (so the
    float sum is deterministic). Grid (B * iblocks,)."""
    pid = tl.program_id(0)
    b = (pid // iblocks).to(tl.int64)
    i = (pid % iblocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    imask = i < N
    acc = tl.zeros([BLOCK], tl.int64)
    for h in range(H):
        part = part_ptr + (b * H + h) * jblocks * N + i
        total = tl.zeros([BLOCK], tl.float32)
        for jb in range(jblocks):
            total += tl.load(part + jb * N, mask=imask, other=0.0)
        acc += _fx(total / N)
    tl.store(row_ptr + b * N + i, acc, mask=imask)


# ----------------------------------------------------------------------------------- launchers


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, S, d) view: FlashAttention's (B, S, H, d) is read through its strides, not copied."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def _tile_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, warps) of the tl.dot kernels."""
    if not target.for_gpu(device):
        return _CPU_BLOCK, _CPU_BLOCK, 4
    return _GPU_BLOCK_M, _GPU_BLOCK_N, 4


def _dot_flags(q: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE) of _dot_logits for q's dtype and device."""
    upcast = q.dtype == torch.bfloat16 and not target.for_gpu(q.device)
    return upcast, upcast or q.dtype == torch.float32


def _vec_block(n: int, block_d: int, device: torch.device) -> int:
    """Tokens per program of the elementwise (tokens x d) kernels."""
    if not target.for_gpu(device):
        return max(1, min(_pow2(n), 1024))
    return max(16, min(_pow2(n), _VEC_TILE // block_d))


def _cls_block(batch: int, n: int, block_d: int, device: torch.device) -> int:
    """Tokens per _cls_kernel program: on a GPU, small enough for about two programs per SM (its
    head loop is latency-bound, so a small batch needs the spread), at most the tile cap."""
    block = _vec_block(n, block_d, device)
    if not target.for_gpu(device):
        return block
    return min(block, max(16, _pow2(triton.cdiv(batch * n, 2 * target.sm_count(device)))))


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float, row0: int, rows: int) -> torch.Tensor:
    """(B, H, S) float32 with lse of rows [row0, row0 + rows) filled (q, k: (B, H, S, d) views)."""
    b, h, s, d = q.shape
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    block_m, block_n, warps = _tile_config(q.device)
    block_m = max(16, min(block_m, _pow2(rows)))  # tl.dot needs 16 rows; a CLS row is one
    block_n = max(16, min(block_n, _pow2(s)))
    mblocks = triton.cdiv(rows, block_m)
    upcast, ieee = _dot_flags(q)
    _lse_kernel[(b * h * mblocks,)](
        q, k, lse, s, h, d, row0, rows, scale * _LOG2E, *q.stride(), *k.stride(), mblocks,
        UPCAST=upcast, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, _pow2(d)),
        num_warps=warps,
    )
    return lse


def _cls_sig(q, k, num_prefix, scale, lse, kind) -> torch.Tensor:
    b, h, s, d = q.shape
    n = s - num_prefix
    prob = kind == "prob"
    if prob and lse is None:
        lse = _lse(q, k, scale, 0, 1)
    sig = torch.empty(b, n, dtype=torch.int64, device=q.device)
    block_d = _pow2(d)
    block = _cls_block(b, n, block_d, q.device)
    jblocks = triton.cdiv(n, block)
    norms = lse if prob else sig  # unused without PROB
    _cls_kernel[(b * jblocks,)](
        q, k, norms, sig, n, h, num_prefix, d, scale,
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), norms.stride(0), norms.stride(1), jblocks,
        PROB=prob, BLOCK_J=block, BLOCK_D=block_d,
    )
    return sig


def _patch_means(q, k, num_prefix, scale, lse, kind, rows: bool) -> torch.Tensor:
    """(2 if rows else 1, B, N) int64: [0] = sum_h fx(column means), [1] = sum_h fx(row means)."""
    b, h, s, d = q.shape
    n = s - num_prefix
    sums = torch.zeros(2 if rows else 1, b, n, dtype=torch.int64, device=q.device)
    if kind == "logit":
        block_d = _pow2(d)
        _logit_means_kernel[(b * h,)](
            q, k, sums[0], sums[-1], n, h, num_prefix, d, scale / n, *q.stride(), *k.stride(),
            ROWS=rows, BLOCK_S=_vec_block(n, block_d, q.device), BLOCK_D=block_d,
        )
        return sums
    if lse is None:
        lse = _lse(q, k, scale, num_prefix, n)
    block_m, block_n, warps = _tile_config(q.device)
    block_m = max(16, min(block_m, _pow2(n)))
    block_n = max(16, min(block_n, _pow2(n)))
    jblocks = triton.cdiv(n, block_n)
    # Partial row sums, one per key block; unused (a 1-element stand-in) without rows.
    part = torch.empty(b * h * jblocks * n if rows else 1, dtype=torch.float32, device=q.device)
    upcast, ieee = _dot_flags(q)
    _prob_means_kernel[(b * h * jblocks,)](
        q, k, lse, sums[0], part, n, h, num_prefix, d, scale * _LOG2E,
        *q.stride(), *k.stride(), *lse.stride(), jblocks,
        ROWS=rows, UPCAST=upcast, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=max(16, _pow2(d)), num_warps=warps,
    )
    if rows:
        block = min(_pow2(n), 1024)
        iblocks = triton.cdiv(n, block)
        _row_means_kernel[(b * iblocks,)](part, sums[1], n, h, jblocks, iblocks, BLOCK=block)
    return sums


def significance_qk(
    q: torch.Tensor, k: torch.Tensor, score: str, num_prefix: int, scale: float,
    lse: torch.Tensor | None, kind: str, layout: str,
) -> torch.Tensor:
    """Token significance from q and k (SPEC.md): q, k (B, H, S, d) ("bhsd") or (B, S, H, d)
    ("bshd"), lse (B, H, S) float32 or None -> sig (B, N = S - num_prefix) int64."""
    q, k = _bhsd(q, layout), _bhsd(k, layout)
    b, _, s, _ = q.shape
    n = s - num_prefix
    if b == 0:
        return torch.empty(0, n, dtype=torch.int64, device=q.device)
    with _device_of(q):
        if score == "cls":
            return _cls_sig(q, k, num_prefix, scale, lse, kind)
        sums = _patch_means(q, k, num_prefix, scale, lse, kind, rows=score == "focal")
        if score == "received":
            return sums[0]
        return tk.focal_significance(sums[0], sums[1])


def significance_qk_parts(
    q: torch.Tensor, k: torch.Tensor, score: str, num_prefix: int, scale: float,
    lse: torch.Tensor | None, kind: str, layout: str,
) -> torch.Tensor:
    """The sums significance_qk chooses from (SPEC.md): (B, C, N) int64 contiguous, C = 2 for
    focal ([:, 0] column sums, [:, 1] row sums), else 1 (cls values or column sums)."""
    q, k = _bhsd(q, layout), _bhsd(k, layout)
    b, _, s, _ = q.shape
    n = s - num_prefix
    c = 2 if score == "focal" else 1
    if b == 0:
        return torch.empty(0, c, n, dtype=torch.int64, device=q.device)
    with _device_of(q):
        if score == "cls":
            return _cls_sig(q, k, num_prefix, scale, lse, kind)[:, None]
        # (C, B, N) -> (B, C, N): one copy of B x C x N int64, next to the O(B H S d) kernels.
        return _patch_means(q, k, num_prefix, scale, lse, kind, rows=c == 2).transpose(0, 1).contiguous()


def significance_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """parts (B, C, N) int64 (any strides) -> sig (B, N) int64 contiguous: parts[:, 0] for C = 1,
    the focal choice between parts[:, 0] and parts[:, 1] for C = 2."""
    if parts.shape[1] == 1:
        return parts[:, 0].clone(memory_format=torch.contiguous_format)
    with _device_of(parts):
        return tk.focal_significance(parts[:, 0], parts[:, 1])


def prune_tokens_qk(
    tokens: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: int, strategy: str, score: str,
    num_prefix: int, rows: int, cols: int, scale: float, lse: torch.Tensor | None, kind: str,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D), q / k as in significance_qk -> pruned (B, keep, D), idx (B, keep) int64.

    The significance kernels above, then prune_tokens.py's selection + gather: one fused launch
    (which also makes the focal choice) while the token tile fits, else the staged kernels."""

    def fused_inputs():
        qv, kv = _bhsd(q, layout), _bhsd(k, layout)
        if score == "cls":  # the fused kernel's "received" path selects on col as given
            sig = _cls_sig(qv, kv, num_prefix, scale, lse, kind)
            return "received", None, sig, sig
        sums = _patch_means(qv, kv, num_prefix, scale, lse, kind, rows=score == "focal")
        return score, None, sums[0], sums[-1]

    return tk._launch_prune(tokens, keep, strategy, cols, num_prefix,
                            lambda: significance_qk(q, k, score, num_prefix, scale, lse, kind, layout),
                            fused_inputs)
