"""The vLLM plugin's integer channels (integrations/vllm/common.py): int64 values ride along embeddings of
any float dtype vLLM serves in, as one channel per byte, and come back exactly. (No vLLM needed.)"""
import pytest
import torch

from fopru_kernels.integrations.vllm.common import append_ints, split_ints


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_ints_survive_the_embedding_dtype(dtype):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(5, 7, generator=g).to(dtype)
    ints = torch.tensor([[0, 1], [-1, 2**62], [-(2**63), 2**63 - 1], [123456789012, -987654321], [255, 256]])
    widened = append_ints(rows, ints)
    assert widened.shape == (5, 7 + 16) and widened.dtype == dtype
    back, values = split_ints(widened, 2)
    assert torch.equal(back, rows)
    assert torch.equal(values, ints)
    assert torch.equal(split_ints(widened[1:4], 2)[1], ints[1:4])  # row slices keep their values
