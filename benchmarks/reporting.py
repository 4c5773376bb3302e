"""What both benchmark reports write the same way: the environment block (device, versions, date and
the command that produced the numbers), number cells and markdown tables, and the error scan that
sets a report's exit status."""
from __future__ import annotations

import datetime
import platform

import torch


def environment(device: torch.device, command: str, copy_bps: float) -> dict:
    """Device, versions, date, `command` (the exact command line, so every number names its
    command) and the copy bandwidth of this run."""
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
        "command": command,
        "copy_GBps": copy_bps / 1e9,
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def fmt(v, spec: str) -> str:
    """A number cell; '—' where nothing was measured."""
    return "—" if v is None else format(v, spec)


def status_cell(value, limit, gpu: bool) -> str:
    """A target cell: met when value < limit; only a GPU run judges (CPU runs use tiny shapes)."""
    if value is None:
        return "not measured"
    if not gpu:
        return "n/a (CPU smoke run)"
    return "met" if value < limit else "**not met**"


def timer_cell(rec: dict) -> str:
    """The headline µs of a timing.measure record, or 'error'."""
    return "error" if "error" in rec else f"{rec['us']:.1f}"


def progress_line(head: str, rec: dict, result) -> str:
    """One record's progress line: `head`, then its error or `result(rec)` (a timed record's numbers)."""
    return f"{head} ERROR {rec['error']}" if "error" in rec else f"{head} {result(rec)}"


def md_row(cells: list) -> str:
    return "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"


def md_table(cols: list[str], rows: list[list]) -> list[str]:
    return [md_row(cols), "|" + " --- |" * len(cols)] + [md_row(r) for r in rows]


def has_error(obj) -> bool:
    """Whether any record below obj carries an 'error' or 'agreement_error' (a measurement that raised)."""
    if isinstance(obj, dict):
        return "error" in obj or "agreement_error" in obj or any(has_error(v) for v in obj.values())
    if isinstance(obj, list):
        return any(has_error(v) for v in obj)
    return False
