"""Compile Triton launches for a GPU target on a machine without a GPU: nothing runs, every
distinct specialisation goes through Triton's whole pipeline (frontend, MLIR passes, ptxas).

    session = CompileOnly(arch=90)      # before the process launches any Triton kernel
    with session:
        ...                             # kernel[grid](...) launches are recorded, not run
    results = session.compile(jobs=2)   # one compile per distinct specialisation

It relies only on Triton interfaces that 3.6 and 3.8 share:
- ``triton.runtime.driver.driver.set_active``: a driver that reports a CUDA target of the given
  arch. ``JITFunction.run`` asks it for the device, the stream and the target, nothing else, since
  nothing is launched.
- ``triton.knobs.runtime.jit_cache_hook``: ``JITFunction.run`` calls it with each specialisation it
  is about to compile, after binding the arguments exactly as for a launch (dtypes, constexprs,
  the integer and alignment specialisations). The hook records the specialisation and returns
  True, which makes ``run`` skip both the compile and the launch; specialisations are deduplicated
  by Triton's own cache key.
- ``JITFunction.preload(specialization_data)``: Triton's own path from a recorded specialisation
  to a compiled kernel, run in worker processes.
- ``triton.knobs.nvidia.dump_ptxas_log``: Triton runs ptxas with ``-v``; with this knob it prints the
  log, which gives registers and spills (the driver would report them only when loading the
  kernel on a GPU). Shared memory is in the compiled kernel's metadata.

The session installs process-wide state (Triton's active driver and hook): give it a process of
its own, started without TRITON_INTERPRET=1 (under the interpreter nothing is ever compiled).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import importlib
import importlib.util
import io
import multiprocessing
import os
import re
import sys
import time

# Opt-in maximum of dynamic shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin),
# by compute capability; Triton launches every kernel with dynamic shared memory only.
MAX_SHARED = {70: 96 * 1024, 75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
REGS_PER_BLOCK = 65536  # register file a block can hold, every arch above
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


@dataclasses.dataclass
class Spec:
    """One distinct specialisation of one kernel, as Triton would compile it for a launch."""

    kernel: str  # qualified name, module:qualname
    key: str  # Triton's cache key for it (its specialisation and options)
    data: str  # Triton's specialisation JSON (what JITFunction.preload takes)
    file: str  # the kernel's source file, for workers that cannot import its module by name
    constexprs: dict  # declared tl.constexpr parameter -> value
    dtypes: dict  # pointer parameter -> Triton type ('*fp16', ...)
    num_warps: int
    origin: str  # label of the launch that first produced it


@dataclasses.dataclass
class Result:
    """What compiling a Spec gave: error text, or the kernel's resource use."""

    spec: Spec
    error: str | None = None
    shared: int = 0  # bytes of shared memory per block
    regs: int = 0  # registers per thread
    spill_stores: int = 0  # bytes per thread
    spill_loads: int = 0
    stack: int = 0  # bytes of stack frame per thread
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def _fake_driver(arch: int):
    """The part of Triton's driver interface that JITFunction.run and preload use when nothing
    is launched."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyCudaDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False  # never chosen by Triton's own driver discovery

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("compile-only driver: nothing is launched")

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("compile-only driver: nothing is launched")

        def get_current_device(self):
            return 0

        def get_current_stream(self, device):
            return 0

    return CompileOnlyCudaDriver()


def install_driver(arch: int) -> None:
    """Makes Triton compile for CUDA sm_<arch> in this process, and print ptxas logs."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile checks need TRITON_INTERPRET unset: the interpreter never compiles")
    import triton
    from triton.runtime.driver import driver

    driver.set_active(_fake_driver(arch))
    triton.knobs.nvidia.dump_ptxas_log = True


def _qualname(jit_fn) -> str:
    return f"{jit_fn.fn.__module__}:{jit_fn.fn.__qualname__}"


