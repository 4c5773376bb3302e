"""Qwen2.5-VL under tensor parallelism (TP = 2, one core per rank, engines in processes of their own).

- mm_encoder_tp_mode="weights": each rank's vision tower has one of the two heads; the plugin all-reduces
  the int64 partial significance over the TP group, so both ranks keep the tokens TP = 1 keeps;
- mm_encoder_tp_mode="data": each rank encodes whole items with both heads, and vLLM's all-gather brings
  the significance (byte channels of the embeddings) with the rows: both ranks keep TP = 1's tokens.
Greedy output equals TP = 1's in both modes.
"""
import gc

import pytest

import cases
import qwen_cases
import qwen_recorder

FAMILY = "qwen2_5"
ARCH = "FoPruQwen2_5_VLForConditionalGeneration"


@pytest.fixture(scope="module")
def tp1(qwen_dir):
    """TP = 1 in this process, paper settings: outputs, and per modality the kept indices of every run."""
    from vllm import LLM

    llm = LLM(model=qwen_dir(FAMILY), **qwen_cases.ENGINE, hf_overrides={"fopru": qwen_cases.SETTINGS["paper"]})
    assert llm.apply_model(qwen_recorder.install) == [ARCH]
    outputs = qwen_cases.generate(llm, qwen_cases.requests(FAMILY))
    (records,) = llm.apply_model(qwen_recorder.collect)
    kept = qwen_cases.kept_per_run(FAMILY, records["kept"])
    del llm
    gc.collect()
    return outputs, kept


@pytest.mark.parametrize("encoder_mode, heads", [("weights", 1), ("data", 2)])
def test_tp2_keeps_tp1_tokens_on_every_rank(tmp_path, qwen_dir, tp1, encoder_mode, heads):
    args = {"tensor_parallel_size": 2, "mm_encoder_tp_mode": encoder_mode,
            "hf_overrides": {"fopru": qwen_cases.SETTINGS["paper"]}}
    run = cases.run_engine(tmp_path, qwen_dir(FAMILY), args, env={"VLLM_CPU_OMP_THREADS_BIND": "0|1"},
                           suite=f"qwen:{FAMILY}")
    assert run["classes"] == [ARCH] * 2
    assert run["parallel"] == [{"heads": heads, "total": 2}] * 2
    outputs, kept = tp1
    assert [len(kept["image"]), len(kept["video"])] == [4, 1]  # every item encoded, none served from a cache
    rank0, rank1 = run["idx"]
    assert rank0 == rank1 == kept
    assert run["outputs"] == outputs
