"""Launch plumbing every Triton launcher shares: block sizes, the device a launch runs on, and small
int64 tables copied from the host to the device without a sync, also under CUDA graph capture.

Host tables under CUDA graph capture. A launcher that needs per-image host values on the device
(prune_tokens_varlen's keep / offsets / grids) copies a small int64 table asynchronously. Eagerly
that is a pinned tensor and a non_blocking copy: torch's caching host allocator records an event
and reuses the pinned block only after the copy ran. Under capture the copy becomes a graph node
that reads the host address again at every replay, so the block must stay valid and unchanged for
the graph's whole life, and torch's allocator does not promise that on every version this package
allows (torch >= 2.6): graph-private host pools, which keep such blocks, came only with later
releases; before them a block freed after capture could be handed to the next pinned allocation
and overwritten before a replay, and allocating pinned memory during capture could query CUDA
events, which a capture in the default (global) mode forbids. So under capture a table never comes
from a freed-and-reused block: it is written once into a pinned arena this module holds for the
rest of the process (never freed, never rewritten; equal tables share one slot), and the arena is
allocated by eager calls, before any capture (warm-up runs come first in every capture recipe):
each eager call leaves at least half of the device's last arena free, so no pinned allocation has to
happen during a capture unless its distinct tables need more than that (then the arena grows during
the capture, which torch may refuse in global capture mode). Each distinct captured table costs
its 8 bytes per value of pinned memory for the life of the process.
"""
from __future__ import annotations

import contextlib
import threading

import torch
import triton

# Values of the first arena of a device (each later one doubles): 64 KiB of pinned memory.
ARENA_VALUES = 8192


def pow2(n: int) -> int:
    """The power of two at or above n (1 for n <= 1): the block sizes the launchers pick."""
    return triton.next_power_of_2(max(int(n), 1))


def device_of(t: torch.Tensor):
    """Context for a launch on t's device: Triton launches on the current device (compiled graphs
    guard devices themselves, so nothing is switched while compiling)."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


class GraphTables:
    """Append-only arenas of int64 host memory, one list per device key: `table(key, values)` returns
    a (len(values),) view that nothing ever frees or rewrites, the same view for the same values.
    pin: arenas in pinned memory (CUDA; False for tests on machines without a GPU). Thread-safe."""

    def __init__(self, pin: bool = True, arena_values: int = ARENA_VALUES):
        self.pin = pin
        self.arena_values = arena_values
        self._lock = threading.Lock()
        self._arenas: dict[object, list[list]] = {}  # key -> [[tensor, used], ...]; the last one fills
        self._tables: dict[tuple, torch.Tensor] = {}

    def reserve(self, key) -> None:
        """Makes sure `key`'s last arena has at least half of it free (a new arena, twice the last one's
        size, when not), so that the tables of a capture after this eager call need no pinned
        allocation unless they take more than that. Cheap when nothing is needed."""
        arenas = self._arenas.get(key)
        if arenas and 2 * arenas[-1][1] <= arenas[-1][0].numel():
            return
        with self._lock:
            arenas = self._arenas.setdefault(key, [])
            if not arenas or 2 * arenas[-1][1] > arenas[-1][0].numel():
                self._grow(arenas, 0)

    def table(self, key, values: list[int]) -> torch.Tensor:
        values = tuple(int(v) for v in values)
        with self._lock:
            found = self._tables.get((key, values))
            if found is not None:
                return found
            arenas = self._arenas.setdefault(key, [])
            if not arenas or arenas[-1][1] + len(values) > arenas[-1][0].numel():
                self._grow(arenas, len(values))
            arena = arenas[-1]
            view = arena[0][arena[1]:arena[1] + len(values)]
            view.copy_(torch.tensor(values, dtype=torch.int64))
            arena[1] += len(values)
            self._tables[(key, values)] = view
            return view

    def _grow(self, arenas: list[list], need: int) -> None:
        """Appends an empty arena to one key's `arenas` (lock held): the first of arena_values values,
        each later one twice the last one, and never fewer than `need`."""
        size = max(need, 2 * arenas[-1][0].numel() if arenas else self.arena_values)
        arenas.append([self._new_arena(size), 0])

    def _new_arena(self, size: int) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int64, pin_memory=self.pin)


_GRAPH_TABLES = GraphTables()


def capturing(device: torch.device) -> bool:
    """True while the current stream of CUDA `device` is being captured into a CUDA graph."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _pinned(values: list[int]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, pin_memory=True)


def host_table(values: list[int], device: torch.device) -> torch.Tensor:
    """The int64 host tensor device_table copies to CUDA `device`: a slot of the graph arena while the
    device's current stream is capturing, else a fresh pinned tensor (after making sure the device
    has its arena, so that a later capture finds it allocated)."""
    key = device.index if device.index is not None else torch.cuda.current_device()
    if capturing(device):
        return _GRAPH_TABLES.table(key, values)
    _GRAPH_TABLES.reserve(key)
    return _pinned(values)


def device_table(values: list[int], device: torch.device) -> torch.Tensor:
    """(len(values),) int64 on `device` holding `values`, copied without a host sync; under CUDA graph
    capture from host memory that stays valid for every replay (module docstring). The copy runs on
    the current stream of `device`."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=torch.int64, device=device)
    return host_table(values, device).to(device, non_blocking=True)
