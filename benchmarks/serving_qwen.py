"""Section 4 of the serving report: packed significance + prune (`prune_tokens_qk_varlen`) against one
Qwen2.5-VL-7B-shaped vision encoder block with random weights, on 8 images of mixed sizes packed in one
sequence (issue target: at most 10 % of the block's time).

The block is Qwen2.5-VL-7B's full-attention vision block written out here (hidden 1280, 16 heads of
d = 80, SiLU-gated MLP of 3420, RMSNorm, 2-D rotary q / k): RMSNorm, qkv Linear, rotary, attention per
image over the packed sequence, proj Linear, residual, RMSNorm, MLP, residual. Its attention is
FlashAttention varlen (torch.nn.attention.varlen.varlen_attn, which also returns the row log-sum-exp
the op can take as `lse`) where this torch has it on a GPU, else one SDPA call per image. The op scores
the block's own q / k (strided views of its qkv projection output, as the Qwen-VL adapters capture them)
and keeps a quarter of each image's merged tokens (2 x 2 patches: group 4, D = 3584 after the merger).
Without a GPU: tiny shapes, a smoke run that measures nothing.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as nnf

import fopru_kernels
from fopru_kernels import reference, reference_qk
from fopru_kernels.reference import FX_SCALE

from .reporting import fmt, md_table, progress_line, status_cell, timer_cell
from .serving_plan import Plan, QwenShape
from .serving_qk import sdpa_with_lse
from .timing import cache_bytes, error_text, measure, rotation_count

QWEN_TARGET_PCT = 10.0  # prune_tokens_qk_varlen as % of one encoder block
# (label, kind, lse): lse "attention" passes the block attention's own log-sum-exp, None leaves it to the op.
QWEN_VARIANTS = (
    ("focal/logit", "logit", None),
    ("focal/prob, lse given", "prob", "attention"),
    ("focal/prob, lse computed", "prob", None),
)


class VisionBlock(torch.nn.Module):
    """One full-attention block of Qwen2.5-VL's vision tower, random weights: x (T, hidden) packed images,
    cu (S + 1,) int32 image bounds on x's device -> (T, hidden). `qkv_of` exposes what the block attends with."""

    def __init__(self, shape: QwenShape):
        super().__init__()
        h, d = shape.heads, shape.hidden // shape.heads
        self.heads, self.head_dim, self.eps = h, d, 1e-6
        self.norm1 = torch.nn.Parameter(torch.ones(shape.hidden))
        self.norm2 = torch.nn.Parameter(torch.ones(shape.hidden))
        self.qkv = torch.nn.Linear(shape.hidden, 3 * shape.hidden)
        self.proj = torch.nn.Linear(shape.hidden, shape.hidden)
        self.gate = torch.nn.Linear(shape.hidden, shape.intermediate)
        self.up = torch.nn.Linear(shape.hidden, shape.intermediate)
        self.down = torch.nn.Linear(shape.intermediate, shape.hidden)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * w

    def qkv_of(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """(T, 3, H, d): q and k after the rotary embedding (cos, sin (T, d)), v."""
        qkv = self.qkv(self._norm(x, self.norm1)).view(x.shape[0], 3, self.heads, self.head_dim)
        half = self.head_dim // 2
        qk = qkv[:, :2]
        rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
        return torch.cat((qk * cos[:, None, None] + rotated * sin[:, None, None], qkv[:, 2:]), dim=1)

    def forward(self, x, cu, max_n: int, cos, sin):
        qkv = self.qkv_of(x, cos, sin)
        out = attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, max_n)[0]
        x = x + self.proj(out.reshape(x.shape))
        y = self._norm(x, self.norm2)
        return x + self.down(nnf.silu(self.gate(y)) * self.up(y))


