"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL in the plugin (issue 11, item 5), on tiny random checkpoints built
here: a batch of a one-image prompt and a prompt with three images of different sizes and a video.

With a `fopru` setting, for the paper's settings and a set covering the other values:
- every placeholder run of the prompt holds exactly its kept count (worked out from the grids here);
- the kept tokens are the packed op's selection on the q / k captured from vLLM's scored vision block
  (Qwen2.5-VL's window order undone with transformers' window index, not the plugin's);
- greedy output, prompt ids and kept indices equal transformers + `apply_fopru` on the same checkpoint
  (float32), where the significance margins measured on the very images are far above the float error
  between vLLM's and transformers' towers;
- under chunked prefill (16 tokens per step: every prompt spans several steps, and a step ends inside
  a placeholder run) the language model gets, token for token, the M-RoPE positions transformers'
  gets, and the same output.
Without the setting the model is stock: unpruned placeholders, transformers' stock output.
"""
import gc

import pytest
import torch

import fopru_kernels as F
from fopru_kernels.integrations.qwen_vl import QwenQKCapture, raster_order
from fopru_kernels.integrations.transformers import apply_fopru, remove_fopru

import qwen_cases
import qwen_checkpoint
import qwen_recorder

VISION_SCALE = 16**-0.5  # the tiny towers' head size: 32 / 2
# Bound on the difference between the significance of vLLM's and of transformers' q / k, in fixed-point units
# (2^-28 of a value): measured at most 337 (logit) and 7 (prob) on these checkpoints and inputs, where the
# smallest selection margin measured 148,462.
FLOAT_ERROR = 2**10


@pytest.fixture(scope="module", params=qwen_cases.FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(family, qwen_dir):
    return qwen_dir(family)


@pytest.fixture(scope="module")
def engines(family, checkpoint):
    """engines(settings_name | None, chunked=False) -> an LLM of the family's checkpoint, made once per
    family; all of them are released when the family's tests are done (each holds a 1 GiB KV cache)."""
    from vllm import LLM

    made = {}

    def get(name=None, chunked=False):
        if (name, chunked) not in made:
            args = dict(qwen_cases.ENGINE)
            if name is not None:
                args["hf_overrides"] = {"fopru": qwen_cases.SETTINGS[name]}
            if chunked:
                args.update(max_num_batched_tokens=qwen_cases.CHUNK, enable_chunked_prefill=True)
            made[name, chunked] = LLM(model=checkpoint, **args)
        return made[name, chunked]

    yield get
    made.clear()
    gc.collect()


@pytest.fixture(scope="module")
def hf(family, checkpoint):
    """transformers' model and processor on the same checkpoint, float32, and q / k capture per tower pass."""
    from transformers import AutoProcessor

    model = qwen_checkpoint.model_class(family).from_pretrained(checkpoint, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module", params=list(qwen_cases.SETTINGS))
def pruned(request, family, engines, hf):
    """One settings set: vLLM's outputs and records (the batch on the plain engine, each request alone on
    the chunked-prefill engine), and transformers' (outputs, kept indices per run, significance per tower pass)."""
    name = request.param
    settings = qwen_cases.SETTINGS[name]
    reqs = qwen_cases.requests(family)
    runs = {}
    for engine_name, chunked in (("plain", False), ("chunked", True)):
        llm = engines(name, chunked)
        assert llm.apply_model(qwen_recorder.install) == [f"FoPru{qwen_checkpoint.model_class(family).__name__}"]
        outputs = qwen_cases.generate(llm, reqs) if not chunked else [qwen_cases.generate(llm, [r])[0] for r in reqs]
        (records,) = llm.apply_model(qwen_recorder.collect)
        runs[engine_name] = outputs, records
    model, processor = hf
    handle = apply_fopru(model, **settings)
    capture = QwenQKCapture(model.model.visual, handle.capture.block)
    significance = []  # per tower pass: (modality... ) encoder-order oracle significance of transformers' q / k
    hook = model.model.visual.register_forward_hook(
        lambda *_: significance.append(oracle_significance(*capture.qk(), capture.cu_seqlens, settings)))
    try:
        expected = []
        for r in reqs:
            out = qwen_cases.transformers_generate(model, processor, r, handle)
            out["kept"] = {m: qwen_cases.local_indices(handle.last_idx[m], handle.last_cu_seqlens[m], family, g, m)
                           for m, g in media_grids(r, processor).items()}
            expected.append(out)
    finally:
        hook.remove()
        capture.remove()
        remove_fopru(model)
    return {"name": name, "settings": settings, "plain": runs["plain"], "chunked": runs["chunked"],
            "expected": expected, "hf_significance": significance}


def media_grids(request: dict, processor) -> dict:
    """modality -> grid_thw (M, 3) of a request's media, as the processor computes them."""
    media = request["multi_modal_data"]
    out = {"image": processor.image_processor(media["image"], return_tensors="pt")["image_grid_thw"]}
    if "video" in media:
        frames, _ = media["video"][0]
        out["video"] = processor.video_processor([frames], do_sample_frames=False, return_tensors="pt")["video_grid_thw"]
    return out


def oracle_significance(q, k, cu_seqlens, settings) -> torch.Tensor:
    """The float64 oracle's significance of each merged token (encoder order), fixed point."""
    return F.significance_qk_varlen(q, k, cu_seqlens.long(), score=settings["score"],
                                    scale=VISION_SCALE, kind=settings["kind"], group=4, backend="reference")


def to_raster(sig: torch.Tensor, family: str, grid_thw, model) -> torch.Tensor:
    """Merged-token values from the encoder's order to raster order: Qwen2.5-VL's window order undone with
    transformers' window index (independent of vLLM's and the plugin's)."""
    if family != "qwen2_5":
        return sig
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as qwen2_5

    visual = model.model.visual
    index, _ = qwen2_5.get_vision_window_index(torch.as_tensor(grid_thw), visual.spatial_merge_size,
                                               visual.window_size, visual.patch_size)
    return sig[raster_order(index)]


def selection_margin(sig: torch.Tensor, family: str, grid_thw, modality: str, keeps: list[int], strategy: str) -> int:
    """Smallest gap, over the runs, between the last kept and the first dropped score (row sums for 'row')."""
    gaps, start = [], 0
    for (rows, cols), keep in zip(qwen_cases.run_grids(family, grid_thw, modality), keeps):
        run = sig[start:start + rows * cols]
        start += rows * cols
        scores, kept = (run.view(rows, cols).sum(1), keep // cols) if strategy == "row" else (run, keep)
        if kept < len(scores):
            top = scores.sort(descending=True).values
            gaps.append(int(top[kept - 1] - top[kept]))
    return min(gaps)


def tower_passes(pruned, engine: str = "plain") -> list[dict]:
    return pruned[engine][1]["tower"]


def test_prompts_hold_the_kept_count_per_run(pruned, family, hf):
    model, _ = hf
    expected = qwen_cases.expected_runs(family, pruned["settings"])
    for out, runs in zip(pruned["plain"][0], expected):
        assert qwen_cases.placeholder_runs(out["prompt"], {model.config.image_token_id, model.config.video_token_id}) == runs


def test_kept_tokens_are_the_ops_choice_on_captured_qk(pruned, family, hf):
    settings, (model, _) = pruned["settings"], hf
    passes = tower_passes(pruned)
    assert sorted(p["modality"] for p in passes) == ["image", "video"]  # the batch's images in one pass
    for p in passes:
        q, k = p["query"].flatten(0, 1), p["key"].flatten(0, 1)  # (1, T, H, d) as the attention got them
        sig = F.significance_qk_varlen(q, k, p["cu_seqlens"].long(), score=settings["score"], scale=VISION_SCALE,
                                       kind=settings["kind"], group=4)
        sig = to_raster(sig, family, p["grid"], model)
        grids = qwen_cases.run_grids(family, p["grid"], p["modality"])
        keep = (p["cu_seqlens_out"][1:] - p["cu_seqlens_out"][:-1]).tolist()
        select = torch.tensor([0] + [r * c for r, c in grids]).cumsum(0)
        pruned_ref, idx_ref, _ = F.prune_tokens_varlen(p["features"], sig, select, keep, strategy=settings["strategy"],
                                                       grids=grids)
        assert torch.equal(p["idx"], idx_ref)
        assert torch.equal(p["features"][idx_ref], pruned_ref)


def test_greedy_output_and_kept_tokens_equal_transformers_apply_fopru(pruned, family, hf):
    """vLLM's and transformers' towers round differently: the kept tokens are comparable only where the
    selection margin is far above that difference, measured here on the very inputs."""
    settings, (model, _) = pruned["settings"], hf
    passes, theirs = tower_passes(pruned), pruned["hf_significance"]
    ours = torch.cat([oracle_significance(p["query"].flatten(0, 1), p["key"].flatten(0, 1), p["cu_seqlens"], settings)
                      for p in passes])
    assert ours.shape == torch.cat(theirs).shape  # the same merged tokens were scored
    assert (ours - torch.cat(theirs)).abs().max() < FLOAT_ERROR
    for p in passes:
        keeps = (p["cu_seqlens_out"][1:] - p["cu_seqlens_out"][:-1]).tolist()
        sig = to_raster(oracle_significance(p["query"].flatten(0, 1), p["key"].flatten(0, 1), p["cu_seqlens"], settings),
                        family, p["grid"], model)
        assert selection_margin(sig, family, p["grid"], p["modality"], keeps, settings["strategy"]) > 10 * FLOAT_ERROR
    kept = qwen_cases.kept_per_run(family, pruned["plain"][1]["kept"])
    assert kept == {m: [run for e in pruned["expected"] for run in e["kept"].get(m, [])] for m in ("image", "video")}
    for out, exp in zip(pruned["plain"][0], pruned["expected"]):
        assert out["prompt"] == exp["prompt"]
        assert out["tokens"] == exp["tokens"]


def prefill_steps(positions: list[torch.Tensor], outputs: list[dict]) -> list[list[torch.Tensor]]:
    """The forward steps' positions (3, T) of requests run one after the other, split per request into its
    prefill steps (its decode steps, T = 1, are skipped)."""
    out, steps = [], iter(positions)
    for output in outputs:
        length = len(output["prompt"])
        mine, seen = [], 0
        while seen < length:
            step = next(steps)
            mine.append(step)
            seen += step.shape[1]
        assert seen == length
        out.append(mine)
        for _ in output["tokens"][1:]:  # its decode steps (the prefill's last step gave the first token)
            assert next(steps).shape[1] == 1
    return out


def test_chunked_prefill_gets_transformers_positions_and_output(pruned, hf):
    model, _ = hf
    outputs, records = pruned["chunked"]
    steps = prefill_steps(records["positions"], outputs)
    pads = {model.config.image_token_id, model.config.video_token_id}
    split_runs = 0
    for out, exp, request_steps in zip(outputs, pruned["expected"], steps):
        # really chunked: several steps of at most CHUNK tokens
        assert len(request_steps) > 1 and all(s.shape[1] <= qwen_cases.CHUNK for s in request_steps)
        ends = torch.tensor([s.shape[1] for s in request_steps]).cumsum(0)[:-1].tolist()
        split_runs += sum(out["prompt"][e - 1] in pads and out["prompt"][e] in pads for e in ends)
        assert torch.equal(torch.cat(request_steps, dim=1), exp["positions"])
        assert out["prompt"] == exp["prompt"]
        assert out["tokens"] == exp["tokens"]
    assert split_runs > 0  # some step ended inside a placeholder run: a media item's rows came in two steps
    assert [o["tokens"] for o in outputs] == [o["tokens"] for o in pruned["plain"][0]]


def test_without_fopru_the_model_is_stock(family, engines, hf):
    model, processor = hf
    llm = engines(None)
    assert llm.apply_model(qwen_recorder.hooks) == [{"fopru": None, "prunes_media": False, "tower_hooks": 0}]
    reqs = qwen_cases.requests(family)
    outputs = qwen_cases.generate(llm, reqs)
    pads = {model.config.image_token_id, model.config.video_token_id}
    unpruned = qwen_cases.expected_runs(family, {"ratio": 1.0})
    for out, request, runs in zip(outputs, reqs, unpruned):
        expected = qwen_cases.transformers_generate(model, processor, request)
        assert qwen_cases.placeholder_runs(out["prompt"], pads) == runs
        assert out["prompt"] == expected["prompt"]
        assert out["tokens"] == expected["tokens"]


def test_image_embeddings_pass_through_unpruned(family, engines, hf):
    """Precomputed image embeddings have no encoder attention to score: they keep their stock count (and
    their positions), so the output is the stock engine's."""
    model, _ = hf
    rows, cols = qwen_checkpoint.IMAGE_GRIDS[0]
    merge = qwen_checkpoint.MERGE
    levels = 1 + len(getattr(model.config.vision_config, "deepstack_visual_indexes", []))  # Qwen3-VL: deepstack
    hidden = model.config.get_text_config().hidden_size * levels
    embeds = torch.randn(rows * cols, hidden, generator=torch.Generator().manual_seed(5))
    image = {"image_embeds": embeds, "image_grid_thw": torch.tensor([[1, rows * merge, cols * merge]])}
    request = [{"prompt": qwen_cases.requests(family)[0]["prompt"], "multi_modal_data": {"image": image}}]
    (out,) = qwen_cases.generate(engines("paper"), request)
    (base,) = qwen_cases.generate(engines(None), request)
    assert qwen_cases.placeholder_runs(out["prompt"], {model.config.image_token_id}) == [rows * cols]
    assert out == base
