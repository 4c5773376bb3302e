"""q/k tiles as Triton device code, shared by the dense q/k kernels (``significance_qk.py``) and the
packed ones (``significance_qk_varlen.py``), plus the launch settings both take.

Every helper works on one head's run of ``n`` consecutive tokens: a pointer to that head's token 0
and the row index of the run's first token (``row0``), with rows ``s_r`` elements apart. A dense
image's patch tokens are the run at ``row0 = num_prefix``; a packed segment is the run at
``row0 = cu_seqlens[s]``. So the dense and the packed kernels form every value the same way (float32
``tl.dot`` with the same flags, exp2 with the same scaling, block sums added in block order), and
SPEC.md's float error bound of "Significance from q and k" holds for both.

- ``dot_logits``: a (queries x keys) tile of q . k in float32.
- ``lse_rows``: natural-log logsumexp of a query tile over a run of keys (online, base 2).
- ``prob_tile``: p = exp(l - lse) of a tile; ``col_prob_sums`` / ``row_prob_sums``: its column sums
  over a run of queries (one key tile held) and its row sums over a run of keys (one query tile held).
- ``token_sum``: the sum of a run's rows (the closed-form logit means' q-bar and k-bar);
  ``logit_fx``: fx of the closed-form logit means of a block of rows.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import target
from .exact import fx

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LOG2E_HOST = 1.4426950408889634  # qk_scale = scale * log2(e), formed on the host

# The tl.dot kernels' tiles on a GPU: BLOCK_M query rows x BLOCK_N keys.
GPU_BLOCK_M = 64
GPU_BLOCK_N = 64
# Interpreter (CPU tensors): programs run one after another, so few, large tiles.
CPU_BLOCK = 128
# SPEC.md "Backend limits": the largest head dim d these kernels take. Their tiles hold whole rows
# of d (padded to a power of two), so d sets their shared memory and registers; 256 is the largest
# d that scripts/triton_compile_check.py compiles and checks against an sm_80 / sm_90 block's
# limits (the DOMAINS of scripts/triton_compile_grid.py derive from this value). ViT heads are 64
# to 128.
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------- device code


@triton.jit
def dot_logits(qt, kt, UPCAST: tl.constexpr, IEEE: tl.constexpr):
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
def load_rows(head, r, rmask, s_r, dd, s_d, dmask):
    """The (len(r), len(dd)) tile of rows r (int64) of one head (`head`: its token 0), zeros outside
    rmask x dmask, in the input dtype."""
    return tl.load(head + r[:, None] * s_r + dd[None, :] * s_d, mask=rmask[:, None] & dmask[None, :], other=0.0)


@triton.jit
def lse_rows(qt, keys, row0, n, s_ks, s_kd, dd, dmask, qk_scale,
             UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M,) float32 natural-log logsumexp_j(scale * q_i . k_j) of the query tile qt over the n
    keys at rows row0 ... row0 + n - 1 of `keys`; online max and sum in base 2 (qk_scale = scale *
    log2 e), as in FlashAttention's forward pass. n >= 1: every key block then holds a valid key, so
    the max is finite after the first one and no -inf - -inf reaches exp2; and total >= 1 (the max's
    own term is exp2(0)), so the floor of 1 below changes nothing but spares a program with no key
    (n = 0, whose rows nobody stores) a log of 0."""
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        jmask = j < n
        kt = load_rows(keys, row0 + j, jmask, s_ks, dd, s_kd, dmask)
        l2 = tl.where(jmask[None, :], dot_logits(qt, kt, UPCAST, IEEE) * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(l2, axis=1))
        total = total * tl.exp2(m - m_new) + tl.sum(tl.exp2(l2 - m_new[:, None]), axis=1)
        m = m_new
    return (m + tl.log2(tl.maximum(total, 1.0))) * LN2