def attention(q, k, v, cu: torch.Tensor, max_n: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Attention of each image with itself: q, k, v (T, H, d), cu (S + 1,) int32 -> (out (T, H, d), lse
    (H, T) float32 natural-log, which kernel ran). FlashAttention varlen on a GPU where torch has it (and
    returns lse as (H, T)), else one SDPA call per image."""
    if q.is_cuda:
        try:
            from torch.nn.attention.varlen import AuxRequest, varlen_attn

            out, lse = varlen_attn(q, k, v, cu, cu, max_n, max_n, return_aux=AuxRequest(lse=True))
            if lse.shape == (q.shape[1], q.shape[0]):
                return out, lse.float(), "FlashAttention varlen (torch.nn.attention.varlen)"
        except (ImportError, RuntimeError, TypeError, ValueError):
            pass
    outs, lses = [], []
    bounds = cu.tolist()
    for a, b in zip(bounds, bounds[1:]):
        o, lse, _ = sdpa_with_lse(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)))
        outs.append(o[0].transpose(0, 1))
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=1), "one SDPA call per image"


def rotary(shape: QwenShape, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (T, d) of Qwen-VL's 2-D rotary embedding: half the frequencies from each patch's row, half
    from its column (image by image, row-major)."""
    d = shape.hidden // shape.heads
    freqs = 1.0 / (10000 ** (torch.arange(0, d // 2, 2, dtype=torch.float32) / (d // 2)))
    pos = torch.cat([torch.cartesian_prod(torch.arange(r), torch.arange(c)) for r, c in shape.grids]).float()
    angles = torch.cat((pos[:, :1] * freqs, pos[:, 1:] * freqs), dim=-1)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


def qwen_sets(shape: QwenShape, block: VisionBlock, device: torch.device, dtype: torch.dtype):
    """(rotated input sets (x (T, hidden), tokens (T / group, D) merged tokens, q, k, v (T, H, d) strided
    views of the block's qkv output, lse (H, T) of its attention), cu (S + 1,) int32 image bounds, the
    rotary (cos, sin), which attention ran)."""
    sizes = shape.sizes
    t = sum(sizes)
    cu = torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device)
    cos, sin = rotary(shape, device, dtype)
    set_bytes = t * (shape.hidden * 2 * 4 + shape.merged_dim // shape.group * 2)
    sets = []
    for seed in range(rotation_count(set_bytes, cache_bytes(device), cap=4)):
        gen = torch.Generator(device=device).manual_seed(seed)
        x = torch.randn(t, shape.hidden, generator=gen, device=device, dtype=dtype)
        tokens = torch.randn(t // shape.group, shape.merged_dim, generator=gen, device=device, dtype=dtype)
        qkv = block.qkv_of(x, cos, sin)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        _, lse, source = attention(q, k, v, cu, max(sizes))
        sets.append((x, tokens, q, k, v, lse))
    return sets, cu, (cos, sin), source


def _prune(shape: QwenShape, cu, kind: str, lse_mode: str | None, backend: str):
    keep = shape.keeps

    def call(x, tokens, q, k, v, lse):
        return fopru_kernels.prune_tokens_qk_varlen(tokens, q, k, cu, keep, kind=kind, group=shape.group,
                                                    lse=lse if lse_mode else None, backend=backend)
    return call


def _agreement(shape: QwenShape, s: tuple, cu, kind: str, lse_mode: str | None, backend: str) -> dict:
    """The op against the float64 oracle on one set: max |sig - oracle| in value units (float rounding,
    not judged), and its kept indices against the exact selection of its own significance (judged)."""
    _, tokens, q, k, _, lse = s
    lse = lse if lse_mode else None
    sig = fopru_kernels.significance_qk_varlen(q, k, cu, kind=kind, lse=lse, group=shape.group, backend=backend)
    oracle = reference_qk.significance_qk_varlen(q, k, cu, "focal", None, lse, kind, shape.group)
    _, idx, _ = fopru_kernels.prune_tokens_qk_varlen(tokens, q, k, cu, shape.keeps, kind=kind, lse=lse,
                                                     group=shape.group, backend=backend)
    want = reference.prune_tokens_varlen(tokens.cpu(), sig.cpu(), cu.cpu() // shape.group, shape.keeps)[1]
    rec = {"sig_max_err": float((sig.cpu() - oracle.cpu()).abs().max()) / FX_SCALE}
    if not torch.equal(idx.cpu(), want):
        rec["agreement_error"] = "idx is not the exact selection of the op's own significance"
    return rec


def bench_qwen(plan: Plan, device: torch.device, backends: list[str]) -> dict:
    """Section 4: the block, its attention, and prune_tokens_qk_varlen per variant and backend."""
    shape = plan.qwen
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    block = VisionBlock(shape).to(device, dtype).eval()
    sets, cu, (cos, sin), source = qwen_sets(shape, block, device, dtype)
    max_n = max(shape.sizes)
    result = {
        "sizes": shape.sizes, "grids": [list(g) for g in shape.grids], "keeps": shape.keeps, "hidden": shape.hidden,
        "heads": shape.heads, "head_dim": shape.hidden // shape.heads, "intermediate": shape.intermediate,
        "group": shape.group, "D": shape.merged_dim, "dtype": str(dtype).removeprefix("torch."), "sets": len(sets),
        "attention": source, "records": [],
    }
    result["block"] = measure(lambda x, *rest: block(x, cu, max_n, cos, sin), sets, device, plan.timing)
    result["attn"] = measure(lambda x, t, q, k, v, lse: attention(q, k, v, cu, max_n)[0], sets, device, plan.timing)
    print(f"qwen block {timer_cell(result['block'])} us, attention {timer_cell(result['attn'])} us", flush=True)
    for label, kind, lse_mode in QWEN_VARIANTS:
        for backend in backends:
            rec: dict = {"variant": label, "backend": backend}
            try:
                rec.update(_agreement(shape, sets[0], cu, kind, lse_mode, backend))
            except Exception as e:
                rec["agreement_error"] = error_text(e)
            try:
                rec.update(measure(_prune(shape, cu, kind, lse_mode, backend), sets, device, plan.timing))
                rec["pct_block"] = 100.0 * rec["us"] / result["block"]["us"]
                rec["pct_attention"] = 100.0 * rec["us"] / result["attn"]["us"]
            except Exception as e:  # one failing variant must not end the report
                rec["error"] = error_text(e)
            result["records"].append(rec)
            print(_progress(rec), flush=True)
    return result


def _progress(rec: dict) -> str:
    return progress_line(f"qwen {rec['variant']:<26} {rec['backend']:<9}", rec,
                         lambda r: f"{r['us']:10.1f} us ({r['timer']}) {r['pct_block']:6.1f}% of the block")


def qwen_markdown(res: dict, gpu: bool) -> list[str]:
    lines = [
        "## 4. Packed q/k: Qwen2.5-VL-7B-shaped encoder block, 8 images", "",
        (f"{len(res['sizes'])} images of {res['sizes']} patches (grids {res['grids']}) packed in one sequence; one "
         f"full-attention vision block (hidden {res['hidden']}, {res['heads']} heads of d={res['head_dim']}, MLP "
         f"{res['intermediate']}, random {res['dtype']} weights; attention: {res['attention']}). "
         f"`prune_tokens_qk_varlen` on the block's q / k (strided views of its qkv output), group {res['group']}, "
         f"focal, rank, keep {res['keeps']} merged tokens (a quarter) of D={res['D']}; % = op time / the block's "
         "time. Oracle column: max |sig - reference_qk| in value units (float rounding; the kept indices are checked "
         "exact against the op's own significance)."), "",
        f"- block: {timer_cell(res['block'])} µs ({res['block'].get('timer', '')}); its attention alone: "
        f"{timer_cell(res['attn'])} µs", "",
    ]
    rows = []
    for r in res["records"]:
        rows.append([r["variant"], r["backend"], timer_cell(r), r.get("timer", r.get("error", "")),
                     fmt(r.get("pct_block"), ".1f"), f"< {QWEN_TARGET_PCT:g}%",
                     status_cell(r.get("pct_block"), QWEN_TARGET_PCT, gpu), fmt(r.get("pct_attention"), ".1f"),
                     fmt(r.get("sig_max_err"), ".1e")])
    lines += md_table(["variant", "backend", "µs", "timer", "% block", "target", "status", "% attention",
                       "sig err"], rows)
    return lines

