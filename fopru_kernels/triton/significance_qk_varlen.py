"""Packed batches from q and k as Triton kernels (SPEC.md "Packed batches from q and k"):
``significance_qk_varlen`` and ``prune_tokens_qk_varlen``, one launch per stage, no host sync.

Launchers take inputs already validated by ``_checks.py`` (scale resolved to a float); on a GPU that
leaves the values of cu_seqlens, which only the kernels read. Every grid is sized on the host from T,
S, H and d alone, so nothing is read back and the calls can be captured in a CUDA graph (the only
host-to-device copy is prune_tokens_varlen.py's table of host ints, capture-safe by launch.py).

Stages, each one launch:
1. ``_work_list_kernel`` (one program) checks cu_seqlens as SPEC.md asks (``[0] == 0``,
   non-decreasing, ``[S] == T``, every ``n_s`` a multiple of ``group``; any failure: status 0, no work,
   ``sig`` all INT64_MIN) and writes the work list: one item ``(start, n, block)`` per block of BLOCK
   tokens of every segment, at most ``cdiv(T, BLOCK) + S`` of them. So a 4-token segment is one item
   and a 4096-token one is 4096 / BLOCK items, all in one grid, and segments of very different sizes
   do not serialise. An item of the ``prob`` kernels costs O(n_s) (it sweeps its segment), so the list
   puts long segments' items first: segments by the bit length of their block count, descending (in
   segment order within one length), and the GPU, which starts programs roughly in index order, fills
   the tail with the short ones.
2. The per-head values, one program per (item, head); every kernel's device code is ``qk_tiles.py``'s,
   the dense kernels' own (same tiles, tl.dot flags, exp2 scaling and block-order sums), with the
   segment's start as the run offset, so SPEC.md's float error bound holds per segment. Heads are
   summed by int64 atomics into zeroed ``col`` / ``row`` (T,) buffers (exact, order-free).
   - ``logit``: ``_packed_logit_sums_kernel`` stores each item's sums of q (and k) rows,
     ``_packed_logit_bars_kernel`` adds each segment's item sums in block order (the dense kernel's
     order, when the blocks are the same size) into its first item's slot, once per segment (an
     item adding them itself would cost O(n_s^2 / BLOCK^2) per segment), and
     ``_packed_logit_means_kernel`` adds fx of its block's closed-form means against those qbar / kbar.
   - ``prob`` without lse: ``_packed_lse_kernel`` computes each query block's lse over its segment. The row
     sums are then 1 exactly (sum_j exp(l_ij - logsumexp_j l_ij)), so it adds fx(1 / n_s) to ``row``
     (focal) instead of a second pass over the segment; the dense kernels cannot do this because
     their prefix tokens take a share of each row. ``prob`` with lse given: the row sums depend on
     that lse, so ``_packed_prob_means_kernel`` runs two programs per item: one holds a key block and sums
     its columns over the segment's queries (``col_prob_sums``, as the dense kernel), the other holds
     a query block and sums its rows over the segment's keys (``row_prob_sums``, in key-block order as
     the dense path adds its partials). Without lse, one program per item: the columns.
3. ``_focal_group_kernel``, one program per segment: the exact focal choice of that segment
   (``exact.focal_prefers_col``) or ``col`` for ``received``, then the sums of ``group`` consecutive
   tokens, written to ``sig`` (T / group,).
4. ``prune_tokens_qk_varlen``: ``prune_tokens_varlen.py``'s selection + gather kernel on the selection
   segments (``cu_seqlens_select``, or cu_seqlens read divided by group), which also reads the
   scoring's status: invalid attention segments make every idx -1 and every row zero.

Not measured on a GPU yet: the GPU block sizes are first choices (the dense kernels'), not tuned values.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import prune_tokens_varlen as tv
from . import target
from .exact import focal_prefers_col, fx
from .launch import device_of, pow2
from .qk_tiles import (
    LOG2E,
    LOG2E_HOST,
    check_head_dim,
    col_prob_sums,
    dot_block_d,
    dot_flags,
    load_rows,
    logit_fx,
    lse_rows,
    row_prob_sums,
    tile_config,
    token_sum,
)

INT64_MIN = tl.constexpr(-9223372036854775808)
ITEM_COLS = tl.constexpr(3)  # int64 columns of a work item: segment start, segment length n, block
# _work_list_kernel: segments per step, items per step, length classes (bit lengths of block counts).
SEG_BLOCK = 128
ITEM_BLOCK = 1024
BUCKETS = 32
# _focal_group_kernel: tokens per step of the focal sums and merged tokens per step of the group sums.
FOCAL_BLOCK = 1024
# Tokens per item of the closed-form logit kernels: the dense kernels' (tokens x d) tile, at most 256
# tokens so that a short segment does not leave most of its program's lanes idle.
LOGIT_TILE = 4096
LOGIT_BLOCK_MAX = 256


# ----------------------------------------------------------------------------------- work list


@triton.jit
def _segments(cu_ptr, s_cu, s0, S, SEG_BLOCK: tl.constexpr):
    """Segments s0 ... s0 + SEG_BLOCK - 1: (s int64, s < S, start, n) with start and n int64."""
    s = s0 + tl.arange(0, SEG_BLOCK).to(tl.int64)
    m = s < S
    start = tl.load(cu_ptr + s * s_cu, mask=m, other=0).to(tl.int64)
    end = tl.load(cu_ptr + (s + 1) * s_cu, mask=m, other=0).to(tl.int64)
    return s, m, start, end - start


@triton.jit
def _bucket(nb, BUCKETS: tl.constexpr):
    """Length class of a block count: its bit length (0 for none), at most BUCKETS - 1. Any function
    of nb would do (it only orders the list); this one is computed alike by both passes."""
    bits = tl.log2(tl.maximum(nb, 1).to(tl.float32)).to(tl.int32) + 1
    return tl.where(nb > 0, tl.minimum(bits, BUCKETS - 1), 0)


@triton.jit
def _last_mark(a, b):
    return tl.where(b != 0, b, a)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


@triton.jit
def _work_list_kernel(cu_ptr, items_ptr, marks_ptr, status_ptr, s_cu, S, T, group, BLOCK,
                      SEG_BLOCK: tl.constexpr, ITEM_BLOCK: tl.constexpr, BUCKETS: tl.constexpr):
    """Checks cu_seqlens and writes the work list (module docstring, stage 1). Grid (1,).

    status (2,) int64 <- (1 if valid else 0, item count); items (max items, ITEM_COLS) int64 <-
    (segment start, n, block index) of item w < count. marks (max items,) int32 must be zero: the
    list's first item of every segment gets segment + 1 there, and a scan over the items carries it to
    the segment's other items (its position to all of them too, whence the block index)."""
    # Pass 1: validity, and items per length class.
    classes = tl.arange(0, BUCKETS)
    per_class = tl.zeros([BUCKETS], tl.int64)
    last = tl.zeros([], tl.int64) + S
    ok = (tl.load(cu_ptr).to(tl.int64) == 0) & (tl.load(cu_ptr + last * s_cu).to(tl.int64) == T)
    for s0 in range(0, S, SEG_BLOCK):
        _, m, _, n = _segments(cu_ptr, s_cu, s0, S, SEG_BLOCK)
        bad = m & ((n < 0) | (n % group != 0))
        ok = ok & (tl.sum(bad.to(tl.int32), axis=0) == 0)
        nb = tl.where(m & (n > 0), tl.cdiv(n, BLOCK), 0)
        hit = _bucket(nb, BUCKETS)[:, None] == classes[None, :]
        per_class += tl.sum(tl.where(hit, nb[:, None], 0), axis=0)
    count = tl.where(ok, tl.sum(per_class, axis=0), 0)
    tl.store(status_ptr, ok.to(tl.int64))
    tl.store(status_ptr + 1, count)

    # Pass 2 (valid lists only): each segment's first item, longest class first. With an invalid
    # cu_seqlens the loops below see no segment and no item.
    segs = tl.where(ok, S, 0)
    cursor = tl.sum(per_class, axis=0) - tl.cumsum(per_class, axis=0)  # items of the longer classes
    for s0 in range(0, segs, SEG_BLOCK):
        s, m, _, n = _segments(cu_ptr, s_cu, s0, S, SEG_BLOCK)
        nb = tl.where(m & (n > 0), tl.cdiv(n, BLOCK), 0)
        hit = (_bucket(nb, BUCKETS)[:, None] == classes[None, :]) & m[:, None]
        taken = tl.where(hit, nb[:, None], 0)
        first = tl.sum(tl.where(hit, cursor[None, :] + tl.cumsum(taken, axis=0) - taken, 0), axis=1)
        cursor += tl.sum(taken, axis=0)
        tl.store(marks_ptr + first, (s + 1).to(tl.int32), mask=nb > 0)
    tl.debug_barrier()  # pass 3 reads the marks other threads of this program wrote

    # Pass 3: every item's segment (the last mark at or before it) and block (its distance from it).
    lane = tl.arange(0, ITEM_BLOCK)
    seg_carry = tl.zeros([], tl.int32)
    first_carry = tl.zeros([], tl.int64)
    for w0 in range(0, count, ITEM_BLOCK):
        w = w0 + lane.to(tl.int64)
        wm = w < count
        mark = tl.load(marks_ptr + w, mask=wm, other=0)
        seg1 = tl.associative_scan(mark, 0, _last_mark)
        seg1 = tl.where(seg1 != 0, seg1, seg_carry)
        first = tl.maximum(tl.associative_scan(tl.where(mark != 0, w, 0), 0, _max), first_carry)
        seg_carry = tl.sum(tl.where(lane == ITEM_BLOCK - 1, seg1, 0), axis=0)
        first_carry = tl.max(first, axis=0)
        s = (seg1 - 1).to(tl.int64)
        start = tl.load(cu_ptr + s * s_cu, mask=wm, other=0).to(tl.int64)
        end = tl.load(cu_ptr + (s + 1) * s_cu, mask=wm, other=0).to(tl.int64)
        item = items_ptr + w * ITEM_COLS
        tl.store(item, start, mask=wm)
        tl.store(item + 1, end - start, mask=wm)
        tl.store(item + 2, w - first, mask=wm)


