"""Shared fixtures. Nothing here touches the GPU at import or collection time."""
import pytest
import torch

import fopru_kernels as F

# The vLLM plugin's tests need vLLM's CPU build and its own torch: `make test-vllm` runs them in
# .venv-vllm against the installed package (tests/vllm_plugin/pytest.ini).
collect_ignore = ["vllm_plugin"]


def cpu_backends() -> list[str]:
    """Every backend that runs CPU tensors in this install (triton only under TRITON_INTERPRET=1)."""
    return ["auto"] + [b for b in F.available_backends("cpu") if b != "reference"] + ["reference"]


@pytest.fixture
def cuda_device():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