@triton.jit
def prob_tile(qt, kt, norm2, mask, qk_scale, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """p = exp2(qk_scale * q_i . k_j - norm2_i) (norm2 = lse * log2 e) of a (queries x keys) tile,
    0 outside mask."""
    p = tl.exp2(dot_logits(qt, kt, UPCAST, IEEE) * qk_scale - norm2[:, None])
    return tl.where(mask, p, 0.0)


@triton.jit
def col_prob_sums(kt, jmask, queries, norms, row0, n, s_qs, s_qd, s_ls, part, dd, dmask, qk_scale,
                  ROWS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) float32 sum_i p[i, j] over the n queries at rows row0 ... of `queries` (their lse
    at norms + row * s_ls) for the key tile kt. ROWS: each query block's partial row sums over this
    key tile are stored at part + i (i < n, relative to row0)."""
    # Column sums accumulate elementwise and are reduced once at the end: a reduction across
    # the tile's rows crosses warps, too costly per query block.
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for i0 in range(0, n, BLOCK_M):
        i = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        imask = i < n
        qt = load_rows(queries, row0 + i, imask, s_qs, dd, s_qd, dmask)
        norm2 = tl.load(norms + (row0 + i) * s_ls, mask=imask, other=0.0) * LOG2E
        p = prob_tile(qt, kt, norm2, imask[:, None] & jmask[None, :], qk_scale, UPCAST, IEEE)
        acc += p
        if ROWS:
            tl.store(part + i, tl.sum(p, axis=1), mask=imask)
    return tl.sum(acc, axis=0)


@triton.jit
def row_prob_sums(qt, imask, norm2, keys, row0, n, s_ks, s_kd, dd, dmask, qk_scale,
                  UPCAST: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_M,) float32 sum_j p[i, j] over the n keys at rows row0 ... of `keys` for the query tile
    qt (lse * log2 e in norm2), key blocks added in order: the sums the dense path forms from its
    per-key-block partials (col_prob_sums with ROWS, then significance_qk._row_means_kernel)."""
    total = tl.zeros([BLOCK_M], tl.float32)
    for j0 in range(0, n, BLOCK_N):
        j = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        jmask = j < n
        kt = load_rows(keys, row0 + j, jmask, s_ks, dd, s_kd, dmask)
        total += tl.sum(prob_tile(qt, kt, norm2, imask[:, None] & jmask[None, :], qk_scale, UPCAST, IEEE), axis=1)
    return total


@triton.jit
def token_sum(rows, row0, n, s_r, dd, s_d, dmask, BLOCK_S: tl.constexpr):
    """(BLOCK_D,) float32 sum of the n rows at row0 ... of `rows`, blocks of BLOCK_S rows summed by
    tl.sum and added in block order."""
    acc = tl.zeros(dd.shape, tl.float32)
    for s0 in range(0, n, BLOCK_S):
        t = s0 + tl.arange(0, BLOCK_S).to(tl.int64)
        acc += tl.sum(load_rows(rows, row0 + t, t < n, s_r, dd, s_d, dmask).to(tl.float32), axis=0)
    return acc


@triton.jit
def logit_fx(rows, r, rmask, s_r, dd, s_d, dmask, vbar):
    """(len(r),) int64 fx(x_r . vbar) for the rows r of `rows`: the closed-form logit means (vbar =
    scale times the mean of the other side: colmean_j = k_j . (scale qbar), rowmean_i = q_i . (scale kbar))."""
    xt = load_rows(rows, r, rmask, s_r, dd, s_d, dmask).to(tl.float32)
    return fx(tl.sum(xt * vbar[None, :], axis=1))


# ----------------------------------------------------------------------------------- launch settings


def check_head_dim(d: int) -> None:
    """SPEC.md "Backend limits": RuntimeError naming d above MAX_HEAD_DIM, the same text as CUDA's
    (which takes up to 8192), whatever the other sizes are."""
    if d > MAX_HEAD_DIM:
        raise RuntimeError(f"fopru: significance_qk supports head dim d <= {MAX_HEAD_DIM} on Triton, got {d}")


def tile_config(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M query rows, BLOCK_N keys, warps) of the tl.dot kernels."""
    if not target.for_gpu(device):
        return CPU_BLOCK, CPU_BLOCK, 4
    return GPU_BLOCK_M, GPU_BLOCK_N, 4


def dot_flags(q: torch.Tensor) -> tuple[bool, bool]:
    """(UPCAST, IEEE) of dot_logits for q's dtype and device."""
    upcast = q.dtype == torch.bfloat16 and not target.for_gpu(q.device)
    return upcast, upcast or q.dtype == torch.float32


def dot_block_d(d: int) -> int:
    """BLOCK_D of the tl.dot kernels: d padded to a power of two, at least 16 (tl.dot's minimum)."""
    return max(16, triton.next_power_of_2(d))
