"""Offline `LLM.generate` with the plugin (issue 10): batches of prompts with 1 and 3 images.

With a `fopru` setting every image is K placeholders, the kept tokens are exactly what
`prune_tokens_qk` keeps on the q/k captured from vLLM's CLIP layer, and greedy output equals
transformers + `apply_fopru` with the same settings on the same checkpoint (float32). Without the
setting the model is stock: 576 placeholders, transformers' and plugin-free vLLM's output.
"""
import pytest
import torch

import fopru_kernels as F
from fopru_kernels.integrations.transformers import QKCapture, apply_fopru, remove_fopru

import cases
import recorder
from checkpoint import PATCHES

GRID = (24, 24)
HEAD_DIM = 16  # the tiny CLIP's 64 / 4
FLOAT_ERROR = 1e-4  # bound on the two CLIPs' significance difference, in value units (measured: 3.2e-5 logit, 1.9e-5 prob; margins 6.7e-3, 7.0e-3)
SETTINGS = {"paper": cases.PAPER, "others": cases.OTHERS}


@pytest.fixture(scope="module", params=list(SETTINGS))
def pruned(request, recorded):
    """(settings, outputs, encoder records) of cases.requests() on an engine with those settings."""
    settings = SETTINGS[request.param]
    return settings, *recorded(settings)


@pytest.fixture(scope="module")
def stock(engine):
    return cases.generate(engine(None), cases.requests())


def image_counts():
    return [len(r["multi_modal_data"]["image"]) for r in cases.requests()]


def test_prompts_hold_k_placeholders_per_image(pruned, stock, image_token):
    _, outputs, _ = pruned
    for out, base, n in zip(outputs, stock, image_counts()):
        assert cases.placeholders(out["prompt"], image_token) == cases.KEEP * n
        assert cases.placeholders(base["prompt"], image_token) == PATCHES * n
        assert len(base["prompt"]) - len(out["prompt"]) == (PATCHES - cases.KEEP) * n
        # the text around the images is untouched
        assert [t for t in out["prompt"] if t != image_token] == [t for t in base["prompt"] if t != image_token]


def test_kept_tokens_are_the_ops_choice_on_captured_qk(pruned):
    settings, _, records = pruned
    assert sum(r["idx"].shape[0] for r in records) == sum(image_counts())
    for r in records:
        assert r["features"].shape[1:] == (PATCHES, 64)
        pruned_ref, idx_ref = F.prune_tokens_qk(
            r["features"], r["q"], r["k"], cases.KEEP, strategy=settings["strategy"], score=settings["score"],
            num_prefix=1, grid=GRID, scale=HEAD_DIM**-0.5, kind=settings["kind"], layout="bshd",
        )
        assert torch.equal(r["idx"], idx_ref)
        assert torch.equal(r["pruned"], pruned_ref)
        assert torch.equal(r["pruned"], r["features"][torch.arange(len(idx_ref))[:, None], idx_ref])


def oracle_significance(q, k, settings) -> torch.Tensor:
    """The float64 oracle's significance, in units of one value (logit or probability) summed over
    heads; per grid row for 'row' (what that strategy ranks)."""
    sig = F.significance_qk(q, k, score=settings["score"], num_prefix=1, scale=HEAD_DIM**-0.5,
                            kind=settings["kind"], layout="bshd", backend="reference").double() / 2**28
    return sig.view(-1, *GRID).sum(-1) if settings["strategy"] == "row" else sig


def boundary_margin(sig: torch.Tensor, settings) -> float:
    """Smallest gap, over the images, between the last kept and the first dropped score."""
    keep = cases.KEEP // GRID[1] if settings["strategy"] == "row" else cases.KEEP
    top = sig.sort(dim=1, descending=True).values
    return float((top[:, keep - 1] - top[:, keep]).min())


def transformers_significance(model, processor, settings) -> torch.Tensor:
    """oracle_significance of every image of cases.requests() from transformers' CLIP layer."""
    sigs = []
    for request in cases.requests():
        pixels = processor.image_processor(request["multi_modal_data"]["image"], return_tensors="pt")["pixel_values"]
        with QKCapture(model.model.vision_tower, model.config.vision_feature_layer) as cap, torch.no_grad():
            model.model.vision_tower(pixel_values=pixels)
        sigs.append(oracle_significance(cap.q, cap.k, settings))
    return torch.cat(sigs)


def test_greedy_output_equals_transformers_apply_fopru(pruned, hf_model):
    settings, outputs, records = pruned
    model, processor = hf_model
    args = {k: v for k, v in settings.items() if k in ("keep", "ratio", "strategy", "score", "kind")}
    handle = apply_fopru(model, **args)
    try:
        expected = [{**cases.transformers_generate(model, processor, r, handle), "idx": handle.last_idx}
                    for r in cases.requests()]
    finally:
        remove_fopru(model)
    # vLLM's and transformers' CLIP round differently: the kept tokens are comparable only where the
    # selection margin is far above that difference (measured here, on the very images).
    ours = torch.cat([oracle_significance(r["q"], r["k"], settings) for r in records])
    theirs = transformers_significance(model, processor, settings)
    assert (ours - theirs).abs().max() < FLOAT_ERROR
    assert boundary_margin(ours, settings) > 10 * FLOAT_ERROR
    hf_idx = torch.cat([e["idx"] for e in expected])
    assert torch.equal(torch.cat([r["idx"] for r in records]), hf_idx)
    for out, exp in zip(outputs, expected):
        assert out["prompt"] == exp["prompt"]
        assert out["tokens"] == exp["tokens"]


def test_without_fopru_the_model_is_stock(engine, stock, hf_model, image_token):
    llm = engine(None)
    assert llm.apply_model(recorder.qkv_hooks) == [0]  # nothing hooked into the tower
    model, processor = hf_model
    expected = [cases.transformers_generate(model, processor, r) for r in cases.requests()]
    for base, exp, n in zip(stock, expected, image_counts()):
        assert cases.placeholders(base["prompt"], image_token) == PATCHES * n
        assert base["prompt"] == exp["prompt"]
        assert base["tokens"] == exp["tokens"]


def test_without_fopru_output_equals_vllm_without_the_plugin(tmp_path, model_dir, stock):
    plain = cases.run_engine(tmp_path, model_dir, {}, env={"VLLM_PLUGINS": "none"})
    assert plain["classes"] == ["LlavaForConditionalGeneration"]  # vLLM's own class: the plugin did not load
    assert plain["outputs"] == stock


def test_image_embeddings_pass_through_unpruned(engine, image_token):
    """Precomputed image embeddings have no encoder attention to score: they keep their own length."""
    embeds = torch.randn(PATCHES, 64, generator=torch.Generator().manual_seed(5))
    request = [{"prompt": cases.USER.format(images="<image>"), "multi_modal_data": {"image": embeds[None]}}]  # one image
    (out,) = cases.generate(engine(cases.PAPER), request)
    (base,) = cases.generate(engine(None), request)
    assert cases.placeholders(out["prompt"], image_token) == PATCHES
    assert out == base
