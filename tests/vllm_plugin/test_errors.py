"""Bad settings stop the engine at start (issue 10, item 3): one ValueError naming the key and the
allowed values, raised while vLLM builds its config, before any weight is loaded or request taken."""
import pytest

import cases
import checkpoint


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory):
    return checkpoint.build_text_only(str(tmp_path_factory.mktemp("tiny-llama")))


def start(model_dir, fopru, **engine):
    from vllm import LLM

    return LLM(model=model_dir, **{**cases.ENGINE, **engine}, hf_overrides={"fopru": fopru})


@pytest.mark.parametrize(
    "fopru, message",
    [
        ({"keep": 0}, r"fopru.keep must be an int >= 1"),
        ({"keep": -4}, r"fopru.keep must be an int >= 1"),
        ({"keep": 577}, r"fopru.keep must be in \[1, 576\]"),
        ({"ratio": 0.0}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"ratio": 1.25}, r"fopru.ratio must be a number in \(0, 1\]"),
        ({"ratio": 0.001}, r"fopru.ratio=0.001 keeps no token of an image's 576 patches"),
        ({"keep": 144, "ratio": 0.25}, r"fopru: give exactly one of 'keep'"),
        ({"keep": 144, "score": "attention"}, r"fopru.score must be one of 'focal', 'received', 'cls'"),
        ({"keep": 144, "strategy": "top"}, r"fopru.strategy must be one of 'rank', 'row'"),
        ({"keep": 144, "kind": "softmax"}, r"fopru.kind must be one of 'prob', 'logit'"),
        ({"keep": 100, "strategy": "row"}, r"fopru.keep=100 with strategy 'row' must be a multiple of the grid's 24 "
                                           r"columns \(whole rows\); nearest allowed: 96, 120"),
        ({"keep": 144, "layer": -1}, r"fopru.layer must name an attention layer vLLM builds.*\[1, 2\] or \[-3, -2\]"),
        ({"keep": 144, "backend": "gpu"}, r"fopru.backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference'"),
        ({"keep": 144, "backend": "cuda"}, r"fopru.backend='cuda' cannot run on cpu in this install; allowed here"),
        ({"keep": 144, "keeep": 1}, r"fopru.keeep is not a setting; allowed keys: 'keep', 'ratio', 'strategy'"),
        ("keep=144", r"fopru must be a dict of settings"),
    ],
)
def test_bad_setting_stops_the_engine_at_start(model_dir, fopru, message):
    with pytest.raises(ValueError, match=message):
        start(model_dir, fopru)


def test_llava_next_takes_rank_only(next_model_dir):
    with pytest.raises(ValueError, match=r"fopru.strategy must be one of 'rank' \(LLaVA-NeXT's packed image sequence is no single grid\), got 'row'"):
        start(next_model_dir, {"keep": 144, "strategy": "row"}, **cases.NEXT_ENGINE)


@pytest.mark.parametrize(
    "family, fopru, engine, message",
    [
        ("qwen2_5", {"keep": 8, "score": "cls"}, {},
         r"fopru.score must be one of 'focal', 'received' \(Qwen-VL towers have no CLS token\), got 'cls'"),
        ("qwen2_5", {"keep": 8, "layer": 0}, {},
         r"fopru.layer must index a full-attention block of the vision tower, one of \[1, 3\], got 0"),
        ("qwen3", {"keep": 8, "layer": -4}, {},
         r"fopru.layer must index a full-attention block of the vision tower, one of \[0, 1, 2\], got -4"),
        ("qwen2", {"ratio": 1.5}, {}, r"fopru.ratio must be a number in \(0, 1\]"),
        ("qwen3", {"keep": 8, "strategy": "column"}, {}, r"fopru.strategy must be one of 'rank', 'row', got 'column'"),
        ("qwen2_5", {"keep": 8}, {"video_pruning_rate": 0.5},
         r"fopru: FoPru prunes images and videos itself and cannot be combined with vLLM's video pruning "
         r"\(video_pruning_rate=0.5\)"),
    ],
)
def test_bad_qwen_setting_stops_the_engine_at_start(qwen_dir, family, fopru, engine, message):
    import qwen_cases

    with pytest.raises(ValueError, match=message):
        start(qwen_dir(family), fopru, **{**qwen_cases.ENGINE, **engine})


def test_unsupported_architecture_is_refused(text_model_dir):
    with pytest.raises(ValueError, match=r"fopru: the FoPru plugin does not support architecture 'LlamaForCausalLM'; "
                                         r"supported: 'LlavaForConditionalGeneration', 'LlavaNextForConditionalGeneration', "
                                         r"'Qwen2VLForConditionalGeneration', 'Qwen2_5_VLForConditionalGeneration', "
                                         r"'Qwen3VLForConditionalGeneration'"):
        start(text_model_dir, {"keep": 144})


def test_transformers_backend_is_refused(model_dir):
    """model_impl='transformers' runs transformers' own LLaVA code, which the plugin does not patch."""
    with pytest.raises(ValueError, match=r"fopru: the FoPru plugin does not support architecture 'Transformers"):
        start(model_dir, {"keep": 144}, model_impl="transformers")


def test_without_fopru_other_architectures_start(text_model_dir):
    from vllm import LLM

    llm = LLM(model=text_model_dir, **{k: v for k, v in cases.ENGINE.items() if k != "limit_mm_per_prompt"})
    assert cases.generate(llm, ["The quick brown fox"])[0]["tokens"]


class _Context:
    """The part of vLLM's InputProcessingContext the processing info reads."""

    def __init__(self, config):
        self.config = config

    def get_hf_config(self, *args):
        return self.config


@pytest.mark.parametrize("fopru, count", [(None, 576), ({"keep": 144}, 144), ({"ratio": 0.25, "strategy": "row"}, 144)])
def test_processing_info_reports_the_kept_count(model_dir, fopru, count):
    from transformers import AutoConfig

    from fopru_kernels.integrations.vllm.llava import FoPruLlavaProcessingInfo

    config = AutoConfig.from_pretrained(model_dir)
    if fopru is not None:
        config.fopru = fopru
    info = FoPruLlavaProcessingInfo(_Context(config))
    assert info.get_num_image_tokens(image_width=640, image_height=480) == count
    assert info.get_max_image_tokens() == count  # vLLM's encoder budget


def test_processing_info_checks_the_settings_itself(model_dir):
    """Every process that builds a processor checks the settings, not only the one that built the config."""
    from transformers import AutoConfig

    from fopru_kernels.integrations.vllm.llava import FoPruLlavaProcessingInfo

    config = AutoConfig.from_pretrained(model_dir)
    config.fopru = {"keep": 577}
    with pytest.raises(ValueError, match=r"fopru.keep must be in \[1, 576\]"):
        FoPruLlavaProcessingInfo(_Context(config))
