"""The grid of scripts/triton_compile_check.py: the cases it runs and the values they must reach.

CASES: one line per call of a public op with backend="triton" (builders prune, significance,
select, qk, varlen; each makes uninitialised CPU tensors of the given shapes, dtypes and layout:
nothing runs, the launchers only pick their configuration and launch). Adding a case is one line.

DOMAINS: per kernel, every value each tl.constexpr parameter can take on the GPU path, and
optionally the dtypes of pointer parameters (Triton's names: '*fp16', '*i32', ...). The check fails
when a value is never compiled (unless UNREACHABLE gives a reason) or one outside it is. A new
kernel or constexpr parameter needs its entry here; the check names what is missing.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import torch

import fopru_kernels as fopru
from fopru_kernels.triton.qk_tiles import MAX_HEAD_DIM

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64,
          "int32": torch.int32, "int64": torch.int64}


def pow2(lo: int, hi: int) -> tuple[int, ...]:
    """The powers of two from lo to hi (both powers of two), the block sizes launchers pick."""
    return tuple(1 << i for i in range(lo.bit_length() - 1, hi.bit_length()))


FLOATS = ("*fp16", "*bf16", "*fp32")
# Per kernel: tl.constexpr parameter -> every value the launchers can pass on a GPU, and pointer
# parameter -> every dtype it can get (see the launchers in fopru_kernels/triton/). q/k head dims
# are covered up to MAX_HEAD_DIM (256), the cap the q/k launchers enforce (SPEC.md "Backend
# limits"; ViT heads are 64-128), so BLOCK_D of the q/k kernels reaches exactly that.
DOMAINS = {
    "_cls_sig_kernel": {"HEAD_BLOCK": pow2(1, 16), "BLOCK": pow2(1, 256), "attn_ptr": FLOATS + ("*fp64",)},
    "_map_sums_kernel": {"ROWS": (False, True), "BLOCK_Q": (16,), "BLOCK_K": pow2(1, 128),
                         "attn_ptr": FLOATS + ("*fp64",)},
    "_focal_sig_kernel": {"BLOCK": pow2(1, 1024)},
    "_prune_fused_kernel": {"SCORE": (0, 1, 2), "UNIT_BLOCK": pow2(1, 4096), "W_BLOCK": pow2(1, 4096),
                            "HEAD_BLOCK": pow2(1, 16), "ROWS_PER_PROGRAM": pow2(1, 64), "BLOCK_D": pow2(1, 4096),
                            "RADIX_BITS": (8,), "tokens_ptr": FLOATS, "attn_ptr": FLOATS + ("*fp64", "*i64")},
    "_select_kernel": {"UNIT_BLOCK": pow2(1, 1024), "X_BLOCK": pow2(1, 4096), "RADIX_BITS": (8,)},
    "_gather_kernel": {"ROWS_PER_PROGRAM": pow2(1, 64), "BLOCK_D": pow2(1, 4096), "tokens_ptr": FLOATS},
    "_prune_varlen_kernel": {"UNIT_BLOCK": pow2(1, 1024), "X_BLOCK": pow2(1, 4096), "ROWS_PER_PROGRAM": pow2(1, 64),
                             "BLOCK_D": pow2(1, 4096), "RADIX_BITS": (8,), "SCORED": (False, True),
                             "tokens_ptr": FLOATS, "cu_ptr": ("*i32", "*i64")},
    "_lse_kernel": {"UPCAST": (False,), "IEEE": (False, True), "BLOCK_M": (16, 32, 64), "BLOCK_N": (16, 32, 64),
                    "BLOCK_D": pow2(16, MAX_HEAD_DIM), "q_ptr": FLOATS},
    "_cls_kernel": {"PROB": (False, True), "BLOCK_J": pow2(16, 4096), "BLOCK_D": pow2(1, MAX_HEAD_DIM), "q_ptr": FLOATS},
    "_logit_means_kernel": {"ROWS": (False, True), "BLOCK_S": pow2(16, 4096), "BLOCK_D": pow2(1, MAX_HEAD_DIM),
                            "q_ptr": FLOATS},
    "_prob_means_kernel": {"ROWS": (False, True), "UPCAST": (False,), "IEEE": (False, True), "BLOCK_M": (16, 32, 64),
                           "BLOCK_N": (16, 32, 64), "BLOCK_D": pow2(16, MAX_HEAD_DIM), "q_ptr": FLOATS},
    "_row_means_kernel": {"BLOCK": pow2(1, 1024)},
    # packed q/k (significance_qk_varlen.py): items of BLOCK tokens, the tl.dot kernels' tile or the
    # logit kernels' (tokens x d) tile of at most 256 tokens
    "_work_list_kernel": {"SEG_BLOCK": (128,), "ITEM_BLOCK": (1024,), "BUCKETS": (32,), "cu_ptr": ("*i32", "*i64")},
    "_packed_logit_sums_kernel": {"ROWS": (False, True), "BLOCK": pow2(16, 256), "BLOCK_D": pow2(1, MAX_HEAD_DIM),
                                  "q_ptr": FLOATS},
    "_packed_logit_means_kernel": {"ROWS": (False, True), "BLOCK": pow2(16, 256), "BLOCK_D": pow2(1, MAX_HEAD_DIM),
                                   "q_ptr": FLOATS},
    "_packed_logit_bars_kernel": {"ROWS": (False, True), "BLOCK": pow2(16, 256), "BLOCK_D": pow2(1, MAX_HEAD_DIM)},
    "_packed_lse_kernel": {"ROWS": (False, True), "UPCAST": (False,), "IEEE": (False, True), "BLOCK": (16, 32, 64),
                           "BLOCK_D": pow2(16, MAX_HEAD_DIM), "q_ptr": FLOATS},
    "_packed_prob_means_kernel": {"ROWS": (False, True), "UPCAST": (False,), "IEEE": (False, True),
                                  "BLOCK": (16, 32, 64), "BLOCK_D": pow2(16, MAX_HEAD_DIM), "q_ptr": FLOATS},
    "_focal_group_kernel": {"FOCAL": (False, True), "BLOCK": (1024,), "cu_ptr": ("*i32", "*i64")},
}
# (kernel, parameter, value) -> why the GPU path never passes it; such values are not required.
UNREACHABLE: dict[tuple[str, str, object], str] = {}


# ----------------------------------------------------------------------------------- cases


@dataclasses.dataclass
class Case:
    label: str
    run: Callable[[], object]


def _empty(shape, dtype: str, layout: str = "contiguous") -> torch.Tensor:
    """An uninitialised tensor of `shape` laid out as the tests lay out inputs (the kernels
    specialise on strides and alignment): contiguous, strided (every second element of a wider
    buffer), expanded (batch stride 0), padded (rows padded to 16 elements) or offset (contiguous
    from one element past an aligned start)."""
    dt = DTYPES[dtype]
    shape = tuple(shape)
    if layout == "contiguous":
        return torch.empty(shape, dtype=dt)
    if layout == "strided":
        return torch.empty(*shape[:-1], 2 * shape[-1], dtype=dt)[..., ::2]
    if layout == "expanded":
        return torch.empty(1, *shape[1:], dtype=dt).expand(shape)
    if layout == "padded":
        return torch.empty(*shape[:-1], (shape[-1] + 15) // 16 * 16, dtype=dt)[..., : shape[-1]]
    if layout == "offset":
        return torch.empty(int(torch.Size(shape).numel()) + 1, dtype=dt)[1:].view(shape)
    raise ValueError(f"layout must be contiguous, strided, expanded, padded or offset, got {layout!r}")


def _case(op: str, args: tuple, kwargs: dict, run: Callable[[], object]) -> Case:
    text = ", ".join([*map(repr, args), *(f"{k}={v!r}" for k, v in kwargs.items())])
    return Case(f"{op}({text})", run)


def prune(b, n, keep, *, score="cls", strategy="rank", grid=None, d=1024, h=16, dtype="fp16", attn="fp32",
          prefix=1, layout="contiguous"):
    """prune_tokens on tokens (b, n, d) and attn (b, h, 1 or S, S), S = prefix + n."""
    def run():
        s = prefix + n
        a = _empty((b, h, 1 if score == "cls" else s, s), attn, layout)
        return fopru.prune_tokens(_empty((b, n, d), dtype, layout), a, keep, strategy=strategy, score=score,
                                  num_prefix=prefix, grid=grid, backend="triton")
    return _case("prune", (b, n, keep), dict(score=score, strategy=strategy, grid=grid, d=d, h=h, dtype=dtype,
                                             attn=attn, prefix=prefix, layout=layout), run)


def significance(b, n, *, score="cls", h=16, attn="fp32", prefix=1, layout="contiguous"):
    """significance on attn (b, h, 1 or S, S)."""
    def run():
        s = prefix + n
        return fopru.significance(_empty((b, h, 1 if score == "cls" else s, s), attn, layout), score=score,
                                  num_prefix=prefix, backend="triton")
    return _case("significance", (b, n), dict(score=score, h=h, attn=attn, prefix=prefix, layout=layout), run)


def select(b, n, keep, *, strategy="rank", grid=None, layout="contiguous"):
    """select on sig (b, n) int64."""
    def run():
        return fopru.select(_empty((b, n), "int64", layout), keep, strategy=strategy, grid=grid, backend="triton")
    return _case("select", (b, n, keep), dict(strategy=strategy, grid=grid, layout=layout), run)


def qk(b, n, keep=None, *, score="cls", kind="prob", lse=False, d=64, h=16, dtype="fp16", qk_layout="bhsd",
       strategy="rank", grid=None, dim=1024, prefix=1, layout="contiguous"):
    """prune_tokens_qk on tokens (b, n, dim) and q, k (b, h, S, d) ('bhsd') or (b, S, h, d) ('bshd'),
    or significance_qk when keep is None; lse (b, h, S) float32 passed when lse is True."""
    def run():
        s = prefix + n
        shape = (b, h, s, d) if qk_layout == "bhsd" else (b, s, h, d)
        q, k = _empty(shape, dtype, layout), _empty(shape, dtype, layout)
        norms = _empty((b, h, s), "fp32") if lse else None
        if keep is None:
            return fopru.significance_qk(q, k, score=score, num_prefix=prefix, lse=norms, kind=kind, layout=qk_layout,
                                         backend="triton")
        return fopru.prune_tokens_qk(_empty((b, n, dim), "fp16"), q, k, keep, strategy=strategy, score=score,
                                     num_prefix=prefix, grid=grid, lse=norms, kind=kind, layout=qk_layout,
                                     backend="triton")
    return _case("qk", (b, n, keep), dict(score=score, kind=kind, lse=lse, d=d, h=h, dtype=dtype, qk_layout=qk_layout,
                                          strategy=strategy, grid=grid, dim=dim, prefix=prefix, layout=layout), run)


def varlen(seqlens, keeps, *, strategy="rank", grids=None, d=1024, dtype="fp16", cu="int32", layout="contiguous"):
    """prune_tokens_varlen on packed tokens (sum(seqlens), d) with per-image keep (and grids)."""
    def run():
        t = sum(seqlens)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=DTYPES[cu])
        flat = None if grids is None else [v for g in grids for v in g]
        return fopru.prune_tokens_varlen(_empty((t, d), dtype, layout), _empty((t,), "int64"), cu_seqlens,
                                         list(keeps), strategy=strategy, grids=flat, backend="triton")
    return _case("varlen", (seqlens, keeps), dict(strategy=strategy, grids=grids, d=d, dtype=dtype, cu=cu,
                                                  layout=layout), run)


def qk_varlen(seqlens, keeps=None, *, score="focal", kind="prob", lse=False, d=80, h=16, group=4, dtype="fp16",
              cu="int32", select=None, strategy="rank", grids=None, dim=1280, layout="qkv"):
    """significance_qk_varlen on q, k (T, h, d), T = sum(seqlens), cu_seqlens from seqlens (layout 'qkv':
    views of one (T, 3, h, d) buffer, as Qwen-VL's qkv projection; else as _empty lays them out), lse
    (h, T) float32 when lse is True; or prune_tokens_qk_varlen on merged tokens (T / group, dim) when keeps
    is given, selection segments `select` (merged tokens each) or cu_seqlens / group, grids (for row)."""
    def run():
        t = sum(seqlens)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(seqlens)], dtype=DTYPES[cu])
        if layout == "qkv":
            qkv = _empty((t, 3, h, d), dtype)
            q, k = qkv[:, 0], qkv[:, 1]
        else:
            q, k = _empty((t, h, d), dtype, layout), _empty((t, h, d), dtype, layout)
        norms = _empty((t, h), "fp32").t() if lse else None  # FlashAttention's softmax_lse strides
        if keeps is None:
            return fopru.significance_qk_varlen(q, k, cu_seqlens, score=score, lse=norms, kind=kind, group=group,
                                                backend="triton")
        sel = None if select is None else torch.tensor([0, *itertools.accumulate(select)], dtype=DTYPES[cu])
        flat = None if grids is None else [v for g in grids for v in g]
        return fopru.prune_tokens_qk_varlen(_empty((t // group, dim), "fp16"), q, k, cu_seqlens, list(keeps),
                                            strategy=strategy, score=score, lse=norms, kind=kind, group=group,
                                            cu_seqlens_select=sel, grids=flat, backend="triton")
    return _case("qk_varlen", (seqlens, keeps), dict(score=score, kind=kind, lse=lse, d=d, h=h, group=group,
                                                     dtype=dtype, cu=cu, select=select, strategy=strategy,
                                                     grids=grids, dim=dim, layout=layout), run)


# One line per case. Realistic shapes first: LLaVA-1.5 (CLIP-L/336: N = 576 = 24 x 24, H = 16,
# D = 1024, head dim 64), CLIP-L/224 (N = 256), LLaVA-NeXT (5 crops: 2880 tokens), SigLIP-so400m/384
# (N = 729 = 27 x 27, no CLS, D = 1152, d = 72), InternViT (N = 1024), Qwen2-VL's ViT (d = 80), large
# grids (N = 4900: the staged path). Then shapes that make the launchers pick every other DOMAINS
# value. B * keep is chosen so that ROWS_PER_PROGRAM is the same for 132 and 108 SMs (sm_90, sm_80).
CASES = [
    # map path, fused selection + gather (token tile <= 4096)
    prune(1, 576, 144, score="cls", attn="fp16"),
    prune(8, 576, 144, score="focal", attn="fp16"),
    prune(32, 576, 144, score="received", dtype="bf16", attn="bf16"),
    prune(1, 576, 144, score="cls", strategy="row", grid=(24, 24), layout="padded"),
    prune(1, 256, 64, score="focal", strategy="row", grid=(16, 16), dtype="bf16"),
    prune(1, 2880, 720, score="cls", dtype="bf16", attn="bf16"),
    prune(1, 729, 189, score="focal", strategy="row", grid=(27, 27), d=1152, prefix=0),
    prune(16, 576, 144, score="cls", dtype="fp32", attn="fp64", layout="strided"),
    prune(4, 256, 64, score="received", attn="fp64", layout="expanded"),
    prune(1, 1024, 256, score="cls", strategy="row", grid=(32, 32), h=25),
    prune(1, 1, 1, score="cls", d=1, h=1),
    prune(1, 2, 1, score="focal", d=2, h=2, layout="offset"),
    prune(1, 3, 2, score="received", d=3, h=3, attn="fp16"),
    prune(2, 5, 3, score="cls", d=5, h=5),
    prune(1, 9, 4, score="focal", d=9),
    prune(1, 17, 8, score="cls", d=17, h=8),
    prune(3, 33, 11, score="received", d=33),
    prune(1, 65, 30, score="cls", d=64, h=4),
    prune(2, 129, 100, score="focal", d=130),
    prune(1, 257, 200, score="cls", d=257, h=2),
    prune(1, 513, 300, score="received", d=1000),
    prune(1, 1025, 100, score="cls", d=2049, h=3),
    prune(1, 4, 2, score="cls", strategy="row", grid=(2, 2), h=4),
    prune(1, 12, 4, score="received", strategy="row", grid=(3, 4)),
    prune(1, 64, 16, score="focal", strategy="row", grid=(8, 8)),
    prune(1, 4096, 1024, score="cls", strategy="row", grid=(64, 64)),
    prune(1, 2048, 512, score="received", strategy="row", grid=(16, 128)),
    prune(1, 2048, 512, score="cls", strategy="row", grid=(8, 256)),
    prune(1, 4096, 1024, score="focal", strategy="row", grid=(8, 512)),
    prune(1, 4096, 2048, score="cls", strategy="row", grid=(2, 2048)),
    prune(1, 4096, 4096, score="cls", strategy="row", grid=(1, 4096), d=8),
    prune(1, 2048, 1024, score="focal", strategy="row", grid=(2, 1024), d=4096),
    # map path, staged (token tile > 4096): significance, _select_kernel, _gather_kernel
    prune(1, 4900, 1225, score="cls"),
    prune(2, 4097, 4096, score="focal", d=64, attn="fp16"),
    prune(1, 2880, 720, score="received", strategy="row", grid=(36, 80), d=2049, dtype="fp32"),
    prune(1, 4097, 100, score="cls", d=4096),
    prune(1, 4097, 100, score="cls", d=1, dtype="bf16"),
    prune(1, 4097, 150, score="cls", d=2),
    prune(1, 4097, 300, score="cls", d=4),
    prune(1, 4097, 3000, score="cls", d=8),
    prune(1, 4097, 100, score="cls", d=16),
    prune(1, 4097, 100, score="cls", d=32),
    prune(1, 4097, 100, score="cls", d=128),
    prune(1, 4097, 150, score="cls", d=1024),
    prune(1, 4097, 100, score="cls", d=2048),
    # the staged ops on their own
    significance(8, 576, score="cls", attn="fp16"),
    significance(1, 1, score="cls", h=1, attn="bf16"),
    significance(1, 2, score="cls", h=8),
    significance(1, 4, score="cls", h=2, attn="fp64"),
    significance(1, 8, score="cls", h=3),
    significance(1, 16, score="cls", h=4),
    significance(1, 32, score="cls", h=6),
    significance(1, 64, score="cls", layout="strided"),
    significance(1, 128, score="cls", h=12),
    significance(1, 1, score="focal", h=1, attn="bf16"),
    significance(1, 2, score="focal", h=2),
    significance(2, 3, score="received", h=3),
    significance(1, 8, score="focal", h=5),
    significance(1, 32, score="focal", attn="fp64"),
    significance(1, 128, score="focal"),
    significance(1, 300, score="focal", attn="fp16"),
    select(8, 576, 144),
    select(1, 1, 1),
    select(1, 2, 1, layout="strided"),
    select(1, 3, 2),
    select(1, 5, 3),
    select(1, 9, 4),
    select(1, 17, 8),
    select(1, 33, 16),
    select(1, 65, 32),
    select(1, 129, 64),
    select(1, 257, 128),
    select(1, 513, 256),
    select(1, 4, 2, strategy="row", grid=(2, 2)),
    select(1, 729, 189, strategy="row", grid=(27, 27)),
    select(1, 4096, 4096, strategy="row", grid=(1, 4096)),
    select(1, 4096, 2048, strategy="row", grid=(2, 2048)),
    select(1, 4096, 1024, strategy="row", grid=(4, 1024)),
    select(1, 4096, 1536, strategy="row", grid=(8, 512)),
    select(1, 4096, 256, strategy="row", grid=(16, 256)),
    select(1, 4096, 128, strategy="row", grid=(32, 128)),
    select(1, 4096, 64, strategy="row", grid=(64, 64)),
    select(1, 4096, 32, strategy="row", grid=(128, 32)),
    select(1, 4096, 16, strategy="row", grid=(256, 16)),
    select(1, 4096, 8, strategy="row", grid=(512, 8)),
    select(1, 8192, 4, strategy="row", grid=(2048, 4)),
    # q/k path
    qk(1, 576, 144, score="cls", kind="prob"),
    qk(8, 576, 144, score="focal", kind="logit"),
    qk(8, 576, 144, score="received", kind="prob", lse=True, dtype="bf16"),
    qk(1, 576, 144, score="focal", kind="prob", dtype="fp32", qk_layout="bshd"),
    qk(1, 729, 189, score="focal", kind="prob", d=72, prefix=0, strategy="row", grid=(27, 27)),
    qk(2, 1024, 256, score="received", kind="logit", d=80, dtype="bf16", qk_layout="bshd"),
    qk(1, 4900, 1225, score="cls", kind="prob", d=128),
    qk(1, 4900, 1225, score="focal", kind="logit", d=128, dtype="fp32"),
    qk(1, 4900, 1225, score="received", kind="prob", d=128, lse=True),
    qk(4, 2880, None, score="focal", kind="prob", d=256),
    qk(16, 576, None, score="cls", kind="prob", d=64, dtype="bf16"),
    qk(32, 576, None, score="cls", kind="logit", d=32),
    qk(64, 576, None, score="cls", kind="prob", d=16, lse=True, dtype="fp32"),
    qk(128, 576, None, score="cls", kind="logit", d=8),
    qk(128, 2880, None, score="cls", kind="logit", d=2, h=1),
    qk(64, 2880, None, score="cls", kind="logit", d=4, h=1),
    qk(140, 4096, None, score="cls", kind="logit", d=1, h=1),
    qk(1, 100, None, score="cls", kind="prob", d=200),
    qk(1, 200, None, score="focal", kind="logit", d=32),
    qk(1, 300, None, score="received", kind="logit", d=16),
    qk(1, 600, None, score="focal", kind="logit", d=8),
    qk(1, 1100, None, score="received", kind="logit", d=4),
    qk(1, 2100, None, score="focal", kind="logit", d=2),
    qk(1, 4100, None, score="received", kind="logit", d=1, h=2),
    qk(1, 50, None, score="focal", kind="logit", d=256, dtype="bf16"),
    qk(1, 1, None, score="focal", kind="prob", d=1, h=1),
    qk(1, 2, None, score="focal", kind="prob", d=2, layout="strided"),
    qk(1, 4, None, score="focal", kind="prob", d=16),
    qk(1, 8, None, score="focal", kind="prob", d=32, dtype="bf16"),
    qk(1, 16, None, score="focal", kind="prob"),
    qk(1, 20, None, score="received", kind="prob"),
    qk(1, 32, None, score="focal", kind="prob", lse=True, dtype="fp32"),
    qk(1, 64, None, score="focal", kind="prob", dtype="bf16"),
    qk(1, 128, None, score="focal", kind="prob", d=128),
    qk(1, 256, None, score="focal", kind="prob", d=80),
    qk(1, 512, None, score="focal", kind="prob", d=64, qk_layout="bshd"),
    # ragged batches
    varlen([576, 576, 2880], [144, 144, 720]),
    varlen([256, 729, 1024], [64, 189, 256], strategy="row", grids=[(16, 16), (27, 27), (32, 32)], d=1152,
           dtype="bf16", cu="int64"),
    varlen([1], [1], d=1, dtype="fp32"),
    varlen([2, 2], [2, 1], strategy="row", grids=[(1, 2), (2, 1)], d=2),
    varlen([16, 9], [8, 3], strategy="row", grids=[(4, 4), (3, 3)], d=8, layout="strided"),
    varlen([256], [64], strategy="row", grids=[(16, 16)], d=16),
    varlen([4096], [2560], strategy="row", grids=[(64, 64)], d=32),
    varlen([1024], [160], strategy="row", grids=[(128, 8)]),
    varlen([4096], [320], strategy="row", grids=[(256, 16)], d=256),
    varlen([4096], [1200], strategy="row", grids=[(512, 8)], d=64),
    varlen([2048], [128], strategy="row", grids=[(16, 128)], d=2048),
    varlen([2048], [256], strategy="row", grids=[(8, 256)]),
    varlen([2048], [1024], strategy="row", grids=[(2, 1024)]),
    varlen([4096], [2048], strategy="row", grids=[(2, 2048)]),
    varlen([4096], [512], strategy="row", grids=[(8, 512)]),
    varlen([4096], [4096], strategy="row", grids=[(1, 4096)]),
    varlen([4096, 4096], [4096, 4096], d=4),
    varlen([4096], [100], d=4096),
    varlen([64], [32], dtype="bf16"),
    varlen([100], [50], cu="int64"),
    varlen([100, 100], [100, 50]),
    varlen([300, 100], [150, 100], d=64),
    varlen([400, 400, 400], [400, 200, 100], d=128),
    # packed q/k: Qwen2.5-VL-7B's vision tower (16 heads of d = 80, 2 x 2 merge, D = 3584 after the merger)
    # on images of 256 to 2240 patches, then every other head dim, tile and flag
    qk_varlen([256, 1024, 960, 1728, 560, 2240, 192, 784], [16, 64, 60, 108, 35, 140, 12, 49], dim=3584),
    qk_varlen([256, 1024, 960, 1728], [16, 64, 60, 108], kind="logit", dtype="bf16", cu="int64", dim=3584),
    qk_varlen([256, 1024, 960], [16, 64, 64], lse=True, strategy="row", grids=[(8, 8), (16, 16), (15, 16)]),
    qk_varlen([64, 64, 64, 512], [12, 32], select=[48, 128], score="received", lse=True, dtype="bf16",
              strategy="row", grids=[(4, 12), (16, 8)]),
    qk_varlen([1024, 4, 12], score="received", kind="prob", dtype="fp32", layout="strided"),
    qk_varlen([1024, 4, 12], score="received", kind="logit", dtype="fp32"),
    qk_varlen([16], kind="prob", d=256, group=1),
    qk_varlen([32], kind="prob", d=128, lse=True, group=2),
    qk_varlen([8, 24], kind="prob", d=32, dtype="bf16"),
    qk_varlen([8, 40], kind="prob", d=8, dtype="fp32"),
    qk_varlen([300, 100], kind="prob", d=16, lse=True, dtype="fp32", cu="int64"),
    qk_varlen([300, 100], kind="prob", d=64, group=1),
    qk_varlen([1000], kind="logit", d=1, h=2, group=1),
    qk_varlen([1000], kind="logit", d=2, dtype="fp32", layout="offset"),
    qk_varlen([1000], kind="logit", d=4, score="received"),
    qk_varlen([1000], kind="logit", d=8, dtype="bf16"),
    qk_varlen([1000], kind="logit", d=16),
    qk_varlen([1000], kind="logit", d=32),
    qk_varlen([1000], kind="logit", d=64, score="received", dtype="bf16"),
    qk_varlen([1000], kind="logit", d=128, dtype="fp32"),
    qk_varlen([1000], kind="logit", d=256),
    qk_varlen([16, 16], kind="logit", d=8, group=1),
    qk_varlen([32], kind="logit", d=8, cu="int64"),
    qk_varlen([64], kind="logit", d=8),
    qk_varlen([100, 28], [1, 0], kind="logit", d=128, dtype="bf16", cu="int64", dim=16),
]
