"""Section 1 of the serving report: `significance_qk` / `prune_tokens_qk` at LLaVA-1.5 shape as a share
of ONE `scaled_dot_product_attention` call of the layer, per backend, their agreement with the float64
oracle, and the peak memory of the q/k path against the output_attentions-style map path."""
from __future__ import annotations

from dataclasses import asdict
from functools import partial

import torch
import torch.nn.functional as nnf

import fopru_kernels
from fopru_kernels import reference_qk
from fopru_kernels.reference import FX_SCALE

from .reporting import fmt, md_table, progress_line, status_cell, timer_cell
from .serving_plan import Plan, QKShape
from .timing import Call, cache_bytes, error_text, measure, peak_bytes, rotation_count

# (label, score, kind, lse): lse "sdpa" passes the attention's own log-sum-exp, "computed" leaves it to the op.
QK_VARIANTS = (
    ("cls/prob", "cls", "prob", None),
    ("focal/logit", "focal", "logit", None),
    ("received/prob, lse given", "received", "prob", "sdpa"),
    ("received/prob, lse computed", "received", "prob", "computed"),
)
QK_TARGET_PCT = {"cls/prob": 5.0, "focal/logit": 5.0, "received/prob, lse given": 60.0, "received/prob, lse computed": 60.0}


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
    return progress_line(f"qk B={rec['B']:<3} {rec['op']:<16} {rec['variant']:<28} {rec['backend']:<9}", rec,
                         lambda r: f"{r['us']:10.1f} us ({r['timer']}) {r['pct_sdpa']:7.1f}% of SDPA")

def _mib(v) -> str:
    return fmt(None if v is None else v / 2**20, ".1f")


def qk_markdown(res: dict, gpu: bool) -> list[str]:
    shape = res["shape"]
    lines = [
        "## 1. Significance from q and k", "",
        (f"q, k, v (B, {shape['H']}, {shape['S']}, {shape['d']}) fp16, tokens (B, {shape['S'] - shape['num_prefix']}, "
        f"{shape['D']}) fp16, keep {shape['keep']}, strategy rank; % = op time / one "
        "`scaled_dot_product_attention(q, k, v)` of the layer. lse for 'lse given': "
        f"{res.get('lse_source', '—')} (max error against float64: {fmt(res.get('lse_max_err'), '.2e')}). "
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
                targets.append([label, r["backend"], f"< {limit:g}%", fmt(r.get("pct_sdpa"), ".1f"),
                                status_cell(r.get("pct_sdpa"), limit, gpu)])
    lines += [f"### Targets (prune_tokens_qk at B={top_b}, % of one SDPA call)", ""]
    lines += md_table(["variant", "backend", "target", "measured %", "status"], targets)
    rows = []
    for r in res["records"]:
        if r["op"] == "sdpa":
            rows.append([str(r["B"]), "**SDPA**", "", "torch", timer_cell(r), "100", r["timer"],
                         fmt(r.get("eager_us"), ".1f"), "", "", ""])
            continue
        rows.append([
            str(r["B"]), r["op"], r["variant"], r["backend"], timer_cell(r), fmt(r.get("pct_sdpa"), ".1f"),
            r.get("timer", r.get("error", "")), fmt(r.get("eager_us"), ".1f"),
            fmt(r.get("sig_max_err"), ".1e"), fmt(r.get("idx_rows_equal_oracle"), ".2f"), str(r["sets"]),
        ])
    lines += ["", "### Times", ""]
    lines += md_table(["B", "op", "variant", "backend", "µs", "% SDPA", "timer", "events µs", "sig err",
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
    lines += md_table(["B", "variant", "backend", "map path MiB", "q/k path MiB", "q/k op MiB", "saved MiB",
                     "S x S map MiB", "no S x S"], mem_rows)
    return lines
