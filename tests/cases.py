"""The one builder of test inputs, shared by every backend's tests so each backend is checked on the
same cases: Case / make_inputs (the map path: significance, select, prune_tokens), QKCase / make_qk
(the dense q/k path), Batch / make_batch (ragged batches: prune_tokens_varlen), the layouts they all
use (lay_out), the map-path grid (grid_cases) and one small call of every op (op_calls).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, replace

import torch

ATTN_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TOKEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Changeable:
    """with_(**changes): a copy of the case with some options changed."""

    def with_(self, **kw):
        return replace(self, **kw)


class _OneGrid(_Changeable):
    """A case of images of N tokens each on an optional (rows, cols) grid, None meaning square."""

    @property
    def cols(self) -> int:
        if self.grid is not None:
            return self.grid[1]
        r = math.isqrt(self.N)
        return r if r * r == self.N else self.N


# ----------------------------------------------------------------------------- the map path


@dataclass(frozen=True)
class Case(_OneGrid):
    """One prune_tokens call: shapes, options and how the inputs are laid out and filled."""

    B: int = 2
    N: int = 16
    H: int = 2
    D: int = 8
    keep: int = 4
    strategy: str = "rank"
    score: str = "focal"
    P: int = 1
    grid: tuple[int, int] | None = None
    attn_dtype: torch.dtype = torch.float32
    tok_dtype: torch.dtype = torch.float16
    layout: str = "contiguous"  # contiguous | strided | expanded | padded
    values: str = "softmax"  # softmax | logits | quantised | special (NaN/inf/huge) | saturated | symmetric
    seed: int = 0

    def id(self) -> str:
        dt = str(self.attn_dtype).replace("torch.", "")
        tt = str(self.tok_dtype).replace("torch.", "")
        return (
            f"B{self.B}-N{self.N}-H{self.H}-D{self.D}-k{self.keep}-{self.strategy}-{self.score}-P{self.P}"
            f"-g{self.grid}-{dt}-{tt}-{self.layout}-{self.values}-s{self.seed}"
        ).replace(" ", "")


def _attn_values(c: Case, q: int, s: int, gen: torch.Generator) -> torch.Tensor:
    shape = (c.B, c.H, q, s)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 3
    if c.values == "softmax":
        return x.softmax(-1)
    if c.values == "logits":
        return x
    if c.values == "quantised":  # few distinct values: heavy ties in every sum
        return (x.softmax(-1) * 8).round() / 8
    if c.values == "special":
        flat = x.flatten()
        if flat.numel() == 0:
            return x
        pick = torch.randint(0, flat.numel(), (max(1, flat.numel() // 10),), generator=gen)
        specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e6, -1e6, 300.0], dtype=torch.float64)
        flat[pick] = specials[torch.randint(0, len(specials), pick.shape, generator=gen)]
        return flat.reshape(shape)
    if c.values == "saturated":  # nearly every value clamps to 256: column and row sums all but tie
        return x.abs() * 1e6
    if c.values == "symmetric":  # focal near-tie: patch column sums a permutation of the row sums
        if q != s:
            return x
        x = x + x.transpose(-1, -2)  # patch block symmetric: column sums = row sums
        keys = c.P + torch.randperm(c.N, generator=gen)
        return torch.cat([x[..., :c.P], x[..., keys]], dim=-1)  # the same shuffle of every head's keys
    raise ValueError(c.values)


def lay_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, different strides: the kernels must not assume contiguity."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "transposed":  # the last two dims column-major: a (T, D) matrix of stride (1, T)
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided":  # every second element of a wider buffer, innermost dim included
        big = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "expanded":  # batch dim of stride 0 (one image repeated)
        return t[:1].expand(t.shape)
    if layout == "padded":  # rows padded to 16 elements: aligned rows, a partial vector at the end
        s = t.shape[-1]
        big = torch.zeros(*t.shape[:-1], (s + 15) // 16 * 16, dtype=t.dtype, device=t.device)
        big[..., :s] = t
        return big[..., :s]
    raise ValueError(layout)


def make_inputs(c: Case, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """tokens (B, N, D) and attn (B, H, Q, S) for case c; Q = 1 for 'cls' (CLS row only)."""
    gen = torch.Generator().manual_seed(c.seed)
    s = c.P + c.N
    q = 1 if c.score == "cls" else s
    attn = _attn_values(c, q, s, gen).to(c.attn_dtype)
    tokens = torch.randn(c.B, c.N, c.D, generator=gen).to(c.tok_dtype)
    # Lay out on the target device: Tensor.to() would make strided/expanded inputs contiguous.
    return lay_out(tokens.to(device), c.layout), lay_out(attn.to(device), c.layout)


def grid_cases(sizes=(1, 2, 16, 575, 576, 577, 2880), small: bool = False) -> list[Case]:
    """The test grid every backend runs: sizes, scores, strategies, dtypes, layouts, values, keeps.

    small=True keeps each case cheap (interpreter runs): fewer heads, tiny D and only the CLS row
    for large N.
    """
    grids = {1: (1, 1), 2: (1, 2), 16: (4, 4), 575: (23, 25), 576: (24, 24), 577: (1, 577), 2880: (48, 60)}
    cases = []
    for i, n in enumerate(sizes):
        g = grids[n]
        for j, score in enumerate(("cls", "received", "focal")):
            if small and n > 600 and score != "cls":
                continue
            h = 2 if small or n > 600 else 4
            for strategy in ("rank", "row"):
                cols = g[1]
                for keep in sorted({0, min(1, n), n // 4, n}):
                    if strategy == "row":
                        keep = keep // cols * cols
                    k = i * 7 + j * 3 + keep  # spread dtypes/layouts/values/prefixes over the grid
                    cases.append(
                        Case(
                            B=2 if n > 600 else 3,
                            N=n,
                            H=h,
                            D=4 if small else 8,
                            keep=keep,
                            strategy=strategy,
                            score=score,
                            P=(1, 5, 0)[k % 3] if score != "cls" else (1, 5)[k % 2],
                            grid=g if (strategy == "row" or k % 2) else None if n in (1, 16, 576) else g,
                            attn_dtype=ATTN_DTYPES[k % 4],
                            tok_dtype=TOKEN_DTYPES[k % 3],
                            layout=("contiguous", "strided", "expanded")[(k // 2) % 3],
                            values=("softmax", "logits", "quantised", "special")[(k // 3) % 4],
                            seed=k,
                        )
                    )
    return list({c.id(): c for c in cases}.values())


# ----------------------------------------------------------------------------- the dense q/k path


@dataclass(frozen=True)
class QKCase(_OneGrid):
    """One prune_tokens_qk call: shapes, options, and how q / k / lse are laid out and filled."""

    B: int = 2
    N: int = 16
    H: int = 2
    d: int = 16
    P: int = 1
    keep: int = 4
    strategy: str = "rank"
    score: str = "focal"
    kind: str = "prob"
    layout: str = "bhsd"
    dtype: torch.dtype = torch.float16
    grid: tuple[int, int] | None = None
    strided: bool = False  # q, k (and a given lse) read from every second element of a wider buffer
    given_lse: bool = False  # prob: pass the float32 lse, as SDPA returns it, instead of None
    scale: float | None = None
    magnitude: float = 1.0  # std of q and k; 12 drives logits past fx's +-256 clamp
    seed: int = 0

    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        return (
            f"B{self.B}-N{self.N}-H{self.H}-d{self.d}-P{self.P}-k{self.keep}-{self.strategy}-{self.score}"
            f"-{self.kind}-{self.layout}-{dt}-g{self.grid}{'-strided' if self.strided else ''}"
            f"{'-lse' if self.given_lse else ''}-sc{self.scale}-m{self.magnitude}-s{self.seed}"
        ).replace(" ", "")


def make_qk(c: QKCase, device: str | torch.device = "cpu"):
    """tokens (B, N, D=8) float16, q, k (B, H, S, d) or (B, S, H, d) per c.layout, S = P + N, and lse
    (B, H, S) float32 (c.given_lse: the exact logsumexp of the scaled logits) or None."""
    gen = torch.Generator().manual_seed(c.seed)
    s = c.P + c.N
    q, k = (torch.randn(c.B, c.H, s, c.d, generator=gen, dtype=torch.float64) * c.magnitude for _ in range(2))
    q, k = q.to(c.dtype), k.to(c.dtype)
    tokens = torch.randn(c.B, c.N, 8, generator=gen).to(torch.float16)
    lse = None
    if c.given_lse:
        scale = c.scale if c.scale is not None else c.d**-0.5
        lse = torch.logsumexp(scale * (q.double() @ k.double().transpose(-1, -2)), dim=-1).float()
        if c.strided:
            lse = lay_out(lse.to(device), "strided")
    if c.layout == "bshd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    layout = "strided" if c.strided else "contiguous"
    q, k = lay_out(q.to(device), layout), lay_out(k.to(device), layout)
    return tokens.to(device), q, k, None if lse is None else lse.to(device)


# ----------------------------------------------------------------------------- ragged batches


@dataclass(frozen=True)
class Batch(_Changeable):
    """One packed batch: image sizes n_b, keep per image, grids (flat, or None) and layouts."""

    sizes: tuple[int, ...]
    keep: tuple[int, ...]
    strategy: str = "rank"
    grids: tuple[int, ...] | None = None
    D: int = 8
    tok_dtype: torch.dtype = torch.float16
    cu_dtype: torch.dtype = torch.int32
    layout: str = "contiguous"  # contiguous | strided | padded | transposed (tokens); sig strided unless contiguous
    values: str = "wide"  # wide | quantised (heavy ties)
    seed: int = 0

    def id(self) -> str:
        dt = str(self.tok_dtype).replace("torch.", "")
        ct = str(self.cu_dtype).replace("torch.", "")
        sizes = "x".join(map(str, self.sizes)) if len(self.sizes) < 8 else f"{len(self.sizes)}imgs"
        return f"{self.strategy}-n{sizes}-k{sum(self.keep)}-{dt}-{ct}-{self.layout}-{self.values}-s{self.seed}"


def row_batch(grids: list[tuple[int, int]], keep_rows: list[int], **kw) -> Batch:
    """A 'row' batch: one image per (rows, cols) grid, keeping keep_rows[b] whole rows of image b."""
    return Batch(sizes=tuple(r * c for r, c in grids), keep=tuple(k * c for k, (_, c) in zip(keep_rows, grids)),
                 strategy="row", grids=tuple(v for g in grids for v in g), **kw)


def make_batch(c: Batch, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokens (T, D), sig (T,) int64 and cu_seqlens (B + 1,) for batch c, laid out on device."""
    gen = torch.Generator().manual_seed(c.seed)
    t = sum(c.sizes)
    tokens = torch.randn(t, c.D, generator=gen).to(c.tok_dtype)
    if c.values == "quantised":
        sig = torch.randint(0, 3, (t,), generator=gen)
    else:  # wide range, kept small enough for row sums of up to 2^10 values to stay in int64
        bound = 2**62 if c.strategy == "rank" else 2**52
        sig = torch.randint(-bound, bound, (t,), generator=gen, dtype=torch.int64)
    cu = torch.tensor([0, *itertools.accumulate(c.sizes)], dtype=c.cu_dtype)
    sig_layout = "contiguous" if c.layout == "contiguous" else "strided"
    return lay_out(tokens.to(device), c.layout), lay_out(sig.to(device), sig_layout), cu.to(device)


