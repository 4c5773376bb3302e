"""`python -m benchmarks.report --out DIR [--quick]`: latency and bandwidth of every backend of prune_tokens.

Run from the repository root. Writes DIR/report.md (table), DIR/report.json (every number) and
DIR/latency.png (latency against batch size with the bandwidth floor). On a GPU each call is timed
with CUDA events (median after warm-up), inputs rotated over enough sets to overflow L2, and the
fused backends are also timed as a replayed CUDA graph of 100 calls and as a Python loop of eager
calls. Without a GPU the CPU backends are timed with a host timer.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

import fopru_kernels
from fopru_kernels import reference

from .baselines import same_kept
from .prune_cases import BASELINES, FUSED, BenchCase, Inputs, Runner, applies, bench_cases, make_inputs, runner
from .reporting import dtype_name, environment, fmt, md_table
from .timing import (
    GRAPH_CALLS,
    Timing,
    cache_bytes,
    copy_bandwidth,
    eager_loop_us,
    error_text,
    first_call,
    rotation_count,
    time_warm,
)

COMMAND = "python -m benchmarks.report"
CPU_MAX_ATTN_BYTES = 1 << 30  # bigger maps take minutes per reference call on a CPU
COMPILE_BUDGET_S = 60.0  # total first-call (compile) time allowed to the torch.compile baseline
TARGETS = {("cuda", "cls", 1): 4.0, ("triton", "cls", 1): 6.0}  # LLaVA-1.5 graph µs per call


def timing_for(device: torch.device, quick: bool) -> Timing:
    if device.type == "cuda":
        return Timing(0.03 if quick else 0.08, 10, 400, 5 if quick else 10)
    return Timing(0.15 if quick else 0.3, 3, 50, 0)


def copy_bytes_for(device: torch.device) -> int:
    """Size of the copy that measures the bandwidth: well past every cache."""
    return 1 << 30 if device.type == "cuda" else 256 << 20


class Bench:
    """Runs every backend on every case of one device and collects one record per (case, backend)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.timing = timing_for(device, quick)
        self.attn_dtype = torch.float16
        self.token_dtype = torch.float16
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.failed = False
        self.compiled: Callable | None = None
        self.compile_s = 0.0
        self.fused = [b for b in FUSED if b in fopru_kernels.available_backends(device)]
        self.names = ["reference", *self.fused]
        if device.type == "cuda":
            self._init_compile()
        self.names += ["published_loop", "eager_cls_chain"]

    def _init_compile(self) -> None:
        import torch._dynamo

        # Past the limit dynamo silently runs eager code: that would time the wrong thing.
        for knob in ("recompile_limit", "cache_size_limit"):  # the name changed across torch releases
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, max(getattr(torch._dynamo.config, knob), 64))
        self.compiled = torch.compile(reference.prune_tokens)
        self.names.append("reference_compiled")

    def _call(self, name: str, case: BenchCase) -> Runner:
        if name != "reference_compiled":
            return runner(name, case)
        fn, k, score, p = self.compiled, case.keep, case.score, case.num_prefix
        return lambda t, a: fn(t, a, k, score=score, num_prefix=p)

    def run_case(self, case: BenchCase) -> None:
        if self.device.type == "cpu" and case.attn_bytes(self.attn_dtype) > CPU_MAX_ATTN_BYTES:
            self.notes.append(f"{case.label}: skipped on CPU (attention map over 1 GiB)")
            return
        n_sets = rotation_count(case.set_bytes(self.attn_dtype, self.token_dtype), cache_bytes(self.device))
        sets = [make_inputs(case, self.device, self.attn_dtype, self.token_dtype, seed) for seed in range(n_sets)]
        sig = reference.significance(sets[0][1], case.score, case.num_prefix)
        idx = reference.select(sig, case.keep)
        expected = (reference.gather_rows(sets[0][0], idx), idx, sig)
        traffic = case.traffic_bytes(self.attn_dtype, self.token_dtype)
        dtypes = {"attn_dtype": dtype_name(self.attn_dtype), "token_dtype": dtype_name(self.token_dtype)}
        base = dict(asdict(case), **dtypes, traffic_bytes=traffic, sets=n_sets)
        for name in list(self.names):  # a failing torch.compile drops out of self.names
            if not applies(name, case):
                continue
            rec = dict(base, backend=name)
            try:
                self._measure(name, case, sets, expected, rec)
            except Exception as e:  # one failing backend must not end the report
                rec["error"] = error_text(e)
                if name == "reference_compiled":
                    self.names.remove(name)
                    self.notes.append(f"torch.compile of the reference failed, not timed further: {rec['error']}")
                elif name in self.fused:
                    self.failed = True
            self.records.append(rec)
            print(_progress(rec), flush=True)
        del sets
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _measure(self, name: str, case: BenchCase, sets: list[Inputs], expected: tuple, rec: dict) -> None:
        """Times `name` on `case` into rec; expected: the reference's (pruned, idx, sig) on sets[0]."""
        call = self._call(name, case)
        out, rec["first_call_s"] = first_call(call, sets, self.device)
        if name == "reference_compiled":
            self.compile_s += rec["first_call_s"]
        if name in self.fused or name == "reference_compiled":
            rec["exact"] = bool(torch.equal(out[1], expected[1]) and torch.equal(out[0], expected[0]))
            self.failed |= name in self.fused and not rec["exact"]
        elif name != "reference":  # a float baseline: its time compares only if it does the same job
            rec["same_kept"] = same_kept(out[1], expected[1], expected[2])
            if not rec["same_kept"]:
                self.notes.append(f"{case.label} {name}: keeps other tokens than the reference beyond near-ties")
        timed = time_warm(call, sets, self.device, self.timing, graph=name in self.fused)
        rec["median_us"], rec["reps"] = timed["eager_us"], timed["reps"]
        rec["gbps"] = rec["traffic_bytes"] / (rec["median_us"] * 1e-6) / 1e9
        if self.device.type == "cuda" and name in self.fused:
            rec["eager_loop_us"] = eager_loop_us(call, sets, max(20, rec["reps"]))
            if "graph_us" in timed:
                rec["graph_us"] = timed["graph_us"]
            else:  # not capturable: report it, keep the eager numbers
                rec["graph_error"] = timed.get("graph_error", "not timed")
                self.notes.append(f"{case.label} {name}: CUDA graph capture failed: {rec['graph_error']}")
                self.failed = True
        if name == "reference_compiled" and self.compile_s > COMPILE_BUDGET_S:
            self.names.remove(name)
            self.notes.append(f"torch.compile took {self.compile_s:.0f} s in all: not timed after {case.label}")


