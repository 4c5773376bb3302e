"""`python -m fopru_kernels.bench_serving --out DIR [--quick]`: the serving benchmarks of issues 5 and 6.

Writes DIR/serving.md (one table per benchmark, targets marked met / not met) and DIR/serving.json
(every number), rewritten after each section so a run cut short by a timeout still leaves a report.

1. q/k path (issue 5): `significance_qk` / `prune_tokens_qk` at LLaVA-1.5 shape (H=16, S=577, d=64,
   fp16, D=1024, keep 144) as a share of ONE `scaled_dot_product_attention` call of that layer, per
   backend; peak memory of the q/k path against the output_attentions-style map path.
2. varlen (issue 6): `prune_tokens_varlen` on 8 images of mixed sizes against one dense
   `select` + gather of the same total size (and the per-image loop engines run today).
3. LLaVA end to end (issue 6): a LLaVA-1.5-7B-shaped model with random fp16 weights, time to first
   token at several `keep` through the transformers adapter, and the share of it spent pruning.

On a GPU every op is timed as a replayed CUDA graph (GPU µs per call; per-call CUDA events where
capture fails) with inputs rotated over enough sets to overflow L2, using the timers of
`fopru_kernels.bench`. Without a GPU the same code runs with tiny shapes and a host timer: a smoke
run that proves the code paths, not a measurement.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as nnf

import fopru_kernels

from . import reference_qk
from .bench import (
    cache_bytes,
    copy_bandwidth,
    dtype_name,
    eager_loop_us,
    environment,
    error_text,
    estimate_s,
    graph_us,
    rotation_count,
    sync,
    time_cuda_us,
    time_host_us,
)
from .reference import FX_SCALE

SECTIONS = ("qk", "varlen", "llava")
# (label, score, kind, lse): lse "sdpa" passes the attention's own log-sum-exp, "computed" leaves it to the op.
QK_VARIANTS = (
    ("cls/prob", "cls", "prob", None),
    ("focal/logit", "focal", "logit", None),
    ("received/prob, lse given", "received", "prob", "sdpa"),
    ("received/prob, lse computed", "received", "prob", "computed"),
)
QK_TARGET_PCT = {"cls/prob": 5.0, "focal/logit": 5.0, "received/prob, lse given": 60.0, "received/prob, lse computed": 60.0}
VARLEN_TARGET_RATIO = 1.3
SERVING_OPS = ("significance_qk", "prune_tokens_qk", "prune_tokens_varlen", "select")
LLAVA_TARGET_SHARE_PCT = 0.5  # pruning share of time to first token at B=1
LLAVA_SCORE, LLAVA_KIND, LLAVA_STRATEGY = "focal", "logit", "rank"  # FoPru's own scoring


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True)
class QKShape:
    """One encoder layer: q, k, v (B, H, S, d), tokens (B, S - P, D); keep K of the S - P patches."""

    batches: tuple[int, ...]
    H: int = 16
    S: int = 577
    d: int = 64
    D: int = 1024
    keep: int = 144
    num_prefix: int = 1


@dataclass(frozen=True)
class VarlenShape:
    """B packed images with patch grids `grids`, each keeping rows // 4 of its grid rows (25%);
    the dense comparison is one (B, rows * cols) batch of the same total, grid `dense_grid`."""

    grids: tuple[tuple[int, int], ...]
    dense_grid: tuple[int, int]
    D: int = 1024

    @property
    def sizes(self) -> list[int]:
        return [r * c for r, c in self.grids]

    @property
    def keeps(self) -> list[int]:
        return [(r // 4) * c for r, c in self.grids]

    @property
    def dense_keep(self) -> int:
        return (self.dense_grid[0] // 4) * self.dense_grid[1]


@dataclass(frozen=True)
class LlavaShape:
    """LLaVA-1.5 built from a config in code (random weights): CLIP tower + Llama language model."""

    vision: dict
    text: dict
    image_token_id: int
    batches: tuple[int, ...]
    keeps: tuple[int, ...]
    text_tokens: int = 48  # prompt tokens besides the image placeholders (LLaVA-1.5 template + question)
    warmup: int = 2
    reps: int = 5


@dataclass(frozen=True)
class Timing:
    target_s: float  # timed work per measurement
    min_reps: int
    max_reps: int
    graph_replays: int  # 0: no CUDA graph


@dataclass(frozen=True)
class Plan:
    qk: QKShape
    varlen: VarlenShape
    llava: LlavaShape
    timing: Timing
    copy_bytes: int


LLAVA_15_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAVA_15_TEXT = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    pad_token_id=32001, bos_token_id=1, eos_token_id=2,
)
# 4 LLaVA tiles of 576 and dynamic-resolution images of 256..2304 patches; 6144 = 8 x (24 x 32) in all.
VARLEN_GRIDS = ((24, 24), (16, 16), (24, 24), (48, 48), (24, 24), (32, 32), (24, 24), (16, 16))


def gpu_plan(quick: bool) -> Plan:
    """LLaVA-1.5 shapes. Full: q/k at B 1 and 32, LLaVA at B 1 and 8 with keep 576/288/144/64.
    --quick: q/k at B=32 (where the targets are), LLaVA at B=1 with keep 576/144, fewer repeats."""
    return Plan(
        qk=QKShape(batches=(32,) if quick else (1, 32)),
        varlen=VarlenShape(grids=VARLEN_GRIDS, dense_grid=(24, 32)),
        llava=LlavaShape(
            vision=LLAVA_15_VISION, text=LLAVA_15_TEXT, image_token_id=32000,
            batches=(1,) if quick else (1, 8), keeps=(576, 144) if quick else (576, 288, 144, 64),
            reps=3 if quick else 5,
        ),
        timing=Timing(0.02 if quick else 0.05, 10, 200, 3 if quick else 5),
        copy_bytes=1 << 30,
    )


def tiny_plan(quick: bool) -> Plan:
    """Shapes small enough for the reference and the tiny model on a CPU: exercises every path."""
    return Plan(
        qk=QKShape(batches=(2,) if quick else (1, 2), H=2, S=17, d=8, D=16, keep=4),
        varlen=VarlenShape(grids=tuple((r // 2, c // 2) for r, c in VARLEN_GRIDS), dense_grid=(12, 16), D=16),
        llava=LlavaShape(
            vision=dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_hidden_layers=3),
            text=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            image_token_id=63, batches=(1,) if quick else (1, 2), keeps=(16, 4) if quick else (16, 8, 4, 2),
            text_tokens=8, warmup=1, reps=2,
        ),
        timing=Timing(0.01, 2, 3, 0),
        copy_bytes=8 << 20,
    )


def plan_for(device: torch.device, quick: bool) -> Plan:
    return gpu_plan(quick) if device.type == "cuda" else tiny_plan(quick)


def backends_for(device: torch.device) -> list[str]:
    """The fused backends timed on `device`: CUDA C++ and Triton on a GPU; the C++ CPU op (or the
    reference without the compiled library) on a CPU."""
    if device.type == "cuda":
        have = fopru_kernels.available_backends(device)
        return [b for b in ("cuda", "triton") if b in have]
    return ["cpu"] if fopru_kernels.HAS_LIBRARY else ["reference"]


def kernel_origin(op: str, device: torch.device) -> str:
    """'C++' or 'Python' (the reference on CPU, the Triton launcher on CUDA): which registration serves
    torch.ops.fopru.<op> on `device`, so a 'cuda' row without a C++ CUDA kernel is labelled as such."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    line = next((ln for ln in torch._C._dispatch_dump(f"fopru::{op}").splitlines() if ln.startswith(f"{key}:")), "")
    if not line:
        return "none"
    return "Python" if ".py:" in line.split("::")[0] else "C++"


