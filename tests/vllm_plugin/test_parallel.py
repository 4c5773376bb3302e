"""Tensor parallelism (issue 10, item 4). vLLM splits the CLIP heads over the TP ranks; the plugin
all-reduces each rank's int64 partial significance over the TP group, so every rank keeps the same
tokens, the ones one rank with all heads keeps.

- two gloo processes, no vLLM: `prune_patches` on half the heads each equals all heads in one process,
  bit for bit;
- vLLM with tensor_parallel_size=2 (one core per rank): every rank keeps the same tokens as TP = 1, and
  the greedy output is TP = 1's. `mm_encoder_tp_mode="data"` is accepted; vLLM's LLaVA does not
  support it and falls back to splitting the heads ("weights"), so the same path runs.
"""
import socket

import pytest
import torch
import torch.multiprocessing as mp

from fopru_kernels.integrations.settings import parse_settings
from fopru_kernels.integrations.vllm.common import PrunePlan, prune_patches

import cases
import gloo_ranks

PLANS = [
    {"keep": 144, "strategy": "rank", "score": "focal", "kind": "logit"},
    {"keep": 96, "strategy": "row", "score": "received", "kind": "logit"},
    {"keep": 100, "strategy": "rank", "score": "cls", "kind": "prob"},
]


def plan(raw) -> PrunePlan:
    settings = parse_settings(raw)
    return PrunePlan(settings, settings.kept_count(576), 576, (24, 24), 1, 0)


def test_gloo_ranks_keep_what_one_process_keeps(tmp_path):
    plans = [plan(raw) for raw in PLANS]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(gloo_ranks.rank_main, args=(2, port, plans, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    tokens, q, k = gloo_ranks.inputs()
    for i, p in enumerate(plans):
        pruned, idx = prune_patches(tokens, q, k, p, 16**-0.5)  # one process, all four heads
        for rank in ranks:
            assert torch.equal(rank[i][1], idx), PLANS[i]
            assert torch.equal(rank[i][0], pruned), PLANS[i]


@pytest.fixture(scope="module")
def tp1(recorded):
    """TP = 1 in this process: outputs and kept indices of cases.requests() with the paper's settings."""
    outputs, records = recorded(cases.PAPER)
    return outputs, per_image([r["idx"].tolist() for r in records])


def per_image(batches: list[list[list[int]]]) -> list[list[int]]:
    """Kept indices per image, in encoding order, whatever batches the scheduler formed."""
    return [image for batch in batches for image in batch]


@pytest.mark.parametrize("encoder_mode", ["weights", "data"])
def test_tp2_keeps_tp1_tokens_on_every_rank(tmp_path, model_dir, tp1, encoder_mode):
    env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}  # one core per rank; the default asks for 2 NUMA nodes
    args = {"tensor_parallel_size": 2, "mm_encoder_tp_mode": encoder_mode, "hf_overrides": {"fopru": cases.PAPER}}
    run = cases.run_engine(tmp_path, model_dir, args, env)
    assert run["classes"] == ["FoPruLlavaForConditionalGeneration"] * 2
    # LLaVA has no data-parallel encoder in vLLM: both modes split the 4 heads over the 2 ranks.
    assert run["parallel"] == [{"heads": 2, "total": 4}] * 2
    outputs, idx = tp1
    rank0, rank1 = (per_image(rank) for rank in run["idx"])
    assert len(idx) == 4  # every image of cases.requests() encoded (not served from a cache)
    assert rank0 == rank1  # every rank keeps the same tokens: the all-reduce is exact
    assert rank0 == idx
    assert run["outputs"] == outputs
