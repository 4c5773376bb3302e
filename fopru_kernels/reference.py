"""SPEC.md written as plain PyTorch: the oracle every backend is tested against.

Readability comes first here; speed is the other backends' job. Every function validates its
inputs with the same messages as the C++ op (see ``_checks.py``), so the pure-Python fallback and
the compiled library reject bad input alike.
"""
from __future__ import annotations

import itertools
import math

import torch

from ._checks import (
    check_parts, check_prune, check_prune_varlen, check_select, check_significance, flat_grids, resolve_grid,
)

FX_SCALE = 2.0**28  # fixed-point resolution 2^-28: exact for every float16 value
FX_CLAMP = 256.0


def fixed_point(attn: torch.Tensor) -> torch.Tensor:
    """fx(a) = trunc(clamp(nan_to_0(a), -256, 256) * 2^28) as int64, any shape.

    Computed in float32 for 16/32-bit inputs and float64 for float64 inputs; the scaling is a power
    of two, so it is exact, and the cast to int64 truncates toward zero.
    """
    x = attn.double() if attn.dtype == torch.float64 else attn.float()
    x = torch.where(torch.isnan(x), torch.zeros_like(x), x)
    x = x.clamp(-FX_CLAMP, FX_CLAMP) * FX_SCALE
    return x.to(torch.int64)


def focal_use_col(col: list[int], row: list[int]) -> bool:
    """SPEC.md's focal rule for one image in Python integers (exact at any size): the column sums
    win iff N * sum(col^2) - sum(col)^2 > N * sum(row^2) - sum(row)^2 (N^2 times each vector's
    variance); ties go to the row sums."""
    n = len(col)
    spread = [n * sum(x * x for x in v) - sum(v) ** 2 for v in (col, row)]
    return spread[0] > spread[1]


def focal_choice(col: torch.Tensor, row: torch.Tensor) -> torch.Tensor:
    """(B,) bool: True where the column sums (B, N) int64 win the focal rule over the row sums."""
    use_col = [focal_use_col(c, r) for c, r in zip(col.tolist(), row.tolist())]
    return torch.tensor(use_col, dtype=torch.bool, device=col.device).reshape(col.shape[0])


def significance_and_choice(
    attn: torch.Tensor, score: str = "focal", num_prefix: int = 1
) -> tuple[torch.Tensor, list[str]]:
    """Significance (B, N) int64 and, per image, which vector it is: 'cls', 'col' or 'row'."""
    check_significance(attn, score, num_prefix)
    return _significance(attn, score, num_prefix)


def _significance(attn: torch.Tensor, score: str, num_prefix: int) -> tuple[torch.Tensor, list[str]]:
    p = num_prefix
    b, _, _, s = attn.shape
    n = s - p
    if b == 0:
        return torch.zeros(0, n, dtype=torch.int64, device=attn.device), []
    if score == "cls":
        sig = fixed_point(attn[:, :, 0, p:]).sum(dim=1)
        return sig, ["cls"] * b
    patch = fixed_point(attn[:, :, p:, p:])  # (B, H, N queries, N keys)
    col = patch.sum(dim=(1, 2))  # attention each token receives
    if score == "received":
        return col, ["col"] * b
    row = patch.sum(dim=(1, 3))  # attention each token pays
    use_col = focal_choice(col, row)
    sig = torch.where(use_col[:, None], col, row)
    return sig, ["col" if c else "row" for c in use_col.tolist()]


def significance(attn: torch.Tensor, score: str = "focal", num_prefix: int = 1) -> torch.Tensor:
    """Token significance, SPEC.md 'Significance'.

    attn: (B, H, Q, S) float16/bfloat16/float32/float64, S = num_prefix + N.
    Returns (B, N) int64 fixed-point sums.
    """
    return significance_and_choice(attn, score, num_prefix)[0]


def significance_from_parts(parts: torch.Tensor) -> torch.Tensor:
    """Significance from its parts, SPEC.md "Significance from q and k": parts (B, C, N) int64 ->
    (B, N) int64 contiguous, parts[:, 0] for C = 1, the focal choice between parts[:, 0] (column
    sums) and parts[:, 1] (row sums) for C = 2."""
    check_parts(parts)
    return _from_parts(parts)


def _from_parts(parts: torch.Tensor) -> torch.Tensor:
    if parts.shape[1] == 1:
        return parts[:, 0].clone(memory_format=torch.contiguous_format)
    col, row = parts[:, 0], parts[:, 1]
    return torch.where(focal_choice(col, row)[:, None], col, row).contiguous()


