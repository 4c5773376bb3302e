#!/usr/bin/env python3
"""Compiles every Triton kernel the GPU path would run, for a GPU target, on a machine without one.

Under TRITON_INTERPRET=1 the tests check the kernels' logic but never compile them: a kernel that
needs more shared memory or registers than the GPU has, or that uses a feature the GPU host's
Triton lacks, would fail only on its first GPU run. This script runs the public ops
(``fopru_kernels.prune_tokens(..., backend="triton")``, the q/k and the ragged-batch ops) over the
cases of ``triton_compile_grid.py`` on CPU tensors, with the launchers configured as on the GPU
(``fopru_kernels.triton.target.gpu_tuning``: tiles, warps and flags from the GPU's SM count), while
a compile-only Triton driver (``triton_compile_only.py``) turns every launch into a recorded
specialisation. Each distinct specialisation is then compiled once, through Triton and ptxas, for
the target (default sm_90; ``--arch 80`` for sm_80) and judged against its limits.

Failures (exit status 1): a compile error (its text is printed), shared memory beyond the
target's per-block maximum, more registers than a block holds, a case that raised, and coverage
gaps: every ``@triton.jit`` kernel under fopru_kernels/triton/ (found by introspection: the jit
functions that no other jit function calls) must compile, and each of its tl.constexpr parameters
with every value of its DOMAINS entry (the values its launcher can pass on a GPU) unless
UNREACHABLE gives a reason; a value outside DOMAINS fails too (a launcher took its interpreter
branch, or DOMAINS is stale). Registers and spills are reported, not judged: a kernel that
spills still runs.

What it proves: the kernels compile with this Triton for this target and fit its limits. Not that
they compute the right values or run fast: the GPU tests and benchmarks check that.

    python scripts/triton_compile_check.py [--arch 90|80] [-j JOBS] [--case TEXT] [--json FILE] [-v]
    PYTHONPATH=DIR python scripts/triton_compile_check.py --expect-triton 3.6.0   # Triton from DIR

Triton's cache for the run is a fresh temporary directory, removed at the end (or the directory
named by FOPRU_COMPILE_CHECK_CACHE, removed too): a cached kernel would skip ptxas and its log.

Adding a case is one line in CASES of triton_compile_grid.py; a new kernel (the packed q/k varlen
kernels, say) or constexpr parameter also needs its DOMAINS entry there, and its launcher must ask
``target.for_gpu(device)`` / ``target.sm_count(device)``, never ``device.type``, so that it takes
its GPU branch here.
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import pkgutil
import resource
import shutil
import sys
import tempfile
import textwrap
import time
from types import ModuleType

# Before Triton is imported: kernels decorated under the interpreter are never compiled, and a
# fresh cache makes every specialisation go through the compiler, so that ptxas prints its log.
# Compile workers re-run this module's top level (multiprocessing spawn) and share the cache.
os.environ.pop("TRITON_INTERPRET", None)
if "FOPRU_COMPILE_CHECK_CACHE" not in os.environ:
    os.environ["FOPRU_COMPILE_CHECK_CACHE"] = tempfile.mkdtemp(prefix="fopru-triton-compile-check-")
os.environ["TRITON_CACHE_DIR"] = os.environ["FOPRU_COMPILE_CHECK_CACHE"]
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]

import torch  # noqa: E402
import triton  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import triton_compile_grid as grid  # noqa: E402
import triton_compile_only as tco  # noqa: E402
from fopru_kernels.triton import target  # noqa: E402

SMS = {90: 132, 80: 108}  # launchers tune for the SM count: H100 / H200, A100


# ----------------------------------------------------------------------------------- coverage


def package_modules(package: str = "fopru_kernels.triton") -> list[ModuleType]:
    pkg = importlib.import_module(package)
    return [importlib.import_module(m.name) for m in pkgutil.iter_modules(pkg.__path__, package + ".")]


def discover_kernels(modules: list[ModuleType]) -> dict[str, JITFunction]:
    """Every @triton.jit function of these modules that no other one calls, by name: the kernels
    launchers launch (the others are device helpers, compiled into them). A jit function passed to a
    call inside another (the combine function of tl.associative_scan / tl.reduce) counts as called."""
    found = {id(v): v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)}
    called = set()
    for fn in found.values():
        for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(fn.fn)))):
            if not isinstance(node, ast.Call):
                continue
            for ref in (node.func, *node.args, *(kw.value for kw in node.keywords)):
                if isinstance(callee := _resolve(ref, fn.fn.__globals__), JITFunction):
                    called.add(id(callee))
    kernels = {}
    for fn in found.values():
        if id(fn) not in called:
            if fn.fn.__qualname__ in kernels:
                raise RuntimeError(f"two kernels named {fn.fn.__qualname__}: DOMAINS needs unique names")
            kernels[fn.fn.__qualname__] = fn
    return kernels


def _resolve(node: ast.expr, scope: dict):
    """The object that a call's `f` or `mod.f` names in a module's scope, or None."""
    if isinstance(node, ast.Name):
        return scope.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _resolve(node.value, scope)
        return None if base is None else getattr(base, node.attr, None)
    return None


def kernel_name(spec: tco.Spec) -> str:
    return spec.kernel.split(":")[1]


def coverage_problems(kernels: dict[str, JITFunction], specs: list[tco.Spec], domains: dict,
                      unreachable: dict) -> list[str]:
    """Kernels never compiled, constexpr parameters without a DOMAINS entry, DOMAINS values never
    compiled (and not unreachable), compiled values outside DOMAINS, DOMAINS entries for no kernel."""
    seen: dict[str, dict[str, set]] = {}
    for s in specs:
        values = seen.setdefault(kernel_name(s), {})
        for param, value in [*s.constexprs.items(), *s.dtypes.items()]:
            values.setdefault(param, set()).add(value)
    problems = []
    for name, fn in sorted(kernels.items()):
        if name not in seen:
            problems.append(f"{name}: never compiled (no case launches it)")
            continue
        declared = domains.get(name, {})
        for p in fn.params:
            if p.is_constexpr and p.name not in declared:
                problems.append(f"{name}.{p.name}: constexpr without a DOMAINS entry "
                                f"(compiled with {sorted(seen[name].get(p.name, ()), key=repr)})")
        for param, domain in declared.items():
            got = seen[name].get(param, set())
            missing = [v for v in domain if v not in got and (name, param, v) not in unreachable]
            extra = sorted((v for v in got if v not in domain), key=repr)
            if missing:
                problems.append(f"{name}.{param}: never compiled with {missing}")
            if extra:
                problems.append(f"{name}.{param}: compiled with {extra}, outside its DOMAINS entry")
    problems += [f"{name}: in DOMAINS but no kernel has that name" for name in sorted(set(domains) - set(kernels))]
    return problems


# ----------------------------------------------------------------------------------- the check


@dataclasses.dataclass
class Report:
    results: list[tco.Result]
    failures: list[str]
    specs: list[tco.Spec]
    record_seconds: float


def run_check(cases: list[grid.Case], arch: int, sms: int, jobs: int, modules: list[ModuleType] | None,
              domains: dict, unreachable: dict) -> Report:
    """Runs the cases with launches recorded, compiles every distinct specialisation, judges them;
    checks coverage of the kernels in `modules` against `domains` unless modules is None."""
    start = time.perf_counter()
    session = tco.CompileOnly(arch)
    failures = []
    with session, target.gpu_tuning(sms):
        for case in cases:
            session.origin = case.label
            try:
                case.run()
            except Exception as e:  # noqa: BLE001: a case that raises is a failure to report
                failures.append(f"case {case.label} raised {type(e).__name__}: {e}")
    recorded = time.perf_counter() - start
    results = session.compile(jobs)
    failures += [f"{kernel_name(r.spec)} {r.spec.constexprs} {r.spec.dtypes} (warps={r.spec.num_warps}; "
                 f"from {r.spec.origin}):\n" + textwrap.indent(_head(r.error), "    ") for r in results if not r.ok]
    specs = list(session.specs.values())
    if modules is not None:
        failures += [f"coverage: {p}" for p in coverage_problems(discover_kernels(modules), specs, domains, unreachable)]
    return Report(results, failures, specs, recorded)


def _head(text: str, lines: int = 25) -> str:
    """The first lines of an error (a ptxas error carries the whole PTX)."""
    parts = text.splitlines()
    return "\n".join(parts[:lines] + ([f"... ({len(parts) - lines} more lines)"] if len(parts) > lines else []))


def summary_table(results: list[tco.Result]) -> str:
    rows: dict[str, dict] = {}
    for r in results:
        row = rows.setdefault(kernel_name(r.spec), dict(specs=0, failed=0, smem=0, regs=0, spills=0, seconds=0.0))
        row["specs"] += 1
        row["failed"] += not r.ok
        row["smem"] = max(row["smem"], r.shared)
        row["regs"] = max(row["regs"], r.regs)
        row["spills"] = max(row["spills"], r.spill_stores)
        row["seconds"] += r.seconds
    w = max([len("kernel"), *map(len, rows)])  # the name column fits the longest kernel name
    head = f"{'kernel':<{w}} {'specs':>5} {'failed':>6} {'max smem':>10} {'max regs':>8} {'max spill':>10} {'compile s':>9}"
    lines = [head, "-" * len(head)]
    for name, row in sorted(rows.items()):
        lines.append(f"{name:<{w}} {row['specs']:>5} {row['failed']:>6} {row['smem'] / 1024:>6.1f} KiB "
                     f"{row['regs']:>8} {row['spills']:>8} B {row['seconds']:>9.1f}")
    lines += ["-" * len(head), f"{'total':<{w}} {len(results):>5} {sum(not r.ok for r in results):>6}"]
    return "\n".join(lines)


def _cpu_seconds() -> float:
    return sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for f in ("ru_utime", "ru_stime"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SMS), help="compute capability (default 90)")
    parser.add_argument("--sms", type=int, help="SM count the launchers tune for (default: 132 for 90, 108 for 80)")
    parser.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1, help="compile processes")
    parser.add_argument("--case", action="append", default=[],
                        help="only the cases whose label contains this text (repeatable; no coverage check)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--json", help="write every specialisation and its result to this file")
    parser.add_argument("--expect-triton", help="fail unless this Triton version is the one imported")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per specialisation")
    args = parser.parse_args(argv)

    cases = [c for c in grid.CASES if not args.case or any(t in c.label for t in args.case)]
    if args.list:
        print("\n".join(c.label for c in cases))
        return 0
    print(f"Triton {triton.__version__} ({os.path.dirname(triton.__file__)}), torch {torch.__version__}")
    if args.expect_triton and triton.__version__ != args.expect_triton:
        print(f"FAIL: expected Triton {args.expect_triton}, imported {triton.__version__}")
        return 1
    if not cases:
        print(f"FAIL: no case matches {args.case}")
        return 1
    sms = args.sms or SMS[args.arch]
    start = time.perf_counter()
    try:
        report = run_check(cases, args.arch, sms, args.jobs, None if args.case else package_modules(),
                           grid.DOMAINS, grid.UNREACHABLE)
    finally:
        shutil.rmtree(os.environ["FOPRU_COMPILE_CHECK_CACHE"], ignore_errors=True)
    results = report.results
    print(f"target cuda sm_{args.arch}, launchers tuned for {sms} SMs: {len(cases)} cases -> "
          f"{len(results)} distinct specialisations, compiled in {args.jobs} processes")
    if args.verbose:
        for r in results:
            print(f"  {kernel_name(r.spec)} warps={r.spec.num_warps} {r.spec.constexprs} {r.spec.dtypes}: smem "
                  f"{r.shared} regs {r.regs} spills {r.spill_stores} {r.seconds:.1f} s {'ok' if r.ok else 'FAILED'}")
    print(summary_table(results))
    if args.case:
        print("coverage not checked (--case)")
    elif not any(f.startswith("coverage:") for f in report.failures):
        print(f"coverage: every kernel under fopru_kernels/triton/ compiled with every DOMAINS value"
              + (f" ({len(grid.UNREACHABLE)} listed unreachable)" if grid.UNREACHABLE else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{**{k: v for k, v in dataclasses.asdict(r).items() if k != "spec"},
                        **{k: v for k, v in dataclasses.asdict(r.spec).items() if k != "data"}} for r in results],
                      f, indent=1, default=repr)
    for failure in report.failures:
        print(f"FAIL: {failure}")
    print(f"{'FAIL' if report.failures else 'PASS'}: Triton {triton.__version__}, sm_{args.arch}, "
          f"{len(results)} specialisations, {len(report.failures)} failures, "
          f"{time.perf_counter() - start:.0f} s ({_cpu_seconds():.0f} CPU s)")
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