def _progress(rec: dict) -> str:
    head = f"{rec['model']:<20} {rec['score']:<6} B={rec['B']:<4} {rec['backend']:<19}"
    if "error" in rec:
        return f"{head} ERROR {rec['error']}"
    return f"{head} {rec['median_us']:11.1f} us {rec['gbps']:8.1f} GB/s"


def add_derived(records: list[dict], copy_bps: float) -> None:
    """% of copy bandwidth, bandwidth floor and speed-up of each fused backend over each baseline."""
    by_case: dict[tuple, dict[str, dict]] = {}
    for r in records:
        by_case.setdefault((r["model"], r["score"], r["B"]), {})[r["backend"]] = r
    for rows in by_case.values():
        for r in rows.values():
            r["floor_us"] = r["traffic_bytes"] / copy_bps * 1e6
            if "median_us" not in r:
                continue
            r["pct_copy_bw"] = 100.0 * r["gbps"] * 1e9 / copy_bps
            if r["backend"] in FUSED:
                r["speedup"] = {
                    b: rows[b]["median_us"] / r["median_us"] for b in BASELINES if "median_us" in rows.get(b, {})
                }


# ----------------------------------------------------------------------------------------- report
def markdown(env: dict, records: list[dict], notes: list[str]) -> str:
    gpu = env["device_type"] == "cuda"
    timer = (
        "median of per-call CUDA events after warm-up, inputs rotated over `sets` input sets (3x L2)"
        if gpu
        else "median of a host timer per call after warm-up"
    )
    lines = [
        "# fopru_kernels benchmark",
        "",
        f"- device: {env['device']}",
        f"- torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}",
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- copy bandwidth: {env['copy_GBps']:.0f} GB/s (large same-device copy, bytes read + written)",
        f"- timing: {timer}; {env['inputs']}",
        "- traffic: attention read once + kept rows gathered + kept rows written; floor = traffic / copy bandwidth",
        "- agrees: fused backends and the compiled reference return the reference's pruned tokens and indices "
        "bit for bit; the float baselines keep the reference's tokens (near-ties at the selection boundary aside)",
    ]
    if gpu:
        lines.append(
            f"- graph: a captured CUDA graph of {GRAPH_CALLS} calls, replayed, GPU µs per call; "
            "eager loop: back-to-back Python calls, µs per call"
        )
        targets = []
        for (backend, score, b), limit in TARGETS.items():
            rec = next(
                (r for r in records if (r["model"], r["backend"], r["score"], r["B"]) == ("LLaVA-1.5", backend, score, b)),
                {},
            )
            got = rec.get("graph_us")
            status = "not measured" if got is None else ("PASS" if got < limit else "FAIL")
            targets.append([backend, f"< {limit} µs", fmt(got, ".2f"), status])
        lines += ["", "## Targets (LLaVA-1.5, cls, B=1, graph µs per call)", ""]
        lines += md_table(["backend", "target", "measured", "status"], targets)
    cols = ["model", "score", "B", "backend", "median µs", "GB/s", "% copy", "× ref", "× compiled", "× loop", "× chain"]
    if gpu:
        cols += ["graph µs/call", "eager loop µs/call"]
    cols += ["agrees", "sets"]
    rows = []
    last_case = None
    for r in records:
        case = (r["model"], r["score"], r["B"])
        if case != last_case:
            floor = [r["model"], r["score"], str(r["B"]), "*bandwidth floor*", f"{r['floor_us']:.1f}"]
            rows.append(floor + [""] * (len(cols) - len(floor)))
            last_case = case
        sp = r.get("speedup", {})
        row = [r["model"], r["score"], str(r["B"]), r["backend"]]
        if "error" in r:
            row += [f"error: {r['error']}"] + [""] * (len(cols) - 5)
        else:
            row += [f"{r['median_us']:.1f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.1f}"]
            row += [fmt(sp.get(b), ".1f") for b in BASELINES]
            if gpu:
                graph = "error" if "graph_error" in r else fmt(r.get("graph_us"), ".2f")
                row += [graph, fmt(r.get("eager_loop_us"), ".1f")]
            row += [{True: "yes", False: "**NO**"}.get(r.get("exact", r.get("same_kept")), "—"), str(r["sets"])]
        rows.append(row)
    lines += ["", "## Results", ""] + md_table(cols, rows)
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def plot(path: Path, env: dict, records: list[dict]) -> None:
    """Latency against batch (LLaVA-1.5), one line per backend, log axes, bandwidth floor dashed."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [r for r in records if r["model"] == "LLaVA-1.5"]
    scores = sorted({r["score"] for r in series})
    fig, axes = plt.subplots(1, len(scores), figsize=(6 * len(scores), 4.5), squeeze=False)
    for ax, score in zip(axes[0], scores):
        rows = [r for r in series if r["score"] == score]
        for backend in dict.fromkeys(r["backend"] for r in rows):
            pts = sorted((r["B"], r["median_us"]) for r in rows if r["backend"] == backend and "median_us" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=backend)
            gpts = sorted((r["B"], r["graph_us"]) for r in rows if r["backend"] == backend and "graph_us" in r)
            if gpts:
                ax.plot(*zip(*gpts), marker="x", linestyle=":", label=f"{backend} (CUDA graph)")
        floor = sorted({(r["B"], r["floor_us"]) for r in rows})
        ax.plot(*zip(*floor), color="black", linestyle="--", label="bandwidth floor")
        ax.set(xscale="log", yscale="log", xlabel="batch (images)", ylabel="µs per call")
        batches = sorted({b for b, _ in floor})
        ax.set_xticks(batches, labels=[str(b) for b in batches])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title(f"LLaVA-1.5 '{score}', N=576, K=144")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(env["device"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m benchmarks.report`; returns the exit status (1 if a fused backend
    failed or disagreed with the reference)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md, report.json, latency.png")
    parser.add_argument("--quick", action="store_true", help="LLaVA-1.5 at B=1 and 8 only, fewer repeats")
    parser.add_argument("--device", default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    bench = Bench(device, args.quick)
    copy_bps = copy_bandwidth(device, copy_bytes_for(device))
    print(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s; backends: {', '.join(bench.names)}", flush=True)
    with torch.no_grad():
        for case in bench_cases(args.quick):
            bench.run_case(case)
    add_derived(bench.records, copy_bps)
    env = environment(device, shlex.join([*COMMAND.split(), *argv]), copy_bps)
    env["inputs"] = (
        f"{dtype_name(bench.token_dtype)} tokens, {dtype_name(bench.attn_dtype)} attention, strategy 'rank'"
    )
    env["wall_s"] = time.perf_counter() - t0
    bench.notes.append(f"whole run: {env['wall_s']:.0f} s")
    report = markdown(env, bench.records, bench.notes)
    (args.out / "report.md").write_text(report)
    (args.out / "report.json").write_text(
        json.dumps({"environment": env, "records": bench.records, "notes": bench.notes}, indent=1)
    )
    try:
        plot(args.out / "latency.png", env, bench.records)
    except ImportError as e:
        print(f"latency.png not written ({e}); pip install matplotlib", file=sys.stderr)
    print(report)
    return 1 if bench.failed else 0


if __name__ == "__main__":
    sys.exit(main())