# ---------------------------------------------------------------------------------------- timing
Call = Callable[..., object]


def measure(call: Call, sets: list[tuple], device: torch.device, timing: Timing) -> dict:
    """Times call(*set) over rotated sets: {'us' (the headline: graph GPU µs per call, else the
    per-call events / host median), 'timer', 'eager_us', 'graph_us' | 'graph_error', 'reps', 'first_call_s'}."""
    t0 = time.perf_counter()
    call(*sets[0])  # first call: Triton JIT happens here
    sync(device)
    rec: dict = {"first_call_s": time.perf_counter() - t0}
    est = estimate_s(call, sets, device)
    reps = int(min(timing.max_reps, max(timing.min_reps, timing.target_s / max(est, 1e-7))))
    rec["reps"] = reps
    if device.type != "cuda":
        rec["eager_us"] = rec["us"] = time_host_us(call, sets, reps)
        rec["timer"] = "host"
        return rec
    for s in sets[: min(len(sets), reps)]:  # warm every set once
        call(*s)
    rec["eager_us"] = time_cuda_us(call, sets, reps)
    rec["us"], rec["timer"] = rec["eager_us"], "events"
    if timing.graph_replays:
        try:
            rec["graph_us"] = graph_us(call, sets, timing.graph_replays)
            rec["us"], rec["timer"] = rec["graph_us"], "graph"
        except Exception as e:  # not capturable: the per-call events stand
            rec["graph_error"] = error_text(e)
    return rec


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated bytes above the current allocation while fn() runs (outputs included);
    None without a GPU (the CPU allocator keeps no peak)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


