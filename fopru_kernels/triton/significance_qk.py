"""Significance from the layer's q and k as Triton kernels (SPEC.md "Significance from q and k").

Launchers take inputs already validated by ``_checks.py`` (scale resolved to a float). q and k are
read in place through their strides ((B, S, H, d) inputs are viewed as (B, H, S, d), never copied).
Every value is formed in float32 (tensor-core dots accumulate in float32), becomes SPEC.md's int64
fixed point once per head, and heads are summed in int64, so atomics over heads are exact and the
result does not depend on the order in which programs land. Selection and gather are the exact
kernels of ``select.py``. The device code that forms the values (tiles of q . k, lse, p, the
closed-form logit means) is ``qk_tiles.py``'s, shared with the packed kernels of
``significance_qk_varlen.py``.

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
- Then ``focal`` picks col or row with ``exact.py``'s exact integer rule, in
  ``focal_significance`` or inside the fused selection + gather kernel.

Not measured on a GPU yet: the GPU block sizes (here and in qk_tiles.py) are first choices, not tuned values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import select as sel
from . import target
from .exact import focal_significance, fx
from .launch import device_of, pow2
from .qk_tiles import (
    LOG2E_HOST,
    check_head_dim,
    col_prob_sums,
    dot_block_d,
    dot_flags,
    load_rows,
    logit_fx,
    lse_rows,
    tile_config,
    token_sum,
)

# Elements of a (tokens x d) tile in _cls_kernel / _logit_means_kernel.
_VEC_TILE = 4096


# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _lse_kernel(q_ptr, k_ptr, lse_ptr, S, H, d, row0, rows, qk_scale,
                s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, mblocks,
                UPCAST: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """lse[b, h, i] = logsumexp_j(scale * q_i . k_j) over all S keys, for rows i in
    [row0, row0 + rows) (qk_tiles.lse_rows). lse is a contiguous (B, H, S) buffer.
    Grid (B * H * mblocks,)."""
    pid = tl.program_id(0)
    bh = pid // mblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    i = row0 + (pid % mblocks).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    imask = i < row0 + rows
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    qt = load_rows(q_ptr + b * s_qb + h * s_qh, i, imask, s_qs, dd, s_qd, dmask)
    lse = lse_rows(qt, k_ptr + b * s_kb + h * s_kh, 0, S, s_ks, s_kd, dd, dmask, qk_scale,
                   UPCAST, IEEE, BLOCK_M, BLOCK_N)
    tl.store(lse_ptr + (b * H + h) * S + i, lse, mask=imask)


@triton.jit
def _cls_kernel(q_ptr, k_ptr, lse_ptr, sig_ptr, N, H, P, d, scale,
                s_qb, s_qh, s_qd, s_kb, s_kh, s_ks, s_kd, s_lb, s_lh, jblocks,
                PROB: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr):
    """sig[b, j] = sum_h fx(v[b, h, 0, P + j]), v = scale * q_0 . k_j (or exp(v - lse[b, h, 0])
    for PROB); q_ptr / lse_ptr address row 0. Grid (B * jblocks,).

    Software-pipelined by hand, as fx_head_sum in exact.py: head h + 1's loads are issued
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
        acc += fx(v)
        qv, kt, norm = qv_next, kt_next, norm_next
    tl.store(sig_ptr + b * N + j, acc, mask=jmask)


