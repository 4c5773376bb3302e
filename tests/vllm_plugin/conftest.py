"""The vLLM plugin's tests: vLLM's CPU build, in its own venv (`make test-vllm`). Engines are shared
per settings for the whole session; the tiny checkpoint is built once."""
import os
import sys

# Before vLLM reads its environment: a 1 GiB KV cache, engines in this process (start in seconds),
# and the recorder functions allowed into worker processes (tensor-parallel runs).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

import pytest  # noqa: E402

import fopru_kernels  # noqa: E402

import cases  # noqa: E402
import checkpoint  # noqa: E402

def pytest_configure(config):
    # The package under test is the one built and installed into this venv (against its torch), never
    # the repository's in-place build; and vLLM must find the plugin through its entry point.
    where = os.path.realpath(fopru_kernels.__file__)
    if not where.startswith(os.path.realpath(sys.prefix)):
        raise pytest.UsageError(f"fopru_kernels was imported from {where}, not from this venv ({sys.prefix})")
    if not fopru_kernels.HAS_LIBRARY:
        raise pytest.UsageError(f"fopru_kernels' library did not load: {fopru_kernels.ops.LIBRARY_ERROR}")
    from importlib.metadata import entry_points

    if "fopru" not in {ep.name for ep in entry_points(group="vllm.general_plugins")}:
        raise pytest.UsageError("the vllm.general_plugins entry point 'fopru' is not installed")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return checkpoint.build(str(tmp_path_factory.mktemp("tiny-llava")))


@pytest.fixture(scope="session")
def next_model_dir(tmp_path_factory):
    return checkpoint.build(str(tmp_path_factory.mktemp("tiny-llava-next")), next_model=True)


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """qwen_dir(family) -> the tiny Qwen-VL checkpoint of that family ('qwen2', 'qwen2_5', 'qwen3'), built once."""
    import qwen_checkpoint

    made = {}

    def get(family):
        if family not in made:
            made[family] = qwen_checkpoint.build(str(tmp_path_factory.mktemp(f"tiny-{family}")), family)
        return made[family]

    return get


@pytest.fixture(scope="session")
def image_token(model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir).image_token_index


@pytest.fixture(scope="session")
def engine(model_dir, next_model_dir):
    """engine(fopru, next_model=False) -> an LLM of the tiny LLaVA-1.5 (or LLaVA-NeXT) checkpoint with
    hf_overrides {"fopru": fopru} (None: no fopru key), made once per session."""
    from vllm import LLM

    made = {}

    def get(fopru=None, next_model=False):
        key = repr((fopru, next_model))
        if key not in made:
            overrides = {} if fopru is None else {"hf_overrides": {"fopru": dict(fopru)}}
            args = {**cases.ENGINE, **(cases.NEXT_ENGINE if next_model else {}), **overrides}
            made[key] = LLM(model=next_model_dir if next_model else model_dir, **args)
        return made[key]

    yield get
    made.clear()


@pytest.fixture(scope="session")
def recorded(engine):
    """recorded(fopru) -> (outputs, encoder records) of cases.requests() on engine(fopru), run once:
    a second run of the same images would hit vLLM's encoder cache and encode nothing."""
    import recorder

    made = {}

    def get(fopru):
        key = repr(fopru)
        if key not in made:
            llm = engine(fopru)
            assert llm.apply_model(recorder.install) == ["FoPruLlavaForConditionalGeneration"]
            outputs = cases.generate(llm, cases.requests())
            (records,) = llm.apply_model(recorder.collect)
            made[key] = outputs, records
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_model(model_dir):
    """transformers' LlavaForConditionalGeneration and processor on the same checkpoint, float32."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)