@triton.jit
def _item(items_ptr, status_ptr, w):
    """(start, n, block) of work item w; (0, 0, 0) past the list's end, so that such a program's
    loops run no step and its masks are empty."""
    live = w < tl.load(status_ptr + 1)
    item = items_ptr + w * ITEM_COLS
    return (tl.load(item, mask=live, other=0), tl.load(item + 1, mask=live, other=0),
            tl.load(item + 2, mask=live, other=0))


@triton.jit
def _item_head(items_ptr, status_ptr, H, BLOCK_D: tl.constexpr):
    """This program's (w, h) of a (max_items * H,) grid, the (start, n, block) of item w, and the head
    dim's lanes: (w, h, start, n, block, dd)."""
    pid = tl.program_id(0)
    w = (pid // H).to(tl.int64)
    h = (pid % H).to(tl.int64)
    start, n, blk = _item(items_ptr, status_ptr, w)
    return w, h, start, n, blk, tl.arange(0, BLOCK_D)


# ----------------------------------------------------------------------------------- per-head values


@triton.jit
def _packed_logit_sums_kernel(q_ptr, k_ptr, items_ptr, status_ptr, part_ptr, H, d, max_items,
                              s_qt, s_qh, s_qd, s_kt, s_kh, s_kd,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[h, w, 0] = sum of q over item w's tokens, part[h, w, 1] = sum of k (ROWS).
    Grid (max_items * H,)."""
    w, h, start, n, blk, dd = _item_head(items_ptr, status_ptr, H, BLOCK_D)
    dmask = dd < d
    row0 = start + blk * BLOCK
    rows = tl.minimum(n - blk * BLOCK, BLOCK)  # 0 past the list's end
    part = part_ptr + ((h * max_items + w) * 2) * BLOCK_D + dd
    live = dd < tl.where(rows > 0, BLOCK_D, 0)
    tl.store(part, token_sum(q_ptr + h * s_qh, row0, rows, s_qt, dd, s_qd, dmask, BLOCK), mask=live)
    if ROWS:
        tl.store(part + BLOCK_D, token_sum(k_ptr + h * s_kh, row0, rows, s_kt, dd, s_kd, dmask, BLOCK), mask=live)


@triton.jit
def _packed_logit_bars_kernel(items_ptr, status_ptr, part_ptr, H, max_items,
                              ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """part[h, w, :] of each segment's first item w (block 0) becomes the segment's sums of q (and k)
    rows: its items' sums (_packed_logit_sums_kernel) added in block order. A segment's items are
    consecutive in the work list, so they are part[h, w + b] for b < cdiv(n, BLOCK); only this program
    reads or writes them in this launch. Grid (max_items * H,); the other programs return."""
    w, h, start, n, blk, dd = _item_head(items_ptr, status_ptr, H, BLOCK_D)
    if (blk == 0) & (n > 0):
        sums = part_ptr + ((h * max_items + w) * 2) * BLOCK_D + dd
        qsum = tl.zeros([BLOCK_D], tl.float32)
        ksum = tl.zeros([BLOCK_D], tl.float32)
        for b in range(0, tl.cdiv(n, BLOCK)):
            qsum += tl.load(sums + b * 2 * BLOCK_D)
            if ROWS:
                ksum += tl.load(sums + b * 2 * BLOCK_D + BLOCK_D)
        tl.store(sums, qsum)
        if ROWS:
            tl.store(sums + BLOCK_D, ksum)


@triton.jit
def _packed_logit_means_kernel(q_ptr, k_ptr, items_ptr, status_ptr, part_ptr, col_ptr, row_ptr, H, d, max_items, scale,
                               s_qt, s_qh, s_qd, s_kt, s_kh, s_kd,
                               ROWS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """col[t] += fx(scale * qbar . k_t), row[t] += fx(scale * q_t . kbar) (ROWS) for item w's tokens,
    bars = the segment's means from the sums _packed_logit_bars_kernel left in its first item's slot.
    Grid (max_items * H,)."""
    w, h, start, n, blk, dd = _item_head(items_ptr, status_ptr, H, BLOCK_D)
    dmask = dd < d
    sums = part_ptr + ((h * max_items + w - blk) * 2) * BLOCK_D + dd  # the segment's first item
    live = dd < tl.where(n > 0, BLOCK_D, 0)  # past the list's end: no segment, nothing to read
    qsum = tl.load(sums, mask=live, other=0.0)
    ksum = tl.zeros([BLOCK_D], tl.float32)
    if ROWS:
        ksum = tl.load(sums + BLOCK_D, mask=live, other=0.0)
    mean_scale = scale / tl.maximum(n, 1).to(tl.float32)
    t = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    tmask = t < n
    r = start + t
    tl.atomic_add(col_ptr + r, logit_fx(k_ptr + h * s_kh, r, tmask, s_kt, dd, s_kd, dmask, qsum * mean_scale),
                  mask=tmask, sem="relaxed")
    if ROWS:
        tl.atomic_add(row_ptr + r, logit_fx(q_ptr + h * s_qh, r, tmask, s_qt, dd, s_qd, dmask, ksum * mean_scale),
                      mask=tmask, sem="relaxed")


@triton.jit
def _packed_lse_kernel(q_ptr, k_ptr, items_ptr, status_ptr, lse_ptr, row_ptr, T, H, d, qk_scale,
                       s_qt, s_qh, s_qd, s_kt, s_kh, s_kd,
                       ROWS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """lse[h, t] = logsumexp over t's segment for item w's query rows (qk_tiles.lse_rows), lse a
    contiguous (H, T) buffer; ROWS: row[t] += fx(1 / n), the mean of a row of probabilities that sums
    to 1 exactly under that lse. Grid (max_items * H,)."""
    w, h, start, n, blk, dd = _item_head(items_ptr, status_ptr, H, BLOCK_D)
    i = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    imask = i < n
    dmask = dd < d
    qt = load_rows(q_ptr + h * s_qh, start + i, imask, s_qt, dd, s_qd, dmask)
    lse = lse_rows(qt, k_ptr + h * s_kh, start, n, s_kt, s_kd, dd, dmask, qk_scale, UPCAST, IEEE, BLOCK, BLOCK)
    tl.store(lse_ptr + h * T + start + i, lse, mask=imask)
    if ROWS:
        mean = tl.zeros([BLOCK], tl.float32) + 1.0 / tl.maximum(n, 1).to(tl.float32)
        tl.atomic_add(row_ptr + start + i, fx(mean), mask=imask, sem="relaxed")


@triton.jit
def _packed_prob_means_kernel(q_ptr, k_ptr, items_ptr, status_ptr, lse_ptr, col_ptr, row_ptr, H, d, qk_scale,
                              s_qt, s_qh, s_qd, s_kt, s_kh, s_kd, s_lh, s_lt,
                              ROWS: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                              BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (w, role, h): role 0 holds item w's keys and adds fx((1/n) sum_i p[i, j]) to col[j];
    role 1 (ROWS: two roles) holds its queries and adds fx((1/n) sum_j p[i, j]) to row[i], with
    p = exp2(qk_scale * q_i . k_j - log2(e) * lse[h, i]) over the segment. Grid (max_items * roles * H,)."""
    pid = tl.program_id(0)
    h = (pid % H).to(tl.int64)
    if ROWS:
        w = (pid // (2 * H)).to(tl.int64)
        role = (pid // H) % 2
    else:
        w = (pid // H).to(tl.int64)
        role = 0
    start, n, blk = _item(items_ptr, status_ptr, w)
    r = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    rmask = r < n
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < d
    queries = q_ptr + h * s_qh
    keys = k_ptr + h * s_kh
    norms = lse_ptr + h * s_lh
    if role == 0:
        kt = load_rows(keys, start + r, rmask, s_kt, dd, s_kd, dmask)
        sums = col_prob_sums(kt, rmask, queries, norms, start, n, s_qt, s_qd, s_lt, col_ptr, dd, dmask, qk_scale,
                             False, UPCAST, IEEE, BLOCK, BLOCK)
        tl.atomic_add(col_ptr + start + r, fx(sums / tl.maximum(n, 1).to(tl.float32)), mask=rmask, sem="relaxed")
    else:
        qt = load_rows(queries, start + r, rmask, s_qt, dd, s_qd, dmask)
        norm2 = tl.load(norms + (start + r) * s_lt, mask=rmask, other=0.0) * LOG2E
        sums = row_prob_sums(qt, rmask, norm2, keys, start, n, s_kt, s_kd, dd, dmask, qk_scale,
                             UPCAST, IEEE, BLOCK, BLOCK)
        tl.atomic_add(row_ptr + start + r, fx(sums / tl.maximum(n, 1).to(tl.float32)), mask=rmask, sem="relaxed")


# ----------------------------------------------------------------------------------- focal + group


@triton.jit
def _focal_group_kernel(col_ptr, row_ptr, cu_ptr, status_ptr, sig_ptr, s_cu, S, T, group, share,
                        FOCAL: tl.constexpr, BLOCK: tl.constexpr):
    """Segment s: sig[u] = sum_{r < group} v[u * group + r] over its merged tokens u, v = col, or for
    FOCAL the vector of col and row that SPEC.md's focal rule picks for the segment. With an invalid
    cu_seqlens (status[0] == 0) program s instead writes INT64_MIN to sig[s * share ... + share).
    Grid (max(S, 1),)."""
    pid = tl.program_id(0).to(tl.int64)
    ok = tl.load(status_ptr) != 0
    m = T // group
    lo = tl.where(ok, m, pid * share)  # invalid: this program's share of sig, else nothing
    hi = tl.minimum(lo + share, m)
    for u0 in range(lo, hi, BLOCK):
        u = u0 + tl.arange(0, BLOCK).to(tl.int64)
        tl.store(sig_ptr + u, tl.full([BLOCK], INT64_MIN, tl.int64), mask=u < hi)

    live = ok & (pid < S)
    start = tl.load(cu_ptr + pid * s_cu, mask=live, other=0).to(tl.int64)
    n = tl.where(live, tl.load(cu_ptr + (pid + 1) * s_cu, mask=live, other=0).to(tl.int64) - start, 0)
    if FOCAL:
        src = row_ptr + start
        if focal_prefers_col(col_ptr + start, row_ptr + start, n, 1, BLOCK):
            src = col_ptr + start
    else:
        src = col_ptr + start
    units = n // group
    for u0 in range(0, units, BLOCK):
        u = u0 + tl.arange(0, BLOCK).to(tl.int64)
        um = u < units
        acc = tl.zeros([BLOCK], tl.int64)
        for r in range(0, group):
            acc += tl.load(src + u * group + r, mask=um, other=0)
        tl.store(sig_ptr + start // group + u, acc, mask=um)


# ----------------------------------------------------------------------------------- launchers


def _item_block(kind: str, t: int, d: int, device: torch.device) -> int:
    """Tokens per work item: the prob kernels' tl.dot tile, or the logit kernels' (tokens x d) tile
    (at most LOGIT_BLOCK_MAX tokens; under the interpreter, which runs programs one after another, the
    prob tile's size too); never more than T needs."""
    if kind == "prob" or not target.for_gpu(device):
        return max(16, min(tile_config(device)[0], pow2(t)))
    return max(16, min(pow2(t), LOGIT_TILE // pow2(d), LOGIT_BLOCK_MAX))


def work_list(cu_seqlens: torch.Tensor, t: int, group: int, block: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The work list of a packed batch of T = t tokens (stage 1): cu_seqlens (S + 1,) int32 / int64 on the
    device, `block` tokens per item -> (items (max_items, 3) int64: (segment start, n, block index) in
    its first status[1] rows; status (2,) int64: (1 if cu_seqlens is valid for t and group else 0, item
    count); max_items = cdiv(t, block) + S, the grid bound of the per-item kernels). Launches on the
    current device."""
    s = cu_seqlens.shape[0] - 1
    max_items = triton.cdiv(t, block) + s
    device = cu_seqlens.device
    items = torch.empty(max_items, 3, dtype=torch.int64, device=device)
    marks = torch.zeros(max_items, dtype=torch.int32, device=device)
    status = torch.empty(2, dtype=torch.int64, device=device)
    _work_list_kernel[(1,)](cu_seqlens, items, marks, status, cu_seqlens.stride(0), s, t, group, block,
                            SEG_BLOCK=SEG_BLOCK, ITEM_BLOCK=ITEM_BLOCK, BUCKETS=BUCKETS)
    return items, status, max_items


def _head_sums(q, k, cu_seqlens, scale, lse, kind, group, rows: bool):
    """(sums (2 if rows else 1, T) int64: [0] = sum_h fx(column means), [1] = sum_h fx(row means),
    status) of the packed batch (stages 1 and 2)."""
    t, h, d = q.shape
    device = q.device
    block = _item_block(kind, t, d, device)
    items, status, max_items = work_list(cu_seqlens, t, group, block)
    sums = torch.zeros(2 if rows else 1, t, dtype=torch.int64, device=device)
    col, row = sums[0], sums[-1]
    if kind == "logit":
        block_d = pow2(d)
        part = torch.empty(h, max_items, 2, block_d, dtype=torch.float32, device=device)
        args = (q, k, items, status, part)
        strides = (*q.stride(), *k.stride())
        _packed_logit_sums_kernel[(max_items * h,)](*args, h, d, max_items, *strides,
                                             ROWS=rows, BLOCK=block, BLOCK_D=block_d)
        _packed_logit_bars_kernel[(max_items * h,)](items, status, part, h, max_items,
                                                    ROWS=rows, BLOCK=block, BLOCK_D=block_d)
        _packed_logit_means_kernel[(max_items * h,)](*args, col, row, h, d, max_items, scale, *strides,
                                              ROWS=rows, BLOCK=block, BLOCK_D=block_d)
        return sums, status
    warps = tile_config(device)[2]
    upcast, ieee = dot_flags(q)
    flags = dict(UPCAST=upcast, IEEE=ieee, BLOCK=block, BLOCK_D=dot_block_d(d), num_warps=warps)
    qk_scale = scale * LOG2E_HOST
    given = lse is not None
    if not given:
        lse = torch.empty(h, t, dtype=torch.float32, device=device)
        _packed_lse_kernel[(max_items * h,)](q, k, items, status, lse, row, t, h, d, qk_scale, *q.stride(), *k.stride(),
                                      ROWS=rows, **flags)
    roles = 2 if rows and given else 1
    _packed_prob_means_kernel[(max_items * roles * h,)](q, k, items, status, lse, col, row, h, d, qk_scale,
                                                 *q.stride(), *k.stride(), *lse.stride(), ROWS=roles == 2, **flags)
    return sums, status


def _significance(q, k, cu_seqlens, score, scale, lse, kind, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(sig (T / group,) int64, status (2,) int64) of a packed batch with T > 0 (stages 1 to 3)."""
    t = q.shape[0]
    focal = score == "focal"
    sums, status = _head_sums(q, k, cu_seqlens, scale, lse, kind, group, rows=focal)
    s = cu_seqlens.shape[0] - 1
    programs = max(s, 1)
    sig = torch.empty(t // group, dtype=torch.int64, device=q.device)
    _focal_group_kernel[(programs,)](sums[0], sums[-1], cu_seqlens, status, sig, cu_seqlens.stride(0), s, t, group,
                                     triton.cdiv(t // group, programs), FOCAL=focal, BLOCK=FOCAL_BLOCK)
    return sig, status


def significance_qk_varlen(
    q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, score: str, scale: float,
    lse: torch.Tensor | None, kind: str, group: int,
) -> torch.Tensor:
    """Significance of a packed batch (SPEC.md): q, k (T, H, d) any strides, cu_seqlens (S + 1,) int32 /
    int64, lse (H, T) float32 any strides or None -> sig (T / group,) int64; all INT64_MIN when the
    values of cu_seqlens break SPEC.md's requirements (checked on the device)."""
    check_head_dim(q.shape[2])
    if q.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=q.device)
    with device_of(q):
        return _significance(q, k, cu_seqlens, score, scale, lse, kind, group)[0]


def prune_tokens_qk_varlen(
    tokens: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor, keep: list[int],
    strategy: str, score: str, scale: float, lse: torch.Tensor | None, kind: str, group: int,
    cu_seqlens_select: torch.Tensor | None, cols: list[int], grids: list[int] | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (T / group, D) merged tokens, q, k, cu_seqlens, lse as in significance_qk_varlen, keep M
    host ints, cu_seqlens_select (M + 1,) or None (cu_seqlens / group), cols per selection segment (what
    _checks.check_prune_qk_varlen returns), grids flat or None -> pruned (sum(keep), D), idx (sum(keep),)
    int64 global merged-token indices, cu_seqlens_out (M + 1,) of the selection segments' dtype.
    Invalid attention segments make every idx -1 and every row zero; invalid selection segments, theirs."""
    check_head_dim(q.shape[2])
    with device_of(tokens):
        if sum(keep) and q.shape[0]:
            sig, status = _significance(q, k, cu_seqlens, score, scale, lse, kind, group)
        else:  # nothing kept or nothing to score: nothing is read
            sig, status = torch.empty(tokens.shape[0], dtype=torch.int64, device=tokens.device), None
    if cu_seqlens_select is None:
        return tv.prune_tokens_varlen(tokens, sig, cu_seqlens, keep, strategy, cols, grids, cu_div=group, status=status)
    return tv.prune_tokens_varlen(tokens, sig, cu_seqlens_select, keep, strategy, cols, grids, status=status)
