"""Shared fixtures. Nothing here touches the GPU at import or collection time."""
import pytest
import torch

import fopru_kernels as F


def cpu_backends() -> list[str]:
    """Every backend that runs CPU tensors in this install (triton only under TRITON_INTERPRET=1)."""
    return ["auto"] + [b for b in F.available_backends("cpu") if b != "reference"] + ["reference"]


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
