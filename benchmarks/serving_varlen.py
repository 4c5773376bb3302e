"""Section 2 of the serving report: `prune_tokens_varlen` on 8 images of mixed sizes against one dense
`select` + gather of the same total size, and against the per-image loop engines run today."""
from __future__ import annotations

from functools import partial

import torch

import fopru_kernels

from .reporting import fmt, md_table, status_cell, timer_cell
from .serving_plan import Plan, VarlenShape
from .timing import cache_bytes, error_text, measure, rotation_count

VARLEN_TARGET_RATIO = 1.3


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
            try:  # the comparison holds only if the loop keeps what the op keeps
                pruned = calls["varlen"](*sets[0])[0]
                row["loop_same_kept"] = bool(torch.equal(torch.cat(calls["loop"](*sets[0])), pruned))
                if not row["loop_same_kept"]:
                    row["agreement_error"] = "prune_tokens_varlen and the per-image loop keep different rows"
            except Exception as e:
                row["agreement_error"] = error_text(e)
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


def varlen_markdown(res: dict, gpu: bool) -> list[str]:
    d = res["dense"]
    lines = [
        "## 2. Ragged batches: prune_tokens_varlen", "",
        (f"{len(res['sizes'])} images of {res['sizes']} patches (grids {res['grids']}), D={res['D']} fp16, int64 sig, "
        f"keep a quarter of each grid's rows ({res['keeps']}). dense: `select` on ({d['B']}, {d['N']}) "
        f"(grid {d['grid']}, keep {d['keep']}) + one gather, the same total; loop: select + index_select per image "
        "('= loop': the op's rows equal the loop's, bit for bit). "
        f"Bandwidth floor (sig read + kept rows read and written at copy bandwidth): {res['floor_us']:.1f} µs."), "",
    ]
    rows = []
    for r in res["records"]:
        rows.append([r["strategy"], r["backend"], timer_cell(r["varlen"]), timer_cell(r["dense"]), timer_cell(r["loop"]),
                     r["varlen"].get("timer", ""), fmt(r.get("ratio_dense"), ".2f"), f"< {VARLEN_TARGET_RATIO}",
                     status_cell(r.get("ratio_dense"), VARLEN_TARGET_RATIO, gpu), fmt(r.get("speedup_loop"), ".1f"),
                     {True: "yes", False: "**NO**"}.get(r.get("loop_same_kept"), "error")])
    lines += md_table(["strategy", "backend", "varlen µs", "dense µs", "loop µs", "timer", "varlen / dense", "target",
                       "status", "× loop", "= loop"], rows)
    return lines + [f"- {n}" for n in res["notes"]]