class CompileOnly:
    """Records every launch in its `with` block as a specialisation to compile (see the module
    docstring); ``compile()`` then compiles each distinct one once."""

    def __init__(self, arch: int = 90):
        if arch not in MAX_SHARED:
            raise ValueError(f"arch must be one of {sorted(MAX_SHARED)}, got {arch}")
        self.arch = arch
        self.specs: dict[tuple[str, str], Spec] = {}
        self.origin = ""  # label attached to specialisations recorded from now on
        install_driver(arch)

    def _hook(self, *, key, repr, fn, compile, is_manual_warmup, already_compiled):
        jit_fn = fn.jit_function
        name = _qualname(jit_fn)
        if (name, str(key)) in self.specs:
            return True
        params = jit_fn.params
        constexprs = {params[path[0]].name: value for path, value in compile["constants"].items()
                      if len(path) == 1 and params[path[0]].is_constexpr}
        dtypes = {k: v for k, v in compile["signature"].items() if isinstance(v, str) and v.startswith("*")}
        self.specs[(name, str(key))] = Spec(
            kernel=name, key=str(key), data=compile["specialization_data"], file=jit_fn.fn.__code__.co_filename,
            constexprs=constexprs, dtypes=dtypes, num_warps=compile["num_warps"], origin=self.origin,
        )
        return True  # skip compile and launch: compile() does the compiling

    def __enter__(self):
        import triton

        if triton.knobs.runtime.jit_cache_hook is not None:
            raise RuntimeError("triton.knobs.runtime.jit_cache_hook is already set")
        triton.knobs.runtime.jit_cache_hook = self._hook
        return self

    def __exit__(self, *exc):
        import triton

        triton.knobs.runtime.jit_cache_hook = None
        return False

    def compile(self, jobs: int = 1) -> list[Result]:
        """Compiles every recorded specialisation (in `jobs` worker processes when > 1) and
        judges it against the target's limits; results in recording order."""
        specs = list(self.specs.values())
        if jobs <= 1 or len(specs) <= 1:
            results = [compile_spec(s) for s in specs]
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
            with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=install_driver,
                                                        initargs=(self.arch,)) as pool:
                results = list(pool.map(compile_spec, specs))
        for r in results:
            if r.ok:
                r.error = limit_error(r, self.arch)
        return results


def _kernel(spec: Spec):
    """The JITFunction a Spec names, importing its module by name, else from its file."""
    module_name, qualname = spec.kernel.split(":")
    module = sys.modules.get(module_name)
    if module is None:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            loader = importlib.util.spec_from_file_location(module_name, spec.file)
            module = importlib.util.module_from_spec(loader)
            sys.modules[module_name] = module
            loader.loader.exec_module(module)
    obj = module
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _first_int(pattern: str, text: str) -> int:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else 0


def compile_spec(spec: Spec) -> Result:
    """Compiles one specialisation through Triton (needs install_driver in this process)."""
    result = Result(spec)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = _kernel(spec).preload(spec.data)
    except Exception as e:  # noqa: BLE001: every compile error is a result to report
        result.error = f"{type(e).__name__}: {e}"
    else:
        text = log.getvalue()
        result.shared = int(kernel.metadata.shared)
        result.regs = _first_int(r"Used (\d+) registers", text)
        result.spill_stores = _first_int(r"(\d+) bytes spill stores", text)
        result.spill_loads = _first_int(r"(\d+) bytes spill loads", text)
        result.stack = _first_int(r"(\d+) bytes stack frame", text)
        if "Used " not in text:
            # Only a kernel taken from Triton's on-disk cache skips ptxas; the check uses a fresh one.
            result.error = "no ptxas log: registers and spills unknown (kernel from Triton's cache?)"
    result.seconds = time.perf_counter() - start
    return result


def limit_error(r: Result, arch: int) -> str | None:
    """Why the GPU would refuse to launch this kernel, or None: shared memory beyond the
    opt-in maximum, or more registers than a block can hold."""
    if r.shared > MAX_SHARED[arch]:
        return (f"out of resource: shared memory, required {r.shared} bytes, "
                f"sm_{arch} allows {MAX_SHARED[arch]} per block")
    per_warp = -(-r.regs * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    if per_warp * r.spec.num_warps > REGS_PER_BLOCK:
        return (f"out of resource: registers, {r.regs} per thread x {32 * r.spec.num_warps} threads "
                f"exceed the {REGS_PER_BLOCK} a block can hold")
    return None
