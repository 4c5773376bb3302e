"""`python -m fopru_kernels bench --out DIR [--quick]`: latency and bandwidth of every backend.

Writes DIR/report.md (table), DIR/report.json (every number) and DIR/latency.png (latency against
batch size with the bandwidth floor). On a GPU each call is timed with CUDA events (median after
warm-up), inputs rotated over enough sets to overflow L2, and the fused backends are also timed as
a replayed CUDA graph of 100 calls and as a Python loop of eager calls. Without a GPU the CPU
backends are timed with a host timer. The helpers here (cases, inputs, traffic, runners) are shared
with the pytest-benchmark suite in benchmarks/.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

import fopru_kernels

from . import baselines, reference

FUSED = ("cuda", "triton", "cpu")
BASELINES = ("reference", "reference_compiled", "published_loop", "eager_cls_chain")
GRAPH_CALLS = 100
CPU_CACHE_BYTES = 32 << 20  # stand-in for the last-level cache when rotating CPU inputs
CPU_MAX_ATTN_BYTES = 1 << 30  # bigger maps take minutes per reference call on a CPU
COMPILE_BUDGET_S = 60.0  # total first-call (compile) time allowed to the torch.compile baseline
TARGETS = {("cuda", "cls", 1): 4.0, ("triton", "cls", 1): 6.0}  # LLaVA-1.5 graph µs per call

Inputs = tuple[torch.Tensor, torch.Tensor]
Runner = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class BenchCase:
    """One benchmarked shape: B images of N patch tokens, H heads, D features, keep K."""

    model: str
    score: str
    B: int
    N: int = 576
    H: int = 16
    D: int = 1024
    keep: int = 144
    num_prefix: int = 1

    @property
    def label(self) -> str:
        return f"{self.model} '{self.score}' B={self.B}"

    @property
    def attn_shape(self) -> tuple[int, int, int, int]:
        s = self.num_prefix + self.N
        return (self.B, self.H, 1 if self.score == "cls" else s, s)

    def attn_bytes(self, attn_dtype: torch.dtype) -> int:
        return math.prod(self.attn_shape) * attn_dtype.itemsize

    def set_bytes(self, attn_dtype: torch.dtype, token_dtype: torch.dtype) -> int:
        """Bytes of one input set (tokens + attention)."""
        return self.attn_bytes(attn_dtype) + self.B * self.N * self.D * token_dtype.itemsize

    def traffic_bytes(self, attn_dtype: torch.dtype, token_dtype: torch.dtype) -> int:
        """Fewest bytes a call moves: the attention read once, K rows per image gathered and written."""
        rows = self.B * self.keep * self.D * token_dtype.itemsize
        return self.attn_bytes(attn_dtype) + 2 * rows


def bench_cases(quick: bool) -> list[BenchCase]:
    """LLaVA-1.5 (CLIP ViT-L/14-336) over batch, LLaVA-NeXT's 5 tiles, and a SigLIP-like encoder
    (N = 2304, no CLS, so 'focal' only). --quick keeps the two smallest LLaVA-1.5 batches."""
    batches = (1, 8) if quick else (1, 8, 32, 128)
    cases = [BenchCase("LLaVA-1.5", score, b) for score in ("cls", "focal") for b in batches]
    if not quick:
        cases += [BenchCase("LLaVA-NeXT 5 tiles", score, 5) for score in ("cls", "focal")]
        cases += [BenchCase("SigLIP N=2304", "focal", b, N=2304, D=1152, keep=576, num_prefix=0) for b in (1, 8)]
    return cases


def make_inputs(
    case: BenchCase, device: torch.device, attn_dtype: torch.dtype, token_dtype: torch.dtype, seed: int
) -> Inputs:
    """Random tokens (B, N, D) and attention (case.attn_shape); never zeros, which hide bad indexing."""
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randn(case.B, case.N, case.D, generator=gen, device=device, dtype=token_dtype)
    attn = torch.rand(case.attn_shape, generator=gen, device=device, dtype=attn_dtype)
    return tokens, attn


def rotation_count(set_bytes: int, cache_bytes: int, cap: int = 128) -> int:
    """Input sets to cycle through so that together they overflow the cache three times over."""
    return max(1, min(cap, math.ceil(3 * cache_bytes / max(set_bytes, 1))))


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return CPU_CACHE_BYTES


def runner(name: str, case: BenchCase) -> Runner:
    """A callable (tokens, attn) -> (pruned, idx) for a backend or baseline name (not 'reference_compiled')."""
    k, score, p = case.keep, case.score, case.num_prefix
    if name in FUSED or name == "reference":
        return lambda t, a: fopru_kernels.prune_tokens(t, a, k, score=score, num_prefix=p, backend=name)
    if name == "published_loop":
        return lambda t, a: baselines.published_loop(t, a, k, score=score, num_prefix=p)
    if name == "eager_cls_chain":
        return lambda t, a: baselines.eager_cls_chain(t, a, k, num_prefix=p)
    raise ValueError(f"unknown backend {name!r}")


def applies(name: str, case: BenchCase) -> bool:
    """The CLS chain needs a CLS row; everything else runs every case."""
    return name != "eager_cls_chain" or case.score == "cls"


# ----------------------------------------------------------------------------------------- timers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def estimate_s(call: Runner, sets: list[Inputs], device: torch.device) -> float:
    """Wall time of one warm call (the caller has run the first, compiling one)."""
    sync(device)
    t0 = time.perf_counter()
    call(*sets[-1])
    sync(device)
    return time.perf_counter() - t0


def time_cuda_us(call: Runner, sets: list[Inputs], reps: int) -> float:
    """Median µs of per-call CUDA events, rotating over `sets`; one sync at the end, so a call
    starts when the GPU is free or when Python has issued it, whichever is later."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        call(*sets[i % len(sets)])
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends)) * 1e3