# ----------------------------------------------------------------------------- every op


def op_calls(device: str | torch.device = "cpu") -> dict[str, tuple]:
    """One small valid call of every torch.ops.fopru op: its arguments, positional in schema order.
    Tests of which kernel serves an op iterate over it, so an op added without an entry here fails them."""
    tokens, attn = make_inputs(Case(B=2, N=16, H=2, D=4, keep=5, score="focal", values="logits"), device)
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 2, 17, 8, generator=gen).to(device) for _ in range(2))
    sig = torch.randint(-(2**40), 2**40, (2, 16), generator=gen).to(device)
    cu = torch.tensor([0, 6, 16], device=device)
    pq, pk = (torch.randn(24, 2, 8, generator=gen).to(device) for _ in range(2))  # packed (T, H, d)
    pcu = torch.tensor([0, 8, 24], device=device)
    return {
        "significance": (attn, "focal", 1),
        "select": (sig, 8, "row", [4, 4]),
        "prune_tokens": (tokens, attn, 5, "rank", "focal", 1, None),
        "significance_qk": (q, k, "focal", 1, None, None, "logit", "bhsd"),
        "prune_tokens_qk": (tokens, q, k, 8, "row", "received", 1, [4, 4], None, None, "prob", "bhsd"),
        "prune_tokens_varlen": (tokens[0], sig[0], cu, [3, 4], "rank", None),
        "significance_qk_parts": (q, k, "focal", 1, None, None, "logit", "bhsd"),
        "significance_from_parts": (torch.stack((sig, sig.flip(1)), dim=1),),
        "significance_qk_varlen": (pq, pk, pcu, "focal", None, None, "logit", 4),
        "prune_tokens_qk_varlen": (tokens[0, :6], pq, pk, pcu, [2, 3], "rank", "focal", None, None, "prob", 4, None,
                                   None),
    }
