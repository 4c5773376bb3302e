"""Input validation of SPEC.md 'Errors', shared by the reference and the Triton launchers.

csrc/ops.cpp performs the same checks in the same order with the same messages, so a user sees
one text whichever backend ran; tests/test_errors.py asserts both.
"""
from __future__ import annotations

import math

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
    if not isinstance(tokens, torch.Tensor):
        _fail(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 3:
        _fail(f"tokens must be 3-D (B, N, D), got {tokens.dim()}-D")
    if tokens.dtype not in TOKEN_DTYPES:
        _fail(f"tokens must be float16, bfloat16 or float32, got {_dtype_name(tokens.dtype)}")
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