def time_host_us(call: Runner, sets: list[Inputs], reps: int) -> float:
    """Median µs of a host timer around each call (CPU tensors)."""
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        call(*sets[i % len(sets)])
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def graph_us(call: Runner, sets: list[Inputs], replays: int) -> float:
    """GPU µs per call of a captured CUDA graph of GRAPH_CALLS calls (median over replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as graph capture requires
        for s in sets[:3]:
            call(*s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            call(*sets[i % len(sets)])
    graph.replay()
    torch.cuda.synchronize()
    samples = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    del graph
    return statistics.median(samples)


def eager_loop_us(call: Runner, sets: list[Inputs], calls: int) -> float:
    """µs per call of back-to-back eager calls from Python (host issue rate or GPU time, the larger)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        call(*sets[i % len(sets)])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large same-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = lambda _t, _a: dst.copy_(src)  # noqa: E731
    sets = [(src, src)]
    copy(*sets[0])
    if device.type == "cuda":
        us = time_cuda_us(copy, sets, 20)
    else:
        us = time_host_us(copy, sets, 5)
    return 2 * nbytes / (us * 1e-6)


# ----------------------------------------------------------------------------------------- driver
@dataclass
class Settings:
    target_s: float  # timed work per (case, backend)
    min_reps: int
    max_reps: int
    graph_replays: int
    copy_bytes: int


def settings_for(device: torch.device, quick: bool) -> Settings:
    if device.type == "cuda":
        return Settings(0.03 if quick else 0.08, 10, 400, 5 if quick else 10, 1 << 30)
    return Settings(0.15 if quick else 0.3, 3, 50, 0, 256 << 20)


class Bench:
    """Runs every backend on every case of one device and collects one record per (case, backend)."""

    def __init__(self, device: torch.device, quick: bool):
        self.device = device
        self.quick = quick
        self.cfg = settings_for(device, quick)
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

    def _time(self, call: Runner, sets: list[Inputs]) -> tuple[float, int]:
        est = estimate_s(call, sets, self.device)
        reps = int(min(self.cfg.max_reps, max(self.cfg.min_reps, self.cfg.target_s / max(est, 1e-7))))
        if self.device.type == "cuda":
            for s in sets[: min(len(sets), reps)]:  # warm every set once
                call(*s)
            return time_cuda_us(call, sets, reps), reps
        return time_host_us(call, sets, reps), reps

    def run_case(self, case: BenchCase) -> None:
        if self.device.type == "cpu" and case.attn_bytes(self.attn_dtype) > CPU_MAX_ATTN_BYTES:
            self.notes.append(f"{case.label}: skipped on CPU (attention map over 1 GiB)")
            return
        n_sets = rotation_count(case.set_bytes(self.attn_dtype, self.token_dtype), cache_bytes(self.device))
        sets = [make_inputs(case, self.device, self.attn_dtype, self.token_dtype, seed) for seed in range(n_sets)]
        expected = reference.prune_tokens(*sets[0], case.keep, score=case.score, num_prefix=case.num_prefix)
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

    def _measure(self, name: str, case: BenchCase, sets: list[Inputs], expected: Inputs, rec: dict) -> None:
        call = self._call(name, case)
        t0 = time.perf_counter()
        out = call(*sets[0])  # first call: JIT / torch.compile happen here
        sync(self.device)
        rec["first_call_s"] = time.perf_counter() - t0
        if name == "reference_compiled":
            self.compile_s += rec["first_call_s"]
        if name in self.fused or name == "reference_compiled":
            rec["exact"] = bool(torch.equal(out[1], expected[1]) and torch.equal(out[0], expected[0]))
            self.failed |= name in self.fused and not rec["exact"]
        rec["median_us"], rec["reps"] = self._time(call, sets)
        rec["gbps"] = rec["traffic_bytes"] / (rec["median_us"] * 1e-6) / 1e9
        if self.device.type == "cuda" and name in self.fused:
            rec["eager_loop_us"] = eager_loop_us(call, sets, max(20, rec["reps"]))
            try:
                rec["graph_us"] = graph_us(call, sets, self.cfg.graph_replays)
            except Exception as e:  # not capturable: report it, keep the eager numbers
                rec["graph_error"] = error_text(e)
                self.notes.append(f"{case.label} {name}: CUDA graph capture failed: {rec['graph_error']}")
                self.failed = True
        if name == "reference_compiled" and self.compile_s > COMPILE_BUDGET_S:
            self.names.remove(name)
            self.notes.append(f"torch.compile took {self.compile_s:.0f} s in all: not timed after {case.label}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def error_text(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:300]


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
def environment(device: torch.device, argv: list[str], copy_bps: float) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = f"{props.name} ({props.multi_processor_count} SMs, L2 {props.L2_cache_size / 1e6:.0f} MB)"
    else:
        name = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m fopru_kernels bench " + " ".join(argv),
        "copy_GBps": copy_bps / 1e9,
    }


