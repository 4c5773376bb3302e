"""`python -m benchmarks.serving --out DIR [--quick] [--only SECTIONS]`: the serving benchmarks.

Run from the repository root. Writes DIR/serving.md (one table per benchmark, targets marked met /
not met) and DIR/serving.json (every number), rewritten after each section so a run cut short by a
timeout still leaves a report.

1. q/k path (serving_qk.py): `significance_qk` / `prune_tokens_qk` at LLaVA-1.5 shape (H=16, S=577,
   d=64, fp16, D=1024, keep 144) as a share of ONE `scaled_dot_product_attention` call of that layer,
   per backend; peak memory of the q/k path against the output_attentions-style map path.
2. varlen (serving_varlen.py): `prune_tokens_varlen` on 8 images of mixed sizes against one dense
   `select` + gather of the same total size (and the per-image loop engines run today).
3. LLaVA end to end (serving_llava.py): a LLaVA-1.5-7B-shaped model with random fp16 weights, time to
   first token at several `keep` through the transformers adapter, and the share of it spent pruning.
4. Qwen packed q/k (serving_qwen.py): `prune_tokens_qk_varlen` (packed significance + prune) on 8 images
   of mixed sizes against one Qwen2.5-VL-7B-shaped vision encoder block (random weights) on them.

On a GPU every op is timed as a replayed CUDA graph (GPU µs per call; per-call CUDA events where
capture fails) with inputs rotated over enough sets to overflow L2 (timing.py). Without a GPU the
same code runs with tiny shapes and a host timer: a smoke run that proves the code paths, not a
measurement.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from .reporting import environment, has_error
from .serving_llava import bench_llava, llava_markdown
from .serving_plan import backends_for, plan_for
from .serving_qk import bench_qk, qk_markdown
from .serving_qwen import bench_qwen, qwen_markdown
from .serving_varlen import bench_varlen, varlen_markdown
from .timing import copy_bandwidth, error_text

COMMAND = "python -m benchmarks.serving"
SECTIONS = ("qk", "varlen", "llava", "qwen")
SERVING_OPS = ("significance_qk", "prune_tokens_qk", "prune_tokens_varlen", "select", "significance_qk_varlen",
               "prune_tokens_qk_varlen")


def kernel_origin(op: str, device: torch.device) -> str:
    """'C++' or 'Python' (the reference on CPU, the Triton launcher on CUDA): which registration serves
    torch.ops.fopru.<op> on `device`, so a 'cuda' row without a C++ CUDA kernel is labelled as such."""
    key = "CUDA" if device.type == "cuda" else "CPU"
    line = next((ln for ln in torch._C._dispatch_dump(f"fopru::{op}").splitlines() if ln.startswith(f"{key}:")), "")
    if not line:
        return "none"
    return "Python" if ".py:" in line.split("::")[0] else "C++"



def markdown(env: dict, results: dict, notes: list[str]) -> str:
    gpu = env["device_type"] == "cuda"
    python_kernel = "the Triton launcher, so that op's 'cuda' rows time Triton" if gpu else "the reference"
    lines = [
        "# fopru_kernels serving benchmarks", "",
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
    for name, render in (("qk", qk_markdown), ("varlen", varlen_markdown), ("llava", llava_markdown),
                         ("qwen", qwen_markdown)):
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
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
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
    env = environment(device, shlex.join([*COMMAND.split(), *argv]), copy_bps)
    env.update(backends=backends,
               plan=asdict(plan), kernels={op: kernel_origin(op, device) for op in SERVING_OPS})
    print(f"serving bench on {env['device']}; backends {', '.join(backends)}", flush=True)
    results: dict = {}
    notes: list[str] = []
    failed = False
    runners = {
        "qk": lambda: bench_qk(plan, device, backends),
        "varlen": lambda: bench_varlen(plan, device, backends, copy_bps),
        "llava": lambda: bench_llava(plan, device),
        "qwen": lambda: bench_qwen(plan, device, backends),
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
            failed |= "error" in results[name] or has_error(results[name])
            notes_now = notes + [f"{n}: {results[n]['wall_s']:.0f} s" for n in results]
            write(args.out, env, results, notes_now)  # after each section: a timeout keeps what ran
    env["wall_s"] = time.perf_counter() - t0
    notes += [f"{n}: {results[n]['wall_s']:.0f} s" for n in results] + [f"whole run: {env['wall_s']:.0f} s"]
    print(write(args.out, env, results, notes))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
