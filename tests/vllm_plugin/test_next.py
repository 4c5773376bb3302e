"""LLaVA-NeXT in vLLM: every image's packed sequence (base crop, unpadded anyres tiles, a newline per
row) keeps its newlines and budget(patches) of its patch tokens, as the transformers adapter does.

Checked against transformers + `apply_fopru` on the same tiny checkpoint (float32), same settings:
the prompts (placeholders per image), the kept tokens (which crop token each one is) and the greedy
output. Without a `fopru` key the model is stock.
"""
import pytest
import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from fopru_kernels.integrations.transformers import apply_fopru, remove_fopru

import cases
import recorder
from checkpoint import IMAGE_SIZE, PATCHES, PINPOINTS

SETTINGS = {
    "ratio": {"ratio": 0.25, "score": "focal", "kind": "logit"},
    "keep": {"keep": 300, "score": "cls", "kind": "prob"},
}


@pytest.fixture(scope="module", params=list(SETTINGS))
def pruned(request, engine):
    settings = SETTINGS[request.param]
    llm = engine(settings, next_model=True)
    llm.apply_model(recorder.install_next)
    outputs = cases.generate(llm, cases.requests())
    (records,) = llm.apply_model(recorder.collect_next)
    return settings, outputs, records


@pytest.fixture(scope="module")
def hf_next(next_model_dir):
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    model = LlavaNextForConditionalGeneration.from_pretrained(next_model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(next_model_dir)


def local_sources(handle, image_sizes) -> torch.Tensor:
    """The adapter's kept sources (crops numbered over its batch) renumbered within each image."""
    crops = [image_size_to_num_patches(s, PINPOINTS, IMAGE_SIZE) for s in image_sizes.tolist()]
    first = torch.tensor([0] + crops[:-1]).cumsum(0)
    counts = handle.last_cu_seqlens.diff()
    offset = torch.repeat_interleave(first, counts) * PATCHES
    return torch.where(handle.last_source < 0, handle.last_source, handle.last_source - offset)


def test_generate_equals_transformers_apply_fopru(pruned, hf_next, image_token):
    settings, outputs, records = pruned
    model, processor = hf_next
    handle = apply_fopru(model, **settings)
    try:
        expected = []
        for request in cases.requests():
            out = cases.transformers_generate(model, processor, request, handle)
            expected.append({**out, "source": local_sources(handle, out["inputs"]["image_sizes"])})
    finally:
        remove_fopru(model)
    for out, exp in zip(outputs, expected):
        assert out["prompt"] == exp["prompt"]
        assert out["tokens"] == exp["tokens"]
    assert torch.equal(torch.cat([r["source"] for r in records]), torch.cat([e["source"] for e in expected]))
    assert all(r["cu_seqlens"][0] == 0 for r in records)


def test_without_fopru_the_model_is_stock(pruned, engine, hf_next, image_token):
    _, outputs, _ = pruned
    stock = cases.generate(engine(None, next_model=True), cases.requests())
    model, processor = hf_next
    for base, out, request in zip(stock, outputs, cases.requests()):
        exp = cases.transformers_generate(model, processor, request)
        assert base["prompt"] == exp["prompt"]
        assert base["tokens"] == exp["tokens"]
        assert cases.placeholders(out["prompt"], image_token) < cases.placeholders(base["prompt"], image_token)