# ------------------------------------------------------------------------------- 1. q/k path
def sdpa_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(out (B, H, S, d), lse (B, H, S) float32 natural-log, source) from the attention kernels that
    return the row log-sum-exp; a float32 logsumexp of the materialised logits where none does."""
    s = q.shape[2]
    if q.device.type == "cuda":
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)
            return out[0], out[1].float().contiguous(), "flash attention"
        except RuntimeError:
            pass
        try:  # the efficient kernel pads lse to a multiple of 32 rows
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)
            return out[0], out[1][..., :s].float().contiguous(), "memory-efficient attention"
        except RuntimeError:
            pass
    else:
        try:
            out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
            return out[0], out[1].float().contiguous(), "flash attention (CPU)"
        except RuntimeError:
            pass
    logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return nnf.scaled_dot_product_attention(q, k, v), torch.logsumexp(logits, -1), "logsumexp of the materialised map"


def qk_sets(shape: QKShape, b: int, device: torch.device) -> tuple[list[tuple], str]:
    """Rotated input sets (tokens (B, N, D), q, k, v (B, H, S, d), lse (B, H, S)) and the lse source."""
    n = shape.S - shape.num_prefix
    set_bytes = 2 * (b * n * shape.D + 3 * b * shape.H * shape.S * shape.d)
    sets, source = [], ""
    for seed in range(rotation_count(set_bytes, cache_bytes(device))):
        gen = torch.Generator(device=device).manual_seed(seed)
        tokens = torch.randn(b, n, shape.D, generator=gen, device=device, dtype=torch.float16)
        q, k, v = (
            torch.randn(b, shape.H, shape.S, shape.d, generator=gen, device=device, dtype=torch.float16)
            for _ in range(3)
        )
        _, lse, source = sdpa_with_lse(q, k, v)
        sets.append((tokens, q, k, v, lse))
    return sets, source


def _qk_call(op: str, shape: QKShape, score: str, kind: str, lse_mode: str | None, backend: str) -> Call:
    """call(tokens, q, k, v, lse) running one q/k op variant on one backend."""
    p, keep = shape.num_prefix, shape.keep
    if op == "significance_qk":
        return lambda t, q, k, v, lse: fopru_kernels.significance_qk(
            q, k, score=score, num_prefix=p, lse=lse if lse_mode == "sdpa" else None, kind=kind, backend=backend
        )
    return lambda t, q, k, v, lse: fopru_kernels.prune_tokens_qk(
        t, q, k, keep, strategy="rank", score=score, num_prefix=p, lse=lse if lse_mode == "sdpa" else None, kind=kind,
        backend=backend
    )


def lse_error(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor) -> float:
    """Max |lse - logsumexp| over image 0 against float64 logits: catches a wrong convention (log2, padding)."""
    logits = (q[0].double() @ k[0].double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return float((lse[0].double() - torch.logsumexp(logits, -1)).abs().max())


def _oracle(shape: QKShape, s: tuple, score: str, kind: str, lse_mode: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sig, idx) of the float64 oracle on one set."""
    tokens, q, k, _, lse = s
    lse = lse if lse_mode == "sdpa" else None
    sig = reference_qk.significance_qk(q, k, score, shape.num_prefix, None, lse, kind)
    _, idx = reference_qk.prune_tokens_qk(tokens, q, k, shape.keep, "rank", score, shape.num_prefix, None, None, lse, kind)
    return sig, idx


