"""Timers of both benchmark reports: CUDA events, replayed CUDA graphs, back-to-back eager loops and
a host timer, with inputs rotated over enough sets to overflow the cache, and the copy bandwidth the
reports compare against. Nothing here touches the GPU at import time.
"""
from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

GRAPH_CALLS = 100  # calls captured in one CUDA graph
CPU_CACHE_BYTES = 32 << 20  # stand-in for the last-level cache when rotating CPU inputs

Call = Callable[..., object]


@dataclass(frozen=True)
class Timing:
    """How long to time one measurement: about target_s of timed work, within [min_reps, max_reps]
    calls; graph_replays replays of a captured CUDA graph (0: no graph)."""

    target_s: float
    min_reps: int
    max_reps: int
    graph_replays: int


def rotation_count(set_bytes: int, cache_bytes: int, cap: int = 128) -> int:
    """Input sets to cycle through so that together they overflow the cache three times over."""
    return max(1, min(cap, math.ceil(3 * cache_bytes / max(set_bytes, 1))))


def cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    return CPU_CACHE_BYTES


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call(call: Call, sets: list[tuple], device: torch.device) -> tuple[object, float]:
    """(output, seconds) of the first call on sets[0]: Triton JIT and torch.compile happen here."""
    t0 = time.perf_counter()
    out = call(*sets[0])
    sync(device)
    return out, time.perf_counter() - t0


def estimate_s(call: Call, sets: list[tuple], device: torch.device) -> float:
    """Wall time of one warm call (the caller has run the first, compiling one)."""
    sync(device)
    t0 = time.perf_counter()
    call(*sets[-1])
    sync(device)
    return time.perf_counter() - t0


def time_cuda_us(call: Call, sets: list[tuple], reps: int) -> float:
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


def time_host_us(call: Call, sets: list[tuple], reps: int) -> float:
    """Median µs of a host timer around each call (CPU tensors)."""
    samples = []
    for i in range(reps):
        t0 = time.perf_counter()
        call(*sets[i % len(sets)])
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e6


def graph_us(call: Call, sets: list[tuple], replays: int) -> float:
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


def eager_loop_us(call: Call, sets: list[tuple], calls: int) -> float:
    """µs per call of back-to-back eager calls from Python (host issue rate or GPU time, the larger)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(calls):
        call(*sets[i % len(sets)])
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e6 / calls


def time_warm(call: Call, sets: list[tuple], device: torch.device, timing: Timing, graph: bool = True) -> dict:
    """Times call(*set) over rotated sets after its first call: {'reps', 'eager_us' (per-call CUDA
    events, or the host timer on a CPU), 'graph_us' | 'graph_error' (on a GPU when `graph` and
    timing.graph_replays), 'us' (graph_us where measured, else eager_us) and 'timer' (which it is)}."""
    est = estimate_s(call, sets, device)
    reps = int(min(timing.max_reps, max(timing.min_reps, timing.target_s / max(est, 1e-7))))
    rec: dict = {"reps": reps}
    if device.type != "cuda":
        rec["eager_us"] = rec["us"] = time_host_us(call, sets, reps)
        rec["timer"] = "host"
        return rec
    for s in sets[: min(len(sets), reps)]:  # warm every set once
        call(*s)
    rec["eager_us"] = time_cuda_us(call, sets, reps)
    rec["us"], rec["timer"] = rec["eager_us"], "events"
    if graph and timing.graph_replays:
        try:
            rec["graph_us"] = graph_us(call, sets, timing.graph_replays)
            rec["us"], rec["timer"] = rec["graph_us"], "graph"
        except Exception as e:  # not capturable: the per-call events stand, the caller reports it
            rec["graph_error"] = error_text(e)
    return rec


def measure(call: Call, sets: list[tuple], device: torch.device, timing: Timing) -> dict:
    """first_call, then time_warm: time_warm's record plus 'first_call_s'."""
    _, seconds = first_call(call, sets, device)
    return {"first_call_s": seconds, **time_warm(call, sets, device, timing)}


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


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes/s of a large same-device copy, counting bytes read plus bytes written."""
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sets = [(src,)]

    def copy(s: torch.Tensor) -> torch.Tensor:
        return dst.copy_(s)

    copy(src)
    us = time_cuda_us(copy, sets, 20) if device.type == "cuda" else time_host_us(copy, sets, 5)
    return 2 * nbytes / (us * 1e-6)


def error_text(e: Exception) -> str:
    """One line for a report cell: the exception's type and the first line of its message."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"[:300]