@triton.jit
def _logit_means_kernel(q_ptr, k_ptr, col_ptr, row_ptr, N, H, P, d, mean_scale,
                        s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd,
                        ROWS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Logit means in closed form for one (image, head): col[b, j] += fx(scale * qbar . k_j) and
    (ROWS) row[b, i] += fx(scale * q_i . kbar), bars = means over the N patch tokens
    (qk_tiles.token_sum, logit_fx). Grid (B * H,); int64 atomics over heads."""
    pid = tl.program_id(0)
    b = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    queries = q_ptr + b * s_qb + h * s_qh
    keys = k_ptr + b * s_kb + h * s_kh
    qbar = token_sum(queries, P, N, s_qs, dd, s_qd, dmask, BLOCK_S) * mean_scale  # mean_scale = scale / N
    if ROWS:
        kbar = token_sum(keys, P, N, s_ks, dd, s_kd, dmask, BLOCK_S) * mean_scale
    for s0 in range(0, N, BLOCK_S):
        t = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        tmask = t < N
        tl.atomic_add(col_ptr + b * N + t, logit_fx(keys, P + t, tmask, s_ks, dd, s_kd, dmask, qbar),
                      mask=tmask, sem="relaxed")
        if ROWS:
            tl.atomic_add(row_ptr + b * N + t, logit_fx(queries, P + t, tmask, s_qs, dd, s_qd, dmask, kbar),
                          mask=tmask, sem="relaxed")


@triton.jit
def _prob_means_kernel(q_ptr, k_ptr, lse_ptr, col_ptr, part_ptr, N, H, P, d, qk_scale,
                       s_qb, s_qh, s_qs, s_qd, s_kb, s_kh, s_ks, s_kd, s_lb, s_lh, s_ls, jblocks,
                       ROWS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Probability means over the patch block of one (image, head, key block):
    col[b, j] += fx((1/N) sum_i p[P+i, P+j]) and (ROWS) part[b, h, jb, i] = sum_{j in block}
    p[P+i, P+j], with p = exp2(qk_scale * q_i . k_j - log2(e) * lse_i) (qk_tiles.col_prob_sums).
    Grid (B * H * jblocks,)."""
    pid = tl.program_id(0)
    bh = pid // jblocks
    jb = pid % jblocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    j = jb.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    jmask = j < N
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    kt = load_rows(k_ptr + b * s_kb + h * s_kh, P + j, jmask, s_ks, dd, s_kd, dmask)
    part = part_ptr + (bh.to(tl.int64) * jblocks + jb) * N
    sums = col_prob_sums(kt, jmask, q_ptr + b * s_qb + h * s_qh, lse_ptr + b * s_lb + h * s_lh, P, N,
                         s_qs, s_qd, s_ls, part, dd, dmask, qk_scale, ROWS, UPCAST, IEEE, BLOCK_M, BLOCK_N)
    tl.atomic_add(col_ptr + b * N + j, fx(sums / N), mask=jmask, sem="relaxed")


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
        acc += fx(total / N)
    tl.store(row_ptr + b * N + i, acc, mask=imask)


# ----------------------------------------------------------------------------------- launchers


def _bhsd(t: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, S, d) view: FlashAttention's (B, S, H, d) is read through its strides, not copied."""
    return t if layout == "bhsd" else t.transpose(1, 2)


def _vec_block(n: int, block_d: int, device: torch.device) -> int:
    """Tokens per program of the elementwise (tokens x d) kernels."""
    if not target.for_gpu(device):
        return max(1, min(pow2(n), 1024))
    return max(16, min(pow2(n), _VEC_TILE // block_d))


def _cls_block(batch: int, n: int, block_d: int, device: torch.device) -> int:
    """Tokens per _cls_kernel program: on a GPU, small enough for about two programs per SM (its
    head loop is latency-bound, so a small batch needs the spread), at most the tile cap."""
    block = _vec_block(n, block_d, device)
    if not target.for_gpu(device):
        return block
    return min(block, max(16, pow2(triton.cdiv(batch * n, 2 * target.sm_count(device)))))


def _lse(q: torch.Tensor, k: torch.Tensor, scale: float, row0: int, rows: int) -> torch.Tensor:
    """(B, H, S) float32 with lse of rows [row0, row0 + rows) filled (q, k: (B, H, S, d) views)."""
    b, h, s, d = q.shape
    lse = torch.empty(b, h, s, dtype=torch.float32, device=q.device)
    block_m, block_n, warps = tile_config(q.device)
    block_m = max(16, min(block_m, pow2(rows)))  # tl.dot needs 16 rows; a CLS row is one
    block_n = max(16, min(block_n, pow2(s)))
    mblocks = triton.cdiv(rows, block_m)
    upcast, ieee = dot_flags(q)
    _lse_kernel[(b * h * mblocks,)](
        q, k, lse, s, h, d, row0, rows, scale * LOG2E_HOST, *q.stride(), *k.stride(), mblocks,
        UPCAST=upcast, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=dot_block_d(d),
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
    block_d = pow2(d)
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
        block_d = pow2(d)
        _logit_means_kernel[(b * h,)](
            q, k, sums[0], sums[-1], n, h, num_prefix, d, scale / n, *q.stride(), *k.stride(),
            ROWS=rows, BLOCK_S=_vec_block(n, block_d, q.device), BLOCK_D=block_d,
        )
        return sums
    if lse is None:
        lse = _lse(q, k, scale, num_prefix, n)
    block_m, block_n, warps = tile_config(q.device)
    block_m = max(16, min(block_m, pow2(n)))
    block_n = max(16, min(block_n, pow2(n)))
    jblocks = triton.cdiv(n, block_n)
    # Partial row sums, one per key block; unused (a 1-element stand-in) without rows.
    part = torch.empty(b * h * jblocks * n if rows else 1, dtype=torch.float32, device=q.device)
    upcast, ieee = dot_flags(q)
    _prob_means_kernel[(b * h * jblocks,)](
        q, k, lse, sums[0], part, n, h, num_prefix, d, scale * LOG2E_HOST,
        *q.stride(), *k.stride(), *lse.stride(), jblocks,
        ROWS=rows, UPCAST=upcast, IEEE=ieee, BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=dot_block_d(d), num_warps=warps,
    )
    if rows:
        block = min(pow2(n), 1024)
        iblocks = triton.cdiv(n, block)
        _row_means_kernel[(b * iblocks,)](part, sums[1], n, h, jblocks, iblocks, BLOCK=block)
    return sums


def significance_qk(
    q: torch.Tensor, k: torch.Tensor, score: str, num_prefix: int, scale: float,
    lse: torch.Tensor | None, kind: str, layout: str,
) -> torch.Tensor:
    """Token significance from q and k (SPEC.md): q, k (B, H, S, d) ("bhsd") or (B, S, H, d)
    ("bshd"), lse (B, H, S) float32 or None -> sig (B, N = S - num_prefix) int64."""
    check_head_dim(q.shape[-1])
    q, k = _bhsd(q, layout), _bhsd(k, layout)
    b, _, s, _ = q.shape
    n = s - num_prefix
    if b == 0:
        return torch.empty(0, n, dtype=torch.int64, device=q.device)
    with device_of(q):
        if score == "cls":
            return _cls_sig(q, k, num_prefix, scale, lse, kind)
        sums = _patch_means(q, k, num_prefix, scale, lse, kind, rows=score == "focal")
        if score == "received":
            return sums[0]
        return focal_significance(sums[0], sums[1])


def significance_qk_parts(
    q: torch.Tensor, k: torch.Tensor, score: str, num_prefix: int, scale: float,
    lse: torch.Tensor | None, kind: str, layout: str,
) -> torch.Tensor:
    """The sums significance_qk chooses from (SPEC.md): (B, C, N) int64 contiguous, C = 2 for
    focal ([:, 0] column sums, [:, 1] row sums), else 1 (cls values or column sums)."""
    check_head_dim(q.shape[-1])
    q, k = _bhsd(q, layout), _bhsd(k, layout)
    b, _, s, _ = q.shape
    n = s - num_prefix
    c = 2 if score == "focal" else 1
    if b == 0:
        return torch.empty(0, c, n, dtype=torch.int64, device=q.device)
    with device_of(q):
        if score == "cls":
            return _cls_sig(q, k, num_prefix, scale, lse, kind)[:, None]
        # (C, B, N) -> (B, C, N): one copy of B x C x N int64, next to the O(B H S d) kernels.
        return _patch_means(q, k, num_prefix, scale, lse, kind, rows=c == 2).transpose(0, 1).contiguous()


def significance_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """parts (B, C, N) int64 (any strides) -> sig (B, N) int64 contiguous: parts[:, 0] for C = 1,
    the focal choice between parts[:, 0] and parts[:, 1] for C = 2."""
    if parts.shape[1] == 1:
        return parts[:, 0].clone(memory_format=torch.contiguous_format)
    with device_of(parts):
        return focal_significance(parts[:, 0], parts[:, 1])


def prune_tokens_qk(
    tokens: torch.Tensor, q: torch.Tensor, k: torch.Tensor, keep: int, strategy: str, score: str,
    num_prefix: int, rows: int, cols: int, scale: float, lse: torch.Tensor | None, kind: str,
    layout: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D), q / k as in significance_qk -> pruned (B, keep, D), idx (B, keep) int64.

    The significance kernels above, then select.py's selection + gather: one fused launch
    (which also makes the focal choice) while the token tile fits, else the staged kernels."""
    check_head_dim(q.shape[-1])

    def fused_inputs():
        qv, kv = _bhsd(q, layout), _bhsd(k, layout)
        if score == "cls":  # the fused kernel's "received" path selects on col as given
            sig = _cls_sig(qv, kv, num_prefix, scale, lse, kind)
            return "received", None, sig, sig
        sums = _patch_means(qv, kv, num_prefix, scale, lse, kind, rows=score == "focal")
        return score, None, sums[0], sums[-1]

    return sel.select_gather(tokens, keep, strategy, cols, num_prefix,
                             lambda: significance_qk(q, k, score, num_prefix, scale, lse, kind, layout),
                             fused_inputs)