def _fmt(v, spec: str) -> str:
    return "—" if v is None else format(v, spec)


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
    ]
    if gpu:
        lines.append(
            f"- graph: a captured CUDA graph of {GRAPH_CALLS} calls, replayed, GPU µs per call; "
            "eager loop: back-to-back Python calls, µs per call"
        )
        lines += ["", "## Targets (LLaVA-1.5, cls, B=1, graph µs per call)", "", "| backend | target | measured | status |"]
        lines.append("| --- | --- | --- | --- |")
        for (backend, score, b), limit in TARGETS.items():
            rec = next(
                (r for r in records if (r["model"], r["backend"], r["score"], r["B"]) == ("LLaVA-1.5", backend, score, b)),
                {},
            )
            got = rec.get("graph_us")
            status = "not measured" if got is None else ("PASS" if got < limit else "FAIL")
            lines.append(f"| {backend} | < {limit} µs | {_fmt(got, '.2f')} | {status} |")
    cols = ["model", "score", "B", "backend", "median µs", "GB/s", "% copy", "× ref", "× compiled", "× loop", "× chain"]
    if gpu:
        cols += ["graph µs/call", "eager loop µs/call"]
    cols += ["exact", "sets"]
    lines += ["", "## Results", "", "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    last_case = None
    for r in records:
        case = (r["model"], r["score"], r["B"])
        if case != last_case:
            floor = [r["model"], r["score"], str(r["B"]), "*bandwidth floor*", f"{r['floor_us']:.1f}"]
            lines.append("| " + " | ".join(floor + [""] * (len(cols) - len(floor))) + " |")
            last_case = case
        sp = r.get("speedup", {})
        row = [r["model"], r["score"], str(r["B"]), r["backend"]]
        if "error" in r:
            row += [f"error: {r['error']}"] + [""] * (len(cols) - 5)
        else:
            row += [f"{r['median_us']:.1f}", f"{r['gbps']:.1f}", f"{r['pct_copy_bw']:.1f}"]
            row += [_fmt(sp.get(b), ".1f") for b in BASELINES]
            if gpu:
                graph = "error" if "graph_error" in r else _fmt(r.get("graph_us"), ".2f")
                row += [graph, _fmt(r.get("eager_loop_us"), ".1f")]
            row += [{True: "yes", False: "**NO**"}.get(r.get("exact"), "—"), str(r["sets"])]
        lines.append("| " + " | ".join(s.replace("|", "/") for s in row) + " |")
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
    """Entry point of `python -m fopru_kernels bench`; returns the exit status (1 if a fused backend
    failed or disagreed with the reference)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m fopru_kernels bench", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for report.md, report.json, latency.png")
    parser.add_argument("--quick", action="store_true", help="LLaVA-1.5 at B=1 and 8 only, fewer repeats")
    parser.add_argument("--device", default=None, help="'cuda' or 'cpu' (default: cuda when available)")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    bench = Bench(device, args.quick)
    copy_bps = copy_bandwidth(device, bench.cfg.copy_bytes)
    print(f"copy bandwidth {copy_bps / 1e9:.0f} GB/s; backends: {', '.join(bench.names)}", flush=True)
    with torch.no_grad():
        for case in bench_cases(args.quick):
            bench.run_case(case)
    add_derived(bench.records, copy_bps)
    env = environment(device, argv, copy_bps)
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
