"""Shared fixtures and the backends the tests run, as pytest params. Nothing here touches the GPU at
import or collection time."""
import contextlib
import os

import pytest
import torch

import fopru_kernels as F

# Triton runs CPU tensors only when TRITON_INTERPRET=1 was set before triton was imported (the Makefile
# sets it); the tests on CUDA tensors need the compiled Triton kernels, i.e. no interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
_PARAM = type(pytest.param(None))  # what pytest.param returns

# The vLLM plugin's tests need vLLM's CPU build and its own torch: `make test-vllm` runs them in
# .venv-vllm against the installed package (tests/vllm_plugin/pytest.ini).
collect_ignore = ["vllm_plugin"]


def cpu_backends() -> list[str]:
    """Every backend that runs CPU tensors in this install (triton only under TRITON_INTERPRET=1)."""
    return ["auto"] + [b for b in F.available_backends("cpu") if b != "reference"] + ["reference"]


def kernel_backends() -> list:
    """The kernels of the CPU-tensor tests that compare with the reference, as pytest params: 'cpu'
    (the C++ kernel) and 'triton' (under TRITON_INTERPRET=1), each skipped where this install lacks it.
    The reference is their oracle, so it is not one of them; 'auto' is one of these two."""
    have = F.available_backends("cpu")
    return [
        pytest.param("cpu", marks=pytest.mark.skipif("cpu" not in have, reason="compiled library not built")),
        pytest.param("triton", marks=pytest.mark.skipif(
            "triton" not in have, reason="Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported")),
    ]


def gpu_backends() -> list:
    """The backends of the CUDA-tensor tests, as pytest params: 'cuda' (the CUDA C++ kernels, marked
    cuda_cxx so that scripts/gpu_check.sh reports them apart) and 'triton', each skipped where this
    install lacks it."""
    have = F.available_backends("cuda")
    return [
        pytest.param("cuda", marks=[pytest.mark.cuda_cxx, pytest.mark.skipif(
            "cuda" not in have, reason="library built without its CUDA kernels")]),
        pytest.param("triton", marks=pytest.mark.skipif("triton" not in have, reason="triton not installed")),
    ]


def per_backend(backends: list, cases: dict[str, list]) -> list:
    """(backend, case) params: each of `backends` (names or params as above) with the cases that
    `cases` lists under its name (a case may be a pytest.param with marks of its own), ids
    '<backend>-<case.id()>'. The backends of one test share its assertions, not always its grid:
    the interpreter, say, runs a trimmed one."""
    def unpack(p):  # (value, marks) of a pytest.param or a plain value
        return (p.values[0], list(p.marks)) if isinstance(p, _PARAM) else (p, [])

    out = []
    for b in backends:
        name, marks = unpack(b)
        for c in cases.get(name, ()):
            case, case_marks = unpack(c)
            out.append(pytest.param(name, case, marks=marks + case_marks, id=f"{name}-{case.id()}"))
    return out


def call(op: str, args: tuple, backend: str):
    """fopru_kernels.<op> with `backend` on arguments given in the op schema's order (the Python API's
    names are the schema's)."""
    names = [a.name for a in getattr(torch.ops.fopru, op).default._schema.arguments]
    return getattr(F, op)(**dict(zip(names, args)), backend=backend)


@contextlib.contextmanager
def cuda_global_keys(enable: bool = True):
    """Inside the block every selection of the CUDA C++ kernels takes the global-memory key path
    (enable=True), which otherwise only keys too large for shared memory take: the library's test
    hook torch.ops.fopru_testing.cuda_force_global_keys, restored afterwards. Needs the library's
    CUDA kernels."""
    hook = torch.ops.fopru_testing.cuda_force_global_keys
    previous = hook(enable)
    try:
        yield
    finally:
        hook(previous)


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


@pytest.fixture
def gpu(request, cuda_device):
    """cuda_device for a test that runs compiled Triton kernels, i.e. every GPU test but those whose
    `backend` parameter is 'cuda' (the CUDA C++ kernels): skipped under TRITON_INTERPRET=1."""
    params = getattr(request.node, "callspec", None)
    if INTERPRETED and (params is None or params.params.get("backend") != "cuda"):
        pytest.skip("TRITON_INTERPRET=1 is set: the GPU tests need compiled kernels")
    return cuda_device


@pytest.fixture
def interpreter():
    """For the Triton tests on CPU tensors that force the launchers' GPU paths (monkeypatched knobs)."""
    if "triton" not in F.available_backends("cpu"):
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported (the Makefile sets it)")


@pytest.fixture
def triton_launches(monkeypatch):
    """A list that gets one entry per Triton kernel launch (`kernel[grid](...)`, compiled or interpreted)."""
    jit = pytest.importorskip("triton.runtime.jit")
    launches = []
    launch = jit.KernelInterface.__getitem__

    def counted(self, grid):
        launches.append(self)
        return launch(self, grid)

    monkeypatch.setattr(jit.KernelInterface, "__getitem__", counted)
    return launches