def _top_in_order(score: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the `count` largest entries per row, ties to the lower index, ascending."""
    # A stable descending sort keeps equal scores in index order, which is the tie-break rule.
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    return order[:, :count].sort(dim=1).values


def select(
    sig: torch.Tensor, keep: int, strategy: str = "rank", grid: tuple[int, int] | None = None
) -> torch.Tensor:
    """Kept token indices, SPEC.md 'Selection'.

    sig: (B, N) int64. Returns (B, keep) int64, strictly increasing in each row.
    """
    return select_checked(sig, keep, strategy, *check_select(sig, keep, strategy, grid))


def select_checked(sig: torch.Tensor, keep: int, strategy: str, rows: int, cols: int) -> torch.Tensor:
    """select() once its arguments are checked: (B, keep) int64 ascending, `rows` x `cols` the grid."""
    b = sig.shape[0]
    if strategy == "rank":
        return _top_in_order(sig, keep).contiguous()
    rowscore = sig.reshape(b, rows, cols).sum(dim=2)
    kept_rows = _top_in_order(rowscore, keep // cols)  # (B, r)
    x = torch.arange(cols, device=sig.device)
    return (kept_rows[:, :, None] * cols + x).reshape(b, keep).contiguous()


def gather_rows(tokens: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """pruned[b, k] = tokens[b, idx[b, k]]: (B, N, D), (B, K) -> (B, K, D) contiguous."""
    d = tokens.shape[2]
    return torch.gather(tokens, 1, idx[:, :, None].expand(-1, -1, d)).contiguous()


def prune_tokens(
    tokens: torch.Tensor,
    attn: torch.Tensor,
    keep: int,
    strategy: str = "rank",
    score: str = "focal",
    num_prefix: int = 1,
    grid: tuple[int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep `keep` tokens of each image in their original order.

    tokens: (B, N, D) float16/bfloat16/float32; attn: (B, H, Q, num_prefix + N).
    Returns pruned (B, keep, D) of tokens' dtype and idx (B, keep) int64.
    """
    rows, cols = check_prune(tokens, attn, keep, strategy, score, num_prefix, grid)
    with torch.no_grad():
        sig = _significance(attn, score, num_prefix)[0]
        idx = select_checked(sig, keep, strategy, rows, cols)
        return gather_rows(tokens, idx), idx


def retained_count(
    n_tokens: int, ratio: float, *, strategy: str = "rank", grid: tuple[int, int] | None = None
) -> int:
    """Tokens kept for `ratio` of `n_tokens`: rank floor(N * ratio), row floor(rows * ratio) * cols.

    Pure Python, so a serving engine knows the count before the encoder runs.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if strategy == "rank":
        return math.floor(n_tokens * ratio)
    if strategy != "row":
        raise ValueError(f"strategy must be 'rank' or 'row', got {strategy!r}")
    rows, cols = resolve_grid(n_tokens, grid, required=True)
    return math.floor(rows * ratio) * cols


def positions(
    idx: torch.Tensor, *, grid: tuple[int, int] | None = None, n_tokens: int | None = None
) -> torch.Tensor:
    """(row, col) of each kept token: idx (B, K) int64 -> (B, K, 2) int64, for 2-D / M-RoPE models.

    grid: (rows, cols) of the patch grid; None means square, as in every op. idx holds only the kept
    tokens, so a square grid needs N: pass n_tokens=N (it also checks a given grid: rows * cols == N).
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.dtype != torch.int64:
        raise ValueError("idx must be a (B, K) int64 tensor")
    if grid is None and n_tokens is None:
        raise ValueError("positions needs grid=(rows, cols), or n_tokens=N for grid=None (a square grid of N tokens)")
    if n_tokens is not None:
        rows, cols = resolve_grid(n_tokens, grid, required=True)
    elif len(grid) != 2 or any(not isinstance(v, int) or v <= 0 for v in grid):
        raise ValueError(f"grid must be two positive ints (rows, cols), got {tuple(grid)}")
    else:
        rows, cols = grid
    return torch.stack((idx // cols, idx % cols), dim=-1)


def prune_tokens_varlen(
    tokens: torch.Tensor,
    sig: torch.Tensor,
    cu_seqlens: torch.Tensor,
    keep: list[int],
    strategy: str = "rank",
    grids: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ragged batches, SPEC.md "Ragged batches": the dense selection looped over images.

    tokens (T, D), sig (T,) int64, cu_seqlens (B + 1,) int32/int64, keep B ints, grids None or
    [rows_0, cols_0, ...]. Returns pruned (sum(keep), D), idx (sum(keep),) int64 global indices and
    cu_seqlens_out (B + 1,) of cu_seqlens' dtype.
    """
    check_prune_varlen(tokens, sig, cu_seqlens, keep, strategy, grids)
    cu = cu_seqlens.tolist()  # the oracle may sync; the kernels do not
    parts = []
    with torch.no_grad():
        for b, kb in enumerate(keep):
            if cu[b + 1] == cu[b]:  # an empty image keeps nothing (its grid may be (0, cols))
                continue
            seg = sig[cu[b]:cu[b + 1]][None]
            grid = None if grids is None else (grids[2 * b], grids[2 * b + 1])
            rows, cols = check_select(seg, kb, strategy, grid)
            parts.append(select_checked(seg, kb, strategy, rows, cols)[0] + cu[b])
        idx = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=sig.device)
        out = torch.tensor([0] + list(itertools.accumulate(keep)), dtype=cu_seqlens.dtype, device=cu_seqlens.device)
        return tokens[idx].contiguous(), idx, out


def positions_varlen(
    idx: torch.Tensor, cu_seqlens: torch.Tensor, keep: list[int], *, grids: list[tuple[int, int]] | list[int]
) -> torch.Tensor:
    """(row, col) of each kept token of a ragged batch: idx (T',) global -> (T', 2) int64.

    keep and grids are the host lists given to prune_tokens_varlen (grids: B (rows, cols) pairs or the
    flat [rows_0, cols_0, ...]); only cu_seqlens is read on the device (no sync: the per-token image
    offsets are gathered there)."""
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError("idx must be a (T',) int64 tensor")
    grids = flat_grids(grids)
    if grids is None:
        raise ValueError("positions_varlen needs grids: B (rows, cols) pairs or [rows_0, cols_0, ...]")
    if len(grids) != 2 * len(keep) or sum(keep) != idx.shape[0]:
        raise ValueError(f"keep must sum to len(idx) = {idx.shape[0]} and grids hold 2 * len(keep) ints")
    image = torch.repeat_interleave(torch.arange(len(keep)), torch.tensor(keep, dtype=torch.int64)).to(idx.device)
    cols = torch.tensor(grids[1::2], dtype=torch.int64).to(idx.device)[image]
    local = idx - cu_seqlens.to(torch.int64)[image]
    return torch.stack((local // cols, local % cols), dim=-1)


def mrope_positions(idx: torch.Tensor, grid_thw, merge_size: int = 2) -> torch.Tensor:
    """(t, h, w) of each kept merged token of Qwen-VL images and videos, for M-RoPE position ids.

    idx: (T',) int64 global indices into the media's merged tokens packed in the model's order (media
    after media; within one, frame-major then row-major), as prune_tokens_varlen and
    prune_tokens_qk_varlen return them. grid_thw: (M, 3) host ints or tensor, (temporal patches, patch
    rows, patch cols) per image or video, as the processor's image_grid_thw / video_grid_thw. merge_size:
    patches merged per side into one language-model token (Qwen-VL: 2).
    Returns (3, T') int64, rows t, h, w: each token's coordinates in its media's merged grid (t = 0 for
    images), the layout of the models' (3, L) position ids before a media's start offset (and, for
    Qwen2.5-VL videos, its time interval on row t) is applied. No sync: only idx is read on its device.
    """
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype != torch.int64:
        raise ValueError("idx must be a (T',) int64 tensor")
    grids = torch.as_tensor(grid_thw).reshape(-1, 3).tolist()
    if any(t < 1 or h < 1 or w < 1 or h % merge_size or w % merge_size for t, h, w in grids):
        raise ValueError(f"grid_thw must hold positive (t, h, w) with h and w multiples of merge_size = {merge_size}, "
                         f"got {grids}")
    rows = [h // merge_size for _, h, _ in grids]
    cols = [w // merge_size for _, _, w in grids]
    sizes = [t * r * c for (t, _, _), r, c in zip(grids, rows, cols)]
    ends = torch.tensor(list(itertools.accumulate(sizes)), dtype=torch.int64).to(idx.device)
    media = torch.searchsorted(ends, idx, right=True).clamp(max=max(len(grids) - 1, 0))
    start = (ends - torch.tensor(sizes, dtype=torch.int64).to(idx.device))[media]
    r = torch.tensor(rows, dtype=torch.int64).to(idx.device)[media]
    c = torch.tensor(cols, dtype=torch.int64).to(idx.device)[media]
    local = idx - start
    return torch.stack((local // (r * c), local // c % r, local % c))