def _agreement(shape: QKShape, s: tuple, score: str, kind: str, lse_mode: str | None, backend: str,
               oracle: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """The op against the oracle on one set: max |sig - oracle| in value units, and the share of images
    whose kept indices are the oracle's (not judged: they may differ where the margin is below the error)."""
    tokens, q, k, _, lse = s
    lse = lse if lse_mode == "sdpa" else None
    p = shape.num_prefix
    got = fopru_kernels.significance_qk(q, k, score=score, num_prefix=p, lse=lse, kind=kind, backend=backend)
    _, idx = fopru_kernels.prune_tokens_qk(tokens, q, k, shape.keep, strategy="rank", score=score, num_prefix=p, lse=lse,
                                           kind=kind, backend=backend)
    return {
        "sig_max_err": float((got - oracle[0]).abs().max()) / FX_SCALE,
        "idx_rows_equal_oracle": float((idx == oracle[1]).all(dim=1).double().mean()),
    }


def eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What transformers' eager attention does under output_attentions=True: (out, logits, probs),
    logits and probabilities materialised (B, H, S, S) in the input dtype, softmax in float32."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v), logits, probs


def _map_layer(s: tuple, keep: int, score: str, kind: str, p: int):
    """The map path of one layer: eager attention, then prune_tokens on the materialised map."""
    tokens, q, k, v, _ = s
    o, logits, probs = eager_attention(q, k, v)
    return o, fopru_kernels.prune_tokens(tokens, logits if kind == "logit" else probs, keep, strategy="rank", score=score,
                                         num_prefix=p)


def _qk_layer(s: tuple, keep: int, score: str, kind: str, lse_mode: str | None, p: int, backend: str, attention: bool):
    """The q/k path of one layer: SDPA (with its lse where the variant takes it; skipped unless
    `attention`, which leaves the op alone), then prune_tokens_qk."""
    tokens, q, k, v, lse = s
    o = None
    if attention and lse_mode == "sdpa":
        o, lse, _ = sdpa_with_lse(q, k, v)
    elif attention:
        o = nnf.scaled_dot_product_attention(q, k, v)
    lse = lse if lse_mode == "sdpa" else None
    return o, fopru_kernels.prune_tokens_qk(tokens, q, k, keep, strategy="rank", score=score, num_prefix=p, lse=lse, kind=kind,
                                            backend=backend)


def qk_memory(shape: QKShape, s: tuple, backends: list[str], device: torch.device) -> dict:
    """Peak bytes of one layer's attention + pruning: map path (eager attention, map materialised,
    prune_tokens on it) against q/k path (SDPA, prune_tokens_qk), per variant and backend."""
    b, keep, p = s[1].shape[0], shape.keep, shape.num_prefix
    square = b * shape.H * shape.S * shape.S * 2
    out: dict = {"B": b, "square_map_bytes": square, "rows": []}
    for label, score, kind, lse_mode in QK_VARIANTS:
        map_peak = peak_bytes(partial(_map_layer, s, keep, score, kind, p), device)
        for backend in backends:
            row = {
                "variant": label, "backend": backend, "map_path_bytes": map_peak,
                "qk_layer_bytes": peak_bytes(partial(_qk_layer, s, keep, score, kind, lse_mode, p, backend, True), device),
                "qk_op_bytes": peak_bytes(partial(_qk_layer, s, keep, score, kind, lse_mode, p, backend, False), device),
            }
            if map_peak is not None:
                row["saved_bytes"] = map_peak - row["qk_layer_bytes"]
                row["no_square_buffer"] = row["qk_layer_bytes"] < square and row["qk_op_bytes"] < square
            out["rows"].append(row)
    return out


def bench_qk(plan: Plan, device: torch.device, backends: list[str]) -> dict:
    """Section 1: q/k ops as % of one SDPA call, and the memory of the two paths."""
    shape, result = plan.qk, {"shape": asdict(plan.qk), "records": [], "memory": [], "notes": []}
    for b in shape.batches:
        sets, source = qk_sets(shape, b, device)
        result["lse_source"] = source
        if b == shape.batches[0]:
            result["lse_max_err"] = lse_error(*[sets[0][i] for i in (1, 2, 4)])
        sdpa = measure(lambda t, q, k, v, lse: nnf.scaled_dot_product_attention(q, k, v), sets, device, plan.timing)
        result["records"].append(dict(sdpa, B=b, op="sdpa", variant="", backend="torch", sets=len(sets)))
        print(f"qk B={b:<3} sdpa {sdpa['us']:10.1f} us ({sdpa['timer']})", flush=True)
        for label, score, kind, lse_mode in QK_VARIANTS:
            oracle = _oracle(shape, sets[0], score, kind, lse_mode)
            for backend in backends:
                check: dict = {}
                try:
                    check = _agreement(shape, sets[0], score, kind, lse_mode, backend, oracle)
                except Exception as e:
                    check = {"agreement_error": error_text(e)}
                for op in ("significance_qk", "prune_tokens_qk"):
                    rec = dict(B=b, op=op, variant=label, backend=backend, sets=len(sets), **check)
                    try:
                        rec.update(measure(_qk_call(op, shape, score, kind, lse_mode, backend), sets, device, plan.timing))
                        rec["pct_sdpa"] = 100.0 * rec["us"] / sdpa["us"]
                    except Exception as e:  # one failing variant must not end the report
                        rec["error"] = error_text(e)
                    result["records"].append(rec)
                    print(_qk_progress(rec), flush=True)
        try:
            result["memory"].append(qk_memory(shape, sets[0], backends, device))
        except Exception as e:
            result["notes"].append(f"memory at B={b} not measured: {error_text(e)}")
        del sets
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if source != "flash attention" and device.type == "cuda":
        result["notes"].append(f"lse from {source}, not flash attention")
    return result


def _qk_progress(rec: dict) -> str:
    head = f"qk B={rec['B']:<3} {rec['op']:<16} {rec['variant']:<28} {rec['backend']:<9}"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    return f"{head} {rec['us']:10.1f} us ({rec['timer']}) {rec['pct_sdpa']:7.1f}% of SDPA"


# ---------------------------------------------------------------------------------- 2. varlen
def varlen_sets(shape: VarlenShape, device: torch.device) -> tuple[list[tuple], torch.Tensor]:
    """Rotated sets of (tokens (T, D) fp16, sig (T,) int64) and cu_seqlens (B + 1,) int32."""
    total = sum(shape.sizes)
    cu = torch.tensor([0, *torch.tensor(shape.sizes).cumsum(0).tolist()], dtype=torch.int32, device=device)
    sets = []
    for seed in range(rotation_count(total * (2 * shape.D + 8), cache_bytes(device))):
        gen = torch.Generator(device=device).manual_seed(seed)
        tokens = torch.randn(total, shape.D, generator=gen, device=device, dtype=torch.float16)
        sig = torch.randint(0, 1 << 40, (total,), generator=gen, device=device, dtype=torch.int64)
        sets.append((tokens, sig))
    return sets, cu


def _varlen(tokens, sig, cu, keeps, strategy, grids, backend):
    return fopru_kernels.prune_tokens_varlen(tokens, sig, cu, keeps, strategy=strategy, grids=grids, backend=backend)


def _dense(tokens: torch.Tensor, sig: torch.Tensor, b: int, keep: int, strategy: str, grid, backend: str):
    """The dense path of the same total: select on (B, T / B) + one gather of (B, keep, D)."""
    t3, s2 = tokens.view(b, -1, tokens.shape[1]), sig.view(b, -1)
    idx = fopru_kernels.select(s2, keep, strategy=strategy, grid=grid, backend=backend)
    return t3.gather(1, idx[..., None].expand(-1, -1, t3.shape[2])), idx


def _loop(tokens, sig, bounds, keeps, strategy, grids, backend):
    """What engines do today: one select + gather per image."""
    out = []
    for (a, e), keep, grid in zip(bounds, keeps, grids):
        idx = fopru_kernels.select(sig[a:e][None], keep, strategy=strategy, grid=grid, backend=backend)[0]
        out.append(tokens[a:e].index_select(0, idx))
    return out


def bench_varlen(plan: Plan, device: torch.device, backends: list[str], copy_bps: float) -> dict:
    """Section 2: one varlen call against one dense call of the same total size, per strategy and backend."""
    shape = plan.varlen
    b, sizes, keeps = len(shape.grids), shape.sizes, shape.keeps
    sets, cu = varlen_sets(shape, device)
    bounds = list(zip([0, *torch.tensor(sizes).cumsum(0).tolist()[:-1]], torch.tensor(sizes).cumsum(0).tolist()))
    flat_grids = [v for g in shape.grids for v in g]
    kept = sum(keeps)
    traffic = sum(sizes) * 8 + 2 * kept * shape.D * 2  # sig read, kept rows read and written
    result = {
        "sizes": sizes, "keeps": keeps, "grids": [list(g) for g in shape.grids], "D": shape.D,
        "dense": {"B": b, "N": sum(sizes) // b, "grid": list(shape.dense_grid), "keep": shape.dense_keep},
        "traffic_bytes": traffic, "floor_us": traffic / copy_bps * 1e6, "sets": len(sets), "records": [], "notes": [],
    }
    if shape.dense_keep * b != kept:
        result["notes"].append(f"dense keeps {shape.dense_keep * b} tokens in all, varlen {kept}")
    for strategy in ("rank", "row"):
        for backend in backends:
            calls = {
                "varlen": partial(_varlen, cu=cu, keeps=keeps, strategy=strategy,
                                  grids=flat_grids if strategy == "row" else None, backend=backend),
                "dense": partial(_dense, b=b, keep=shape.dense_keep, strategy=strategy, grid=shape.dense_grid,
                                 backend=backend),
                "loop": partial(_loop, bounds=bounds, keeps=keeps, strategy=strategy, grids=shape.grids, backend=backend),
            }
            row: dict = {"strategy": strategy, "backend": backend}
            for name, call in calls.items():
                try:
                    row[name] = measure(call, sets, device, plan.timing)
                except Exception as e:
                    row[name] = {"error": error_text(e)}
            if "us" in row["varlen"] and "us" in row["dense"]:
                row["ratio_dense"] = row["varlen"]["us"] / row["dense"]["us"]
            if "us" in row["varlen"] and "us" in row["loop"]:
                row["speedup_loop"] = row["loop"]["us"] / row["varlen"]["us"]
            result["records"].append(row)
            print(_varlen_progress(row), flush=True)
    return result


def _varlen_progress(row: dict) -> str:
    parts = [f"varlen {row['strategy']:<4} {row['backend']:<9}"]
    for name in ("varlen", "dense", "loop"):
        r = row[name]
        parts.append(f"{name} ERROR {r['error']}" if "error" in r else f"{name} {r['us']:9.1f} us ({r['timer']})")
    return "  ".join(parts)


# ------------------------------------------------------------------------------ 3. LLaVA e2e
def build_llava(shape: LlavaShape, device: torch.device):
    """LlavaForConditionalGeneration from a config in code, random weights, fp16 on a GPU (float32 on
    a CPU), built directly on `device` so the random init runs there."""
    import transformers

    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**shape.vision),
        text_config=transformers.LlamaConfig(**shape.text),
        image_token_id=shape.image_token_id,
        image_seq_length=(shape.vision["image_size"] // shape.vision["patch_size"]) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def llava_inputs(model, shape: LlavaShape, batch: int, device: torch.device) -> dict:
    """One prompt per image, as the LLaVA-1.5 processor lays it out: BOS, text, N image placeholders,
    text; all rows the same length (no padding)."""
    config = model.config
    n = config.image_seq_length
    gen = torch.Generator().manual_seed(batch)
    before = shape.text_tokens // 4
    text = torch.randint(3, shape.image_token_id, (batch, shape.text_tokens), generator=gen)
    ids = torch.cat(
        [torch.ones(batch, 1, dtype=torch.long), text[:, :before],
         torch.full((batch, n), shape.image_token_id), text[:, before:]], dim=1,
    )
    size = shape.vision["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=gen).to(device, model.dtype)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "pixel_values": pixels}


def fopru_on(model, keep: int, inputs: dict) -> dict:
    """The adapter call: FoPru on `model` keeping `keep` image tokens per image; returns the inputs
    with `keep` placeholders per image (the adapter's own placeholder trimming)."""
    from .integrations.transformers import apply_fopru

    handle = apply_fopru(model, keep=keep, strategy=LLAVA_STRATEGY, score=LLAVA_SCORE, kind=LLAVA_KIND)
    return handle.prepare_inputs(inputs)


def fopru_off(model) -> None:
    from .integrations.transformers import remove_fopru

    remove_fopru(model)


def first_token(model, inputs: dict) -> torch.Tensor:
    """The prefill that produces the first token: one forward with a KV cache, logits of the last
    position only (as generate() computes them), greedy pick."""
    out = model(**inputs, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].argmax(dim=-1)


def wall_us(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> float:
    """Median host wall µs of fn() from a drained device to its result on the device."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def prune_alone(model, inputs: dict, keep: int, device: torch.device, timing: Timing) -> dict:
    """The prune op alone on the inputs it gets inside the model: q, k and the features of the
    vision layer LLaVA feeds the projector, captured from one tower pass, with the adapter's arguments.
    'us': eager µs per call in a Python loop on a GPU (what the op adds to a forward: host issue or
    GPU time, the larger), host median on a CPU; 'graph_us': GPU time alone."""
    from .integrations.transformers import QKCapture, num_prefix_tokens

    tower = model.model.vision_tower
    p = num_prefix_tokens(tower)
    with torch.no_grad(), QKCapture(tower, model.config.vision_feature_layer) as cap:
        tower(pixel_values=inputs["pixel_values"])
    features, q, k, scale = cap.hidden[:, p:], cap.q, cap.k, cap.scale

    def call():
        return fopru_kernels.prune_tokens_qk(features, q, k, keep, strategy=LLAVA_STRATEGY, score=LLAVA_SCORE,
                                             num_prefix=p, scale=scale, kind=LLAVA_KIND, layout="bshd")

    rec = measure(call, [()], device, timing)  # one set: inside the model q, k and features are fresh in L2
    if device.type == "cuda":
        rec["graph_or_events_us"] = rec["us"]
        rec["us"] = rec["eager_loop_us"] = eager_loop_us(call, [()], max(20, rec["reps"]))
    return rec


def bench_llava(plan: Plan, device: torch.device) -> dict:
    """Section 3: time to first token with FoPru at each keep (and without it), and the prune share."""
    shape = plan.llava
    try:
        import transformers
    except ImportError as e:
        return {"skipped": f"transformers not installed ({e})", "records": [], "notes": []}
    result: dict = {"transformers": transformers.__version__, "score": LLAVA_SCORE, "kind": LLAVA_KIND,
                    "strategy": LLAVA_STRATEGY, "text_tokens": shape.text_tokens, "records": [], "notes": []}
    t0 = time.perf_counter()
    model = build_llava(shape, device)
    sync(device)
    result["init_s"] = time.perf_counter() - t0
    result["params"] = sum(p.numel() for p in model.parameters())
    result["dtype"] = dtype_name(model.dtype)
    print(f"llava: {result['params'] / 1e6:,.1f} M parameters built in {result['init_s']:.1f} s", flush=True)
    with torch.no_grad():
        for b in shape.batches:
            full = llava_inputs(model, shape, b, device)
            none_us = wall_us(partial(first_token, model, full), device, shape.warmup, shape.reps)
            result["records"].append({"B": b, "keep": None, "ttft_us": none_us, "seq_len": full["input_ids"].shape[1]})
            print(f"llava B={b} no FoPru: TTFT {none_us / 1e3:8.2f} ms", flush=True)
            for keep in shape.keeps:
                rec: dict = {"B": b, "keep": keep}
                try:
                    inputs = fopru_on(model, keep, full)
                    try:
                        placeholders = (inputs["input_ids"] == shape.image_token_id).sum(dim=1)
                        rec["image_tokens_per_row"] = sorted(set(placeholders.tolist()))
                        rec["seq_len"] = inputs["input_ids"].shape[1]
                        rec["ttft_us"] = wall_us(partial(first_token, model, inputs), device, shape.warmup, shape.reps)
                    finally:
                        fopru_off(model)
                    prune = prune_alone(model, full, keep, device, plan.timing)
                    rec["prune"] = prune
                    rec["prune_share_pct"] = 100.0 * prune["us"] / rec["ttft_us"]
                    rec["speedup_vs_none"] = none_us / rec["ttft_us"]
                except Exception as e:
                    rec["error"] = error_text(e)
                result["records"].append(rec)
                print(_llava_progress(rec), flush=True)
    return result  # the model is freed here; main empties the CUDA cache after each section


def _llava_progress(rec: dict) -> str:
    head = f"llava B={rec['B']} keep={rec['keep']:<4}"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    return f"{head} TTFT {rec['ttft_us'] / 1e3:8.2f} ms, prune {rec['prune']['us']:8.1f} us ({rec['prune_share_pct']:.3f}%)"


# ---------------------------------------------------------------------------------------- report
def _f(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


def _status(value, limit, gpu: bool) -> str:
    if value is None:
        return "not measured"
    if not gpu:
        return "n/a (CPU smoke run)"
    return "met" if value < limit else "**not met**"


def _mib(v) -> str:
    return _f(None if v is None else v / 2**20, ".1f")


def _table(cols: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    return out + ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]


def _timer_cell(rec: dict) -> str:
    return "error" if "error" in rec else f"{rec['us']:.1f}"


def qk_markdown(res: dict, gpu: bool) -> list[str]:
    shape = res["shape"]
    lines = [
        "## 1. Significance from q and k (issue 5)", "",
        (f"q, k, v (B, {shape['H']}, {shape['S']}, {shape['d']}) fp16, tokens (B, {shape['S'] - shape['num_prefix']}, "
        f"{shape['D']}) fp16, keep {shape['keep']}, strategy rank; % = op time / one "
        "`scaled_dot_product_attention(q, k, v)` of the layer. lse for 'lse given': "
        f"{res.get('lse_source', '—')} (max error against float64: {_f(res.get('lse_max_err'), '.2e')}). "
        "Oracle columns: max |sig - reference_qk| in value units and the share of images whose kept "
        "indices equal the oracle's (informative: they may differ where the selection margin is below the float error)."),
        "",
    ]
    recs = [r for r in res["records"] if r["op"] != "sdpa"]
    top_b = max(shape["batches"])
    targets = []
    for label, limit in QK_TARGET_PCT.items():
        for r in recs:
            if r["op"] == "prune_tokens_qk" and r["variant"] == label and r["B"] == top_b:
                targets.append([label, r["backend"], f"< {limit:g}%", _f(r.get("pct_sdpa"), ".1f"),
                                _status(r.get("pct_sdpa"), limit, gpu)])
    lines += [f"### Targets (prune_tokens_qk at B={top_b}, % of one SDPA call)", ""]
    lines += _table(["variant", "backend", "target", "measured %", "status"], targets)
    rows = []
    for r in res["records"]:
        if r["op"] == "sdpa":
            rows.append([str(r["B"]), "**SDPA**", "", "torch", _timer_cell(r), "100", r["timer"],
                         _f(r.get("eager_us"), ".1f"), "", "", ""])
            continue
        rows.append([
            str(r["B"]), r["op"], r["variant"], r["backend"], _timer_cell(r), _f(r.get("pct_sdpa"), ".1f"),
            r.get("timer", r.get("error", "")), _f(r.get("eager_us"), ".1f"),
            _f(r.get("sig_max_err"), ".1e"), _f(r.get("idx_rows_equal_oracle"), ".2f"), str(r["sets"]),
        ])
    lines += ["", "### Times", ""]
    lines += _table(["B", "op", "variant", "backend", "µs", "% SDPA", "timer", "events µs", "sig err",
                     "idx = oracle", "sets"], rows)
    lines += ["", "### Peak memory: one layer's attention + pruning", "",
              ("map path: eager attention with logits and probabilities materialised (output_attentions=True style) "
              "+ prune_tokens on the map; q/k path: SDPA (+ its lse where given) + prune_tokens_qk; q/k op: "
              "prune_tokens_qk alone. Peak allocated bytes above the inputs (torch.cuda.max_memory_allocated). "
              "'no S x S': both q/k peaks below one B x H x S x S fp16 map."), ""]
    mem_rows = []
    for m in res["memory"]:
        for r in m["rows"]:
            no_sq = r.get("no_square_buffer")
            mem_rows.append([str(m["B"]), r["variant"], r["backend"], _mib(r["map_path_bytes"]), _mib(r["qk_layer_bytes"]),
                             _mib(r["qk_op_bytes"]), _mib(r.get("saved_bytes")), _mib(m["square_map_bytes"]),
                             {True: "yes", False: "**NO**"}.get(no_sq, "—")])
    lines += _table(["B", "variant", "backend", "map path MiB", "q/k path MiB", "q/k op MiB", "saved MiB",
                     "S x S map MiB", "no S x S"], mem_rows)
    return lines


def varlen_markdown(res: dict, gpu: bool) -> list[str]:
    d = res["dense"]
    lines = [
        "## 2. Ragged batches: prune_tokens_varlen (issue 6)", "",
        (f"{len(res['sizes'])} images of {res['sizes']} patches (grids {res['grids']}), D={res['D']} fp16, int64 sig, "
        f"keep a quarter of each grid's rows ({res['keeps']}). dense: `select` on ({d['B']}, {d['N']}) "
        f"(grid {d['grid']}, keep {d['keep']}) + one gather, the same total; loop: select + index_select per image. "
        f"Bandwidth floor (sig read + kept rows read and written at copy bandwidth): {res['floor_us']:.1f} µs."), "",
    ]
    rows = []
    for r in res["records"]:
        rows.append([r["strategy"], r["backend"], _timer_cell(r["varlen"]), _timer_cell(r["dense"]), _timer_cell(r["loop"]),
                     r["varlen"].get("timer", ""), _f(r.get("ratio_dense"), ".2f"), f"< {VARLEN_TARGET_RATIO}",
                     _status(r.get("ratio_dense"), VARLEN_TARGET_RATIO, gpu), _f(r.get("speedup_loop"), ".1f")])
    lines += _table(["strategy", "backend", "varlen µs", "dense µs", "loop µs", "timer", "varlen / dense", "target",
                     "status", "× loop"], rows)
    return lines + [f"- {n}" for n in res["notes"]]


def llava_markdown(res: dict, gpu: bool) -> list[str]:
    lines = ["## 3. LLaVA-1.5-7B-shaped model end to end (issue 6)", ""]
    if "skipped" in res:
        return lines + [f"skipped: {res['skipped']}"]
    lines += [
        f"LlavaForConditionalGeneration, {res['params'] / 1e6:,.1f} M random {res['dtype']} parameters "
        f"(built in {res['init_s']:.1f} s), transformers {res['transformers']}, SDPA. Prompt: BOS + "
        f"{res['text_tokens']} text tokens + the image placeholders. TTFT: host wall time of one prefill "
        "forward with KV cache and last-position logits + greedy pick (median). FoPru through "
        f"`apply_fopru(keep, strategy='{res['strategy']}', score='{res['score']}', kind='{res['kind']}')`. "
        "prune: prune_tokens_qk alone on the captured q, k and features of that image batch"
        + (", µs per call of back-to-back eager calls (host issue or GPU, the larger); GPU-only time in 'prune GPU µs'."
           if gpu else ", host timer."),
        "",
    ]
    rows = []
    for r in res["records"]:
        if r["keep"] is None:
            rows.append([str(r["B"]), "none (all)", str(r["seq_len"]),
                         f"{r['ttft_us'] / 1e3:.2f}", "—", "—", "—", "—", "—"])
        elif "error" in r:
            rows.append([str(r["B"]), str(r["keep"]), "", f"error: {r['error']}", "", "", "", "", ""])
        else:
            limit_row = r["B"] == 1
            rows.append([str(r["B"]), str(r["keep"]), str(r["seq_len"]), f"{r['ttft_us'] / 1e3:.2f}",
                         _f(r["speedup_vs_none"], ".2f"), f"{r['prune']['us']:.1f}",
                         _f(r["prune"].get("graph_or_events_us"), ".1f"), f"{r['prune_share_pct']:.3f}",
                         _status(r["prune_share_pct"], LLAVA_TARGET_SHARE_PCT, gpu) if limit_row else "—"])
    lines += _table(["B", "keep", "seq len", "TTFT ms", "× no FoPru", "prune µs", "prune GPU µs", "prune % TTFT",
                     f"target < {LLAVA_TARGET_SHARE_PCT}% at B=1"], rows)
    return lines + [f"- {n}" for n in res["notes"]]


def markdown(env: dict, results: dict, notes: list[str]) -> str:
    gpu = env["device_type"] == "cuda"
    python_kernel = "the Triton launcher, so that op's 'cuda' rows time Triton" if gpu else "the reference"
    lines = [
        "# fopru_kernels serving benchmarks (issues 5, 6)", "",
        f"- device: {env['device']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- backends: {', '.join(env['backends'])}; copy bandwidth {env['copy_GBps']:.0f} GB/s",
        f"- {'CUDA' if gpu else 'CPU'} kernels of torch.ops.fopru (C++, or Python: {python_kernel}): "
        + ", ".join(f"{op} {origin}" for op, origin in env["kernels"].items()),
        "- timing: " + (
            "a captured CUDA graph of 100 calls, replayed, GPU µs per call (timer 'graph'; median per-call CUDA "
            "events where capture fails: 'events'); inputs rotated over `sets` sets (3x L2); fp16"
            if gpu else "CPU smoke run with tiny shapes and a host timer: proves the code paths, measures nothing"),
    ]
    for name, render in (("qk", qk_markdown), ("varlen", varlen_markdown), ("llava", llava_markdown)):
        res = results.get(name)
        if res is None:
            continue
        lines.append("")
        lines += [f"## {name}: error", "", res["error"]] if "error" in res else render(res, gpu)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write(out: Path, env: dict, results: dict, notes: list[str]) -> str:
    report = markdown(env, results, notes)
    (out / "serving.md").write_text(report)
    (out / "serving.json").write_text(json.dumps({"environment": env, **results, "notes": notes}, indent=1))
    return report


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 1 if a section or a measurement raised (targets not met are reported, not failures)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fopru_kernels.bench_serving", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for serving.md and serving.json")
    parser.add_argument("--quick", action="store_true", help="q/k at B=32, LLaVA at B=1 with keep 576/144, fewer repeats")
    parser.add_argument("--device", default=None, help="'cuda' or 'cpu' (default: cuda when available; cpu uses tiny shapes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {', '.join(SECTIONS)}")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sections = [s for s in args.only.split(",") if s]
    if any(s not in SECTIONS for s in sections):
        parser.error(f"--only takes sections of {', '.join(SECTIONS)}, got {args.only!r}")
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    plan, backends = plan_for(device, args.quick), backends_for(device)
    copy_bps = copy_bandwidth(device, plan.copy_bytes)
    env = environment(device, argv, copy_bps)
    env.update(command="python -m fopru_kernels.bench_serving " + " ".join(argv), backends=backends,
               plan=asdict(plan), kernels={op: kernel_origin(op, device) for op in SERVING_OPS})
    print(f"serving bench on {env['device']}; backends {', '.join(backends)}", flush=True)
    results: dict = {}
    notes: list[str] = []
    failed = False
    runners = {
        "qk": lambda: bench_qk(plan, device, backends),
        "varlen": lambda: bench_varlen(plan, device, backends, copy_bps),
        "llava": lambda: bench_llava(plan, device),
    }
    with torch.no_grad():
        for name in sections:
            s0 = time.perf_counter()
            try:
                results[name] = runners[name]()
            except Exception as e:  # one failing section must not end the report
                results[name] = {"error": error_text(e)}
            results[name]["wall_s"] = time.perf_counter() - s0
            if device.type == "cuda":
                torch.cuda.empty_cache()
            failed |= "error" in results[name] or _has_error(results[name])
            notes_now = notes + [f"{n}: {results[n]['wall_s']:.0f} s" for n in results]
            write(args.out, env, results, notes_now)  # after each section: a timeout keeps what ran
    env["wall_s"] = time.perf_counter() - t0
    notes += [f"{n}: {results[n]['wall_s']:.0f} s" for n in results] + [f"whole run: {env['wall_s']:.0f} s"]
    print(write(args.out, env, results, notes))
    return 1 if failed else 0


def _has_error(obj) -> bool:
    """Whether any record below obj carries an 'error' (a measurement that raised)."""
    if isinstance(obj, dict):
        return "error" in obj or "agreement_error" in obj or any(_has_error(v) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_error(v) for v in obj)
    return False


if __name__ == "__main__":
    sys.exit(main())
