"""Which kernel serves each op (fopru_kernels.backends, README "Backends"): the resolution rule, the
dispatcher slots it fills (checked through the dispatcher itself, without a GPU), the process-wide
setting FOPRU_BACKEND (in fresh processes), explicit backend= against it, and the library-load warning.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cases import op_calls
from conftest import call

import fopru_kernels as F
from fopru_kernels import backends, ops
from fopru_kernels.backends import Install, resolve

ROOT = Path(__file__).resolve().parents[1]
ALL = frozenset(ops.SCHEMAS)
NONE = frozenset()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def run_python(code: str, env: dict | None = None, path: Path = ROOT) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports fopru_kernels from `path`, with `env` on top of ours
    (FOPRU_BACKEND removed unless given)."""
    base = {k: v for k, v in os.environ.items() if k != backends.ENV_VAR}
    full = {**base, "PYTHONPATH": str(path), **(env or {})}
    return subprocess.run([sys.executable, "-c", code], env=full, cwd=path, capture_output=True, text=True, timeout=300)


def run_ok(code: str, env: dict | None = None, path: Path = ROOT) -> str:
    """run_python(code), which must run to its end; returns what it printed."""
    out = run_python(code + "print('ran to the end')\n", env, path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.endswith("ran to the end\n")
    return out.stdout


# ----------------------------------------------------------------------------- the rule


FULL = Install(cpu_ops=ALL, cuda_ops=ALL, triton_ops=ALL)

# (setting, install) -> (CPU tensors, CUDA tensors): README "Backends" as a table.
EXPECTED = [
    ("auto", FULL, "cpu", "triton"),
    ("auto", Install(ALL, ALL, NONE), "cpu", "cuda"),  # no triton: the C++ CUDA kernel
    ("auto", Install(ALL, NONE, ALL), "cpu", "triton"),
    ("auto", Install(NONE, NONE, ALL), "reference", "triton"),
    ("auto", Install(NONE, NONE, NONE), "reference", "reference"),
    ("cpu", FULL, "cpu", "triton"),
    ("cuda", FULL, "cpu", "cuda"),
    ("cuda", Install(ALL, ALL, NONE), "cpu", "cuda"),
    ("triton", FULL, "cpu", "triton"),
    ("triton", Install(NONE, NONE, ALL), "reference", "triton"),
    ("reference", FULL, "reference", "reference"),
    ("reference", Install(NONE, NONE, NONE), "reference", "reference"),
]


@pytest.mark.parametrize("setting,have,cpu,cuda", EXPECTED)
def test_resolution(setting, have, cpu, cuda):
    for op in ALL:
        assert resolve(setting, op, "cpu", have) == cpu
        assert resolve(setting, op, "cuda", have) == cuda


def test_an_op_without_a_kernel_of_the_setting_takes_the_next():
    have = Install(ALL, ALL - {"select"}, ALL - {"significance"})
    assert resolve("cuda", "select", "cuda", have) == "triton"
    assert resolve("triton", "significance", "cuda", have) == "cuda"
    assert resolve("auto", "significance", "cuda", have) == "cuda"


def test_ops_listed_as_verified_run_cuda_cxx_by_default(monkeypatch):
    # The standing rule's switch: after a passing gpu_check run, listed ops go to CUDA C++ under auto.
    monkeypatch.setattr(backends, "CUDA_CXX_BY_DEFAULT", frozenset({"select"}))
    assert resolve("auto", "select", "cuda", FULL) == "cuda"
    assert resolve("auto", "prune_tokens", "cuda", FULL) == "triton"
    assert resolve("triton", "select", "cuda", FULL) == "triton"
    assert resolve("auto", "select", "cpu", FULL) == "cpu"


def test_bad_values_name_the_key_and_the_allowed_values():
    allowed = r"must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got "
    with pytest.raises(ValueError, match="FOPRU_BACKEND " + allowed + "'gpu'"):
        backends.setting_from_env({"FOPRU_BACKEND": "gpu"})
    with pytest.raises(ValueError, match="backend " + allowed + "None"):
        backends.check_backend(None)
    assert backends.setting_from_env({}) == backends.setting_from_env({"FOPRU_BACKEND": ""}) == "auto"
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device, got 'meta'"):
        resolve("auto", "select", "meta", FULL)
    with pytest.raises(ValueError, match="op must be one of 'significance', .* got 'topk'"):
        F.default_backend("cuda", "topk")


def test_settings_this_install_cannot_serve_are_refused():
    lacking = Install(NONE, NONE, NONE)
    for setting, words in [("cpu", "needs the compiled library: why"), ("cuda", "needs the library built with its CUDA"),
                           ("triton", "needs the triton package")]:
        with pytest.raises(ValueError, match=f"FOPRU_BACKEND='{setting}' {words}"):
            backends.check_install(setting, lacking, "why")
    for setting in ("auto", "reference"):
        backends.check_install(setting, lacking, "why")


# ----------------------------------------------------------------------------- this process's slots


def _slot(op: str, key: str) -> str:
    """Where the dispatcher's active kernel for `key` was registered (torch's own dump, any version)."""
    for line in torch._C._dispatch_dump(f"fopru::{op}").splitlines():
        if line.startswith(f"{key}: "):
            return line
    return ""


def test_default_backend_reports_the_rule_for_this_install():
    assert ops.SETTING == "auto", "run the suite without FOPRU_BACKEND"
    for op in ALL:
        for device in ("cpu", "cuda"):
            assert F.default_backend(device, op) == resolve("auto", op, device, ops.INSTALL)
    assert F.default_backend("cpu") == ("cpu" if F.HAS_LIBRARY else "reference")


def test_has_cuda_kernels_means_every_cxx_op_has_its_cuda_kernel():
    # Read from the dispatcher's own record: a C++ kernel is registered from csrc/, active or not.
    dumps = {op: torch._C._dispatch_dump(f"fopru::{op}") for op in ALL}
    has = {op for op in ALL if "csrc/cuda/" in dumps[op]}
    cxx = {op for op in ALL if re.search(r"^CPU( \(inactive\))?: registered at \S*csrc/", dumps[op], re.M)}
    assert ops.CUDA_KERNEL_OPS == has
    assert ops.CPU_KERNEL_OPS == cxx
    assert F.HAS_CUDA_KERNELS == (bool(has) and has == cxx)


def test_every_op_has_every_kernel_of_this_install():
    """A kernel file missing from a build, or an op missing from triton/entry.py's table, fails here:
    with the CUDA kernels built every op has one, and with triton installed every op has a Triton kernel."""
    if ops.CUDA_KERNEL_OPS:
        assert ops.CUDA_KERNEL_OPS == ops.CPU_KERNEL_OPS == ALL
    if ops.INSTALL.triton_ops:
        assert ops.INSTALL.triton_ops == ALL


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
def test_cpu_slots_hold_the_cxx_kernels():
    # Every op has its C++ CPU kernel: a kernel file missing from the build fails here.
    assert ops.CPU_KERNEL_OPS == ALL
    for op in ALL:
        assert "csrc/" in _slot(op, "CPU"), op


@pytest.mark.skipif(not INTERPRETED, reason="runs the CUDA slot's kernel on CPU tensors: TRITON_INTERPRET=1")
@pytest.mark.parametrize("op", sorted(ALL))
def test_cuda_slot_runs_triton_by_default(op, triton_launches):
    """The kernel the dispatcher would run for CUDA tensors, called on CPU tensors (the interpreter
    runs Triton there): it must launch Triton kernels and give the reference's result."""
    assert F.default_backend("cuda", op) == "triton"
    kernel = torch.library.get_kernel(f"fopru::{op}", "CUDA")
    args = op_calls()[op]
    got = kernel.call_boxed(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args)
    assert triton_launches, "the CUDA slot did not run a Triton kernel"
    want = call(op, args, "reference")
    for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        if "_qk" in op:  # q/k significance rounds differently from the float64 oracle
            continue
        assert torch.equal(g, w)
    if F.HAS_CUDA_KERNELS:  # the C++ kernel stays registered under the Python one
        assert "CUDA (inactive): registered at" in torch._C._dispatch_dump(f"fopru::{op}")


def test_op_calls_cover_every_op():
    assert set(op_calls()) == ALL


@pytest.mark.skipif(not F.HAS_CUDA_KERNELS, reason="needs the library's CUDA kernels")
def test_fopru_backend_cuda_puts_the_cxx_kernels_in_the_cuda_slots():
    code = (
        "import torch, fopru_kernels as F\n"
        "from fopru_kernels.ops import SCHEMAS\n"
        "for op in SCHEMAS:\n"
        "    assert F.default_backend('cuda', op) == 'cuda' and F.default_backend('cpu', op) == 'cpu'\n"
        "    line = next(l for l in torch._C._dispatch_dump('fopru::' + op).splitlines() if l.startswith('CUDA'))\n"
        "    assert line.startswith('CUDA: ') and 'csrc/cuda/' in line, line\n"
        "assert not [n for n in torch._C._dispatch_get_all_op_names() if n.startswith('fopru_cxx::')]\n"
    )
    run_ok(code, {"FOPRU_BACKEND": "cuda"})


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
def test_fopru_backend_reference_and_explicit_cpu():
    """FOPRU_BACKEND=reference serves both devices with the reference; backend='cpu' per call still runs
    the C++ kernel (through fopru_cxx::<op>), eager and under torch.compile(fullgraph=True)."""
    code = (
        "import torch, fopru_kernels as F\n"
        "from fopru_kernels import reference\n"
        "calls = []\n"
        "oracle = reference.prune_tokens\n"
        "reference.prune_tokens = lambda *a: calls.append(1) or oracle(*a)\n"
        "assert F.default_backend('cpu') == F.default_backend('cuda') == 'reference'\n"
        "a = torch.rand(2, 2, 17, 17).softmax(-1); t = torch.randn(2, 16, 3)\n"
        "want = oracle(t, a, 4)\n"
        "got = torch.ops.fopru.prune_tokens(t, a, 4)\n"
        "assert calls == [1] and all(map(torch.equal, got, want))\n"
        "got = F.prune_tokens(t, a, 4, backend='cpu')\n"
        "assert calls == [1] and all(map(torch.equal, got, want))\n"
        "compiled = torch.compile(lambda t, a: F.prune_tokens(t, a, 4, backend='cpu'), fullgraph=True, backend='eager')\n"
        "got = compiled(t, a)\n"
        "assert calls == [1] and all(map(torch.equal, got, want))\n"
        "torch.library.opcheck(torch.ops.fopru_cxx.prune_tokens.default, (t, a, 8, 'row', 'focal', 1, None))\n"
    )
    run_ok(code, {"FOPRU_BACKEND": "reference"})


@pytest.mark.skipif(not F.HAS_LIBRARY, reason="compiled library not built")
def test_explicit_cxx_backend_without_get_kernel_is_refused_clearly():
    # torch < 2.9 has no torch.library.get_kernel: a replaced C++ kernel cannot be reached per call.
    code = (
        "import torch\n"
        "del torch.library.get_kernel\n"
        "import fopru_kernels as F\n"
        "a = torch.rand(2, 2, 17, 17); t = torch.randn(2, 16, 3)\n"
        "F.prune_tokens(t, a, 4)\n"
        "try:\n"
        "    F.prune_tokens(t, a, 4, backend='cpu')\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    out = run_ok(code, {"FOPRU_BACKEND": "reference"})
    assert "backend='cpu' cannot reach the C++ kernel of prune_tokens in this process" in out
    assert "set FOPRU_BACKEND='cpu' instead" in out


@pytest.mark.parametrize(
    "env,prelude,message",
    [
        ({"FOPRU_BACKEND": "gpu"}, "",
         "FOPRU_BACKEND must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got 'gpu'"),
        ({"FOPRU_BACKEND": "cpu", "FOPRU_DISABLE_LIBRARY": "1"}, "",
         "FOPRU_BACKEND='cpu' needs the compiled library: disabled by FOPRU_DISABLE_LIBRARY=1"),
        ({"FOPRU_BACKEND": "cuda", "FOPRU_DISABLE_LIBRARY": "1"}, "",
         "FOPRU_BACKEND='cuda' needs the library built with its CUDA kernels"),
        ({"FOPRU_BACKEND": "triton"}, "import sys; sys.modules['triton'] = None\n",
         "FOPRU_BACKEND='triton' needs the triton package"),
    ],
    ids=["unknown", "cpu-without-library", "cuda-without-kernels", "triton-missing"],
)
def test_import_refuses_a_setting(env, prelude, message):
    out = run_python(prelude + "import fopru_kernels\n", env)
    assert out.returncode != 0
    assert f"ValueError: {message}" in out.stderr


def test_import_overrides_kernels_without_warnings():
    # torch warns once per process when a kernel replaces another: the replacement is the intent here.
    code = "import torch\ntorch._C._set_warnAlways(True)\nimport fopru_kernels as F\nprint(F.default_backend('cuda'))\n"
    out = run_python(code, {"PYTHONWARNINGS": "error"})
    assert out.returncode == 0 and out.stderr == "", out.stderr[-3000:]


# ----------------------------------------------------------------------------- the library file


def _package_copy(tmp_path: Path, library: bytes | None) -> Path:
    shutil.copytree(ROOT / "fopru_kernels", tmp_path / "fopru_kernels",
                    ignore=shutil.ignore_patterns("_C.so", "__pycache__"))
    if library is not None:
        (tmp_path / "fopru_kernels" / "_C.so").write_bytes(library)
    return tmp_path


_LOAD = (
    "import warnings\n"
    "with warnings.catch_warnings(record=True) as seen:\n"
    "    warnings.simplefilter('always')\n"
    "    import fopru_kernels as F\n"
    "print('library', F.HAS_LIBRARY)\n"
    "for w in seen:\n"
    "    print(w.category.__name__, w.message)\n"
)


def test_a_library_that_fails_to_load_warns(tmp_path):
    path = _package_copy(tmp_path, b"not a shared object")
    out = run_ok(_LOAD, {"FOPRU_BACKEND": "auto"}, path)
    assert "library False" in out
    lines = [line for line in out.splitlines() if line.startswith("RuntimeWarning")]
    assert len(lines) == 1, out
    assert f"{path / 'fopru_kernels' / '_C.so'} failed to load: " in lines[0]
    assert "invalid ELF header" in lines[0] or "file too short" in lines[0]  # the loader's reason


def test_a_missing_library_is_silent(tmp_path):
    out = run_ok(_LOAD, {}, _package_copy(tmp_path, None))
    assert out.splitlines() == ["library False", "ran to the end"]


# ----------------------------------------------------------------------------- GPU


@pytest.mark.cuda
@pytest.mark.parametrize("op", sorted(ALL))
def test_default_on_cuda_tensors_runs_triton(op, cuda_device, triton_launches):
    if INTERPRETED:
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels")
    args = op_calls(cuda_device)
    if F.default_backend("cuda", op) != "triton":
        pytest.skip(f"this process resolves {op} on CUDA to {F.default_backend('cuda', op)}")
    getattr(torch.ops.fopru, op)(*args[op])
    torch.cuda.synchronize()
    assert triton_launches


@pytest.mark.cuda
@pytest.mark.cuda_cxx
@pytest.mark.parametrize("op", sorted(ALL))
def test_explicit_cuda_runs_the_cxx_kernel(op, cuda_device, triton_launches):
    if not F.HAS_CUDA_KERNELS:
        pytest.skip("needs the library's CUDA kernels")
    args = op_calls(cuda_device)[op]
    got = call(op, args, "cuda")
    torch.cuda.synchronize()
    assert not triton_launches
    want = call(op, tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args), "reference")
    if not "_qk" in op:  # q/k significance rounds differently from the float64 oracle (test_qk.py)
        for g, w in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
            assert torch.equal(g.cpu(), w)
