"""Input validation of SPEC.md 'Errors', shared by the reference and the Triton launchers.

csrc/ops.cpp performs the same checks in the same order with the same messages, so a user sees
one text whichever backend ran; tests/test_errors.py asserts both.
"""
from __future__ import annotations

import math
import operator

import torch

# Every sum is at most H * Q' * W' values of |fx| <= 2^36; 2^26 of them stay below 2^62.
MAX_TERMS = 1 << 26

TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SCORES = ("focal", "received", "cls")
STRATEGIES = ("rank", "row")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _fail(msg: str) -> None:
    raise ValueError(msg)


def resolve_grid(n: int, grid, required: bool) -> tuple[int, int]:
    """(rows, cols) of the patch grid; None means square. `rank` ignores the grid, so it passes
    required=False and gets (1, N) for a non-square N."""
    if grid is None:
        r = math.isqrt(n)
        if r * r == n:
            return r, r
        if required:
            _fail(f"grid=None means a square grid, but N = {n} is not a perfect square: pass grid=(rows, cols)")
        return 1, n
    if len(grid) != 2 or any(not isinstance(v, int) or v <= 0 for v in grid) or grid[0] * grid[1] != n:
        _fail(f"grid must be (rows, cols) of positive ints with rows * cols == N = {n}, got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def check_significance(attn, score: str, num_prefix: int) -> None:
    if not isinstance(attn, torch.Tensor):
        _fail(f"attn must be a torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 4:
        _fail(f"attn must be 4-D (B, H, Q, S), got {attn.dim()}-D")
    if attn.dtype not in ATTN_DTYPES:
        _fail(f"attn must be float16, bfloat16, float32 or float64, got {_dtype_name(attn.dtype)}")
    if score not in SCORES:
        _fail(f"score must be 'focal', 'received' or 'cls', got '{score}'")
    _, h, q, s = attn.shape
    if num_prefix < 0 or num_prefix >= s:
        _fail(f"num_prefix must be in [0, S) = [0, {s}) with S = attn.shape[3], got {num_prefix}")
    if score == "cls":
        if num_prefix < 1:
            _fail("score='cls' needs num_prefix >= 1 (the CLS token), got 0")
        if q < 1:
            _fail("score='cls' needs the CLS query row: attn.shape[2] (Q) must be >= 1, got 0")
    elif q != s:
        _fail(f"score='{score}' needs a square map: attn.shape[2] (Q) must equal attn.shape[3] (S) = {s}, got {q}")
    check_size(h, q, s, num_prefix, score, 1)


def check_size(h: int, q: int, s: int, num_prefix: int, score: str, width: int) -> None:
    """SPEC.md limit H * Q' * W' <= 2^26, which keeps every int64 sum exact."""
    q_terms = 1 if score == "cls" else s - num_prefix
    terms = h * q_terms * width
    if terms > MAX_TERMS:
        _fail(
            f"attn is too large for exact int64 sums: H * Q' * W' = {h} * {q_terms} * {width} = {terms} "
            f"exceeds 2^26"
        )


def check_select(sig, keep: int, strategy: str, grid) -> tuple[int, int]:
    """Validates select()'s inputs; returns the grid (rows, cols)."""
    if not isinstance(sig, torch.Tensor) or sig.dim() != 2 or sig.dtype != torch.int64:
        _fail("sig must be a 2-D (B, N) int64 tensor")
    return _check_keep(sig.shape[1], keep, strategy, grid)


def _check_keep(n: int, keep: int, strategy: str, grid) -> tuple[int, int]:
    if strategy not in STRATEGIES:
        _fail(f"strategy must be 'rank' or 'row', got '{strategy}'")
    if keep < 0 or keep > n:
        _fail(f"keep must be in [0, N] = [0, {n}], got {keep}")
    rows, cols = resolve_grid(n, grid, required=strategy == "row")
    if strategy == "row" and keep % cols != 0:
        lo = keep // cols * cols
        _fail(
            f"keep must be a multiple of cols = {cols} for strategy='row', got {keep}: "
            f"nearest valid values are {lo} and {lo + cols}"
        )
    return rows, cols


def check_prune(tokens, attn, keep: int, strategy: str, score: str, num_prefix: int, grid) -> tuple[int, int]:
    """Validates prune_tokens()'s inputs; returns the grid (rows, cols)."""
    _check_tokens(tokens)
    check_significance(attn, score, num_prefix)
    b, n, _ = tokens.shape
    if attn.device != tokens.device:
        _fail(f"attn must be on the same device as tokens ({tokens.device}), got {attn.device}")
    if attn.shape[0] != b:
        _fail(f"attn.shape[0] (B) must equal tokens.shape[0] = {b}, got {attn.shape[0]}")
    s = attn.shape[3]
    if s - num_prefix != n:
        _fail(f"attn.shape[3] - num_prefix must equal tokens.shape[1] (N) = {n}, got {s} - {num_prefix} = {s - num_prefix}")
    rows, cols = _check_keep(n, keep, strategy, grid)
    check_size(attn.shape[1], attn.shape[2], s, num_prefix, score, cols if strategy == "row" else 1)
    return rows, cols


QK_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
KINDS = ("prob", "logit")
LAYOUTS = ("bhsd", "bshd")


def check_significance_qk(q, k, score: str, num_prefix: int, scale, lse, kind: str, layout: str) -> float:
    """Validates significance_qk()'s inputs; returns the resolved scale (d ** -0.5 when None)."""
    if layout not in LAYOUTS:
        _fail(f"layout must be 'bhsd' or 'bshd', got '{layout}'")
    _check_q_k(q, k, 4, "(B, H, S, d)" if layout == "bhsd" else "(B, S, H, d)")
    if score not in SCORES:
        _fail(f"score must be 'focal', 'received' or 'cls', got '{score}'")
    if kind not in KINDS:
        _fail(f"kind must be 'prob' or 'logit', got '{kind}'")
    b, h, s, d = qk_dims(q, layout)
    if d < 1:
        _fail("q's head dim d must be >= 1, got 0")
    if num_prefix < 0 or num_prefix >= s:
        _fail(f"num_prefix must be in [0, S) = [0, {s}) with S = {s} tokens in q, got {num_prefix}")
    if score == "cls" and num_prefix < 1:
        _fail("score='cls' needs num_prefix >= 1 (the CLS token), got 0")
    _check_scale(scale)
    _check_lse(lse, kind, q, "(B, H, S)", (b, h, s))
    _check_qk_size(h, 1)
    return float(scale) if scale is not None else d**-0.5


def _check_q_k(q, k, dims: int, shape: str) -> None:
    """q: a dims-D float tensor of `shape`; k: q's shape, dtype and device."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if q.dim() != dims:
        _fail(f"q must be {dims}-D {shape}, got {q.dim()}-D")
    if q.dtype not in QK_DTYPES:
        _fail(f"q must be float16, bfloat16 or float32, got {_dtype_name(q.dtype)}")
    if k.shape != q.shape:
        _fail(f"k must have q's shape {tuple(q.shape)}, got {tuple(k.shape)}")
    if k.dtype != q.dtype:
        _fail(f"k must have q's dtype {_dtype_name(q.dtype)}, got {_dtype_name(k.dtype)}")
    if k.device != q.device:
        _fail(f"k must be on q's device ({q.device}), got {k.device}")


def _check_scale(scale) -> None:
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale != 0):
        _fail(f"scale must be a finite nonzero float or None, got {scale}")


def _check_lse(lse, kind: str, q, names: str, shape: tuple[int, ...]) -> None:
    """lse: None, or (kind 'prob' only) a float32 tensor of `shape` (named `names`) on q's device."""
    if lse is None:
        return
    if kind != "prob":
        _fail("lse is only used with kind='prob'; pass lse=None for kind='logit'")
    if not isinstance(lse, torch.Tensor) or lse.dtype != torch.float32 or tuple(lse.shape) != shape:
        got = f"{type(lse).__name__}" if not isinstance(lse, torch.Tensor) else f"{_dtype_name(lse.dtype)} {tuple(lse.shape)}"
        _fail(f"lse must be a float32 tensor of shape {names} = {shape}, got {got}")
    if lse.device != q.device:
        _fail(f"lse must be on q's device ({q.device}), got {lse.device}")


def qk_dims(q: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    """(B, H, S, d) of q in either layout."""
    b, x, y, d = q.shape
    return (b, x, y, d) if layout == "bhsd" else (b, y, x, d)


def _check_qk_size(h: int, width: int) -> None:
    if h * width > MAX_TERMS:
        _fail(f"q has too many heads for exact int64 sums: H * W' = {h} * {width} = {h * width} exceeds 2^26")


def check_prune_qk(tokens, q, k, keep: int, strategy: str, score: str, num_prefix: int, grid, scale, lse,
                   kind: str, layout: str) -> tuple[int, int, float]:
    """Validates prune_tokens_qk()'s inputs; returns (rows, cols, resolved scale)."""
    _check_tokens(tokens)
    scale = check_significance_qk(q, k, score, num_prefix, scale, lse, kind, layout)
    b, n, _ = tokens.shape
    qb, h, s, _ = qk_dims(q, layout)
    if q.device != tokens.device:
        _fail(f"q must be on the same device as tokens ({tokens.device}), got {q.device}")
    if qb != b:
        _fail(f"q's batch size B must equal tokens.shape[0] = {b}, got {qb}")
    if s - num_prefix != n:
        _fail(f"q's token count S - num_prefix must equal tokens.shape[1] (N) = {n}, got {s} - {num_prefix} = {s - num_prefix}")
    rows, cols = _check_keep(n, keep, strategy, grid)
    _check_qk_size(h, cols if strategy == "row" else 1)
    return rows, cols, scale


def check_parts(parts) -> None:
    """Validates significance_from_parts()'s input: (B, C, N) int64, C = 2 (focal) or 1."""
    if not isinstance(parts, torch.Tensor):
        _fail(f"parts must be a torch.Tensor, got {type(parts).__name__}")
    if parts.dim() != 3 or parts.dtype != torch.int64 or parts.shape[1] not in (1, 2):
        _fail(f"parts must be a 3-D (B, C, N) int64 tensor with C = 2 (focal: column and row sums) or 1, "
              f"got {_dtype_name(parts.dtype)} {tuple(parts.shape)}")


def _check_tokens(tokens, dims: int = 3, shape: str = "(B, N, D)") -> None:
    if not isinstance(tokens, torch.Tensor):
        _fail(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != dims:
        _fail(f"tokens must be {dims}-D {shape}, got {tokens.dim()}-D")
    if tokens.dtype not in TOKEN_DTYPES:
        _fail(f"tokens must be float16, bfloat16 or float32, got {_dtype_name(tokens.dtype)}")


def flat_grids(grids) -> list[int] | None:
    """The ragged ops' grids as the schema's flat [rows_0, cols_0, rows_1, cols_1, ...]: from B
    (rows, cols) pairs (the form people write) or from the flat list itself; None stays None."""
    if grids is None:
        return None
    items = list(grids)
    try:
        if all(not hasattr(g, "__len__") or isinstance(g, torch.Tensor) and g.dim() == 0 for g in items):
            return [operator.index(g) for g in items]
        if all(len(g) == 2 for g in items):
            return [operator.index(v) for g in items for v in g]
    except TypeError:
        pass
    _fail(f"grids must be B (rows, cols) pairs of ints or the flat list [rows_0, cols_0, ...], got {grids!r}")


def check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy: str, grids, values: bool = True) -> list[int]:
    """Validates prune_tokens_varlen()'s inputs; returns cols per image (grid cols for row, 1 for rank).

    cu_seqlens' values are checked only for CPU tensors (and not at all with values=False, for fake
    tensors): on a GPU that would need a sync, and the kernels check each image's segment themselves
    (SPEC.md "Ragged batches")."""
    _check_tokens(tokens, 2, "(T, D)")
    t = tokens.shape[0]
    if not isinstance(sig, torch.Tensor) or sig.dim() != 1 or sig.dtype != torch.int64:
        _fail("sig must be a 1-D (T,) int64 tensor")
    if sig.shape[0] != t:
        _fail(f"sig.shape[0] must equal tokens.shape[0] (T) = {t}, got {sig.shape[0]}")
    if sig.device != tokens.device:
        _fail(f"sig must be on the same device as tokens ({tokens.device}), got {sig.device}")
    return check_segments(tokens, cu_seqlens, keep, strategy, grids, values)


def check_segments(tokens, cu_seqlens, keep, strategy: str, grids, values: bool = True, name: str = "cu_seqlens",
                   divisor: int = 1) -> list[int]:
    """The selection segments of a ragged batch of `tokens` (T, D): `name` (cu_seqlens) with the host
    keep / strategy / grids. Returns cols per segment. `divisor`: the segments are the values of the
    tensor divided by it (prune_tokens_qk_varlen selects over cu_seqlens / group)."""
    t = tokens.shape[0]
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        _fail(f"{name} must be a 1-D (B + 1,) int32 or int64 tensor")
    if cu_seqlens.device != tokens.device:
        _fail(f"{name} must be on the same device as tokens ({tokens.device}), got {cu_seqlens.device}")
    b = cu_seqlens.shape[0] - 1
    keep = list(keep)
    if len(keep) != b:
        _fail(f"keep must hold B = len({name}) - 1 = {b} ints, got {len(keep)}")
    if any(v < 0 for v in keep):
        _fail(f"keep must be >= 0 for every image, got {keep}")
    if strategy not in STRATEGIES:
        _fail(f"strategy must be 'rank' or 'row', got '{strategy}'")
    if strategy == "row" and grids is None:
        _fail("strategy='row' needs grids=[rows_0, cols_0, rows_1, cols_1, ...] (one grid per image)")
    if grids is not None:
        grids = list(grids)
        if len(grids) != 2 * b or any(g < 0 for g in grids[0::2]) or any(c <= 0 for c in grids[1::2]):
            _fail(f"grids must hold 2 * B = {2 * b} ints [rows_0, cols_0, ...] with rows >= 0 and cols > 0, got {grids}")
    cols = [grids[2 * i + 1] if strategy == "row" else 1 for i in range(b)]
    for i in range(b):
        if keep[i] % cols[i]:
            lo = keep[i] // cols[i] * cols[i]
            _fail(f"keep[{i}] must be a multiple of cols = {cols[i]} for strategy='row', got {keep[i]}: "
                  f"nearest valid values are {lo} and {lo + cols[i]}")
    if values and tokens.device.type == "cpu":
        _check_cu_seqlens_values([v // divisor for v in cu_seqlens.tolist()], t, keep, grids, name)
    return cols


def _check_cu_seqlens_values(cu: list[int], t: int, keep: list[int], grids, name: str = "cu_seqlens") -> None:
    if cu[0] != 0:
        _fail(f"{name}[0] must be 0, got {cu[0]}")
    if cu[-1] != t:
        _fail(f"{name}[B] must equal tokens.shape[0] (T) = {t}, got {cu[-1]}")
    for i in range(len(keep)):
        n = cu[i + 1] - cu[i]
        if n < 0:
            _fail(f"{name} must be non-decreasing, got {name}[{i}] = {cu[i]} > {name}[{i + 1}] = {cu[i + 1]}")
        if keep[i] > n:
            _fail(f"keep[{i}] must be in [0, n] = [0, {n}] (n from {name}), got {keep[i]}")
        if grids is not None and grids[2 * i] * grids[2 * i + 1] != n:
            _fail(f"grids[{i}] = ({grids[2 * i]}, {grids[2 * i + 1]}) must have rows * cols == n = {n} "
                  f"(n from {name})")


VARLEN_SCORES = ("focal", "received")


def check_significance_qk_varlen(q, k, cu_seqlens, score: str, scale, lse, kind: str, group: int,
                                 values: bool = True) -> float:
    """Validates significance_qk_varlen()'s inputs (SPEC.md "Packed batches from q and k"); returns the
    resolved scale (d ** -0.5 when None). cu_seqlens' values are read only for CPU tensors and only with
    values=True (a GPU would need a sync; a fake tensor has none)."""
    _check_q_k(q, k, 3, "(T, H, d)")
    if score not in VARLEN_SCORES:
        _fail(f"score must be 'focal' or 'received' (packed segments have no CLS token), got '{score}'")
    if kind not in KINDS:
        _fail(f"kind must be 'prob' or 'logit', got '{kind}'")
    t, h, d = q.shape
    if h < 1:
        _fail("q must have at least one head: q.shape[1] (H) must be >= 1, got 0")
    if d < 1:
        _fail("q's head dim d must be >= 1, got 0")
    _check_scale(scale)
    if not isinstance(group, int) or group < 1:
        _fail(f"group must be an int >= 1, got {group}")
    if t % group:
        _fail(f"q.shape[0] (T) = {t} must be a multiple of group = {group}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        _fail("cu_seqlens must be a 1-D (S + 1,) int32 or int64 tensor")
    if cu_seqlens.device != q.device:
        _fail(f"cu_seqlens must be on q's device ({q.device}), got {cu_seqlens.device}")
    _check_lse(lse, kind, q, "(H, T)", (h, t))
    _check_qk_varlen_size(h, group, 1)
    if values and q.device.type == "cpu":
        check_attention_segments(cu_seqlens.tolist(), t, group)
    return float(scale) if scale is not None else d**-0.5


def _check_qk_varlen_size(h: int, group: int, width: int) -> None:
    """A merged token's score sums H * group values of |fx| <= 2^36; a row score W' of them."""
    terms = h * group * width
    if terms > MAX_TERMS:
        _fail(f"q has too many heads for exact int64 sums: H * group * W' = {h} * {group} * {width} = {terms} "
              f"exceeds 2^26")


def check_attention_segments(cu: list[int], t: int, group: int) -> None:
    """The values of a packed batch's attention cu_seqlens (host ints) for T tokens and `group`."""
    if cu[0] != 0:
        _fail(f"cu_seqlens[0] must be 0, got {cu[0]}")
    if cu[-1] != t:
        _fail(f"cu_seqlens[S] must equal q.shape[0] (T) = {t}, got {cu[-1]}")
    for i in range(len(cu) - 1):
        n = cu[i + 1] - cu[i]
        if n < 0:
            _fail(f"cu_seqlens must be non-decreasing, got cu_seqlens[{i}] = {cu[i]} > cu_seqlens[{i + 1}] = {cu[i + 1]}")
        if n % group:
            _fail(f"segment {i} has n = {n} tokens (from cu_seqlens), not a multiple of group = {group}")


def check_prune_qk_varlen(tokens, q, k, cu_seqlens, keep, strategy: str, score: str, scale, lse, kind: str,
                          group: int, cu_seqlens_select, grids, values: bool = True) -> tuple[list[int], float]:
    """Validates prune_tokens_qk_varlen()'s inputs; returns (cols per selection segment, resolved scale).
    The selection segments are cu_seqlens_select, or cu_seqlens / group when it is None."""
    _check_tokens(tokens, 2, "(T / group, D)")
    scale = check_significance_qk_varlen(q, k, cu_seqlens, score, scale, lse, kind, group, values)
    if q.device != tokens.device:
        _fail(f"q must be on the same device as tokens ({tokens.device}), got {q.device}")
    m = q.shape[0] // group
    if tokens.shape[0] != m:
        _fail(f"tokens.shape[0] must equal q.shape[0] / group = {q.shape[0]} / {group} = {m}, got {tokens.shape[0]}")
    if cu_seqlens_select is None:
        cols = check_segments(tokens, cu_seqlens, keep, strategy, grids, values, "cu_seqlens / group", group)
    else:
        cols = check_segments(tokens, cu_seqlens_select, keep, strategy, grids, values, "cu_seqlens_select")
    _check_qk_varlen_size(q.shape[1], group, max(cols, default=1))
    return cols, scale
