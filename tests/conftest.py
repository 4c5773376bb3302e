"""Shared fixtures. Nothing here touches the GPU at import or collection time."""
import contextlib

import pytest
import torch

import fopru_kernels as F

# The vLLM plugin's tests need vLLM's CPU build and its own torch: `make test-vllm` runs them in
# .venv-vllm against the installed package (tests/vllm_plugin/pytest.ini).
collect_ignore = ["vllm_plugin"]


def cpu_backends() -> list[str]:
    """Every backend that runs CPU tensors in this install (triton only under TRITON_INTERPRET=1)."""
    return ["auto"] + [b for b in F.available_backends("cpu") if b != "reference"] + ["reference"]


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
