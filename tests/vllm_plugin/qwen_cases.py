"""What the Qwen-VL tests share: settings, requests (images of different sizes and a video), the expected
kept counts (worked out here from the grids, independently of the plugin), and the transformers
reference: `apply_fopru` on the same checkpoint, with the position ids its language model receives."""
from __future__ import annotations

import torch

import qwen_checkpoint as qc

FAMILIES = ["qwen2", "qwen2_5", "qwen3"]
ENGINE = dict(enforce_eager=True, max_model_len=2048, dtype="float32", max_num_seqs=2,
              limit_mm_per_prompt={"image": 3, "video": 1}, enable_mm_embeds=True, seed=0)
CHUNK = 16  # max_num_batched_tokens of the chunked-prefill engines: every prompt spans several chunks
MAX_TOKENS = 8
# The paper's settings (the defaults spelled out), and a second set covering every other value of every key
# Qwen-VL takes ('cls' needs a CLS token these towers do not have); block 1 is a full-attention block of
# every tiny tower (Qwen2.5-VL's default is 3, the others' their last).
SETTINGS = {
    "paper": {"keep": 8, "strategy": "rank", "score": "focal", "kind": "logit"},
    "others": {"ratio": 0.5, "strategy": "row", "score": "received", "kind": "prob", "layer": 1},
}
IMAGE, VIDEO = "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"


def requests(family: str) -> list[dict]:
    """One batch: a prompt with one image, and one with three images of different sizes and a video."""
    one = f"<|im_start|>user\n{IMAGE}What is shown in this picture?<|im_end|>\n<|im_start|>assistant\n"
    many = (f"<|im_start|>user\n{IMAGE}{IMAGE}Compare these.{IMAGE}And the video: {VIDEO}<|im_end|>\n"
            "<|im_start|>assistant\n")
    return [
        {"prompt": one, "multi_modal_data": {"image": qc.images(family, qc.IMAGE_GRIDS[2:], seed=1)}},
        {"prompt": many, "multi_modal_data": {"image": qc.images(family, qc.IMAGE_GRIDS, seed=2),
                                              "video": [qc.video(family, seed=3)]}},
    ]


def expected_runs(family: str, settings: dict) -> list[list[int]]:
    """Per request, the kept count of every placeholder run in prompt order (images; then the video: over
    the whole clip, or per frame for Qwen3-VL whose prompt separates frames), from the grids alone.
    keep: min(keep x frames, n) ('rank'); ratio with 'row': floor(rows x ratio) whole rows."""
    frames = qc.VIDEO_FRAMES // qc.TEMPORAL

    def kept(rows: int, cols: int, t: int = 1) -> int:
        if "keep" in settings:
            return min(settings["keep"] * t, rows * cols * t)
        return int(rows * t * settings["ratio"]) * cols

    images = [[kept(*grid) for grid in qc.IMAGE_GRIDS[2:]], [kept(*grid) for grid in qc.IMAGE_GRIDS]]
    clip = [kept(*qc.VIDEO_GRID)] * frames if family == "qwen3" else [kept(*qc.VIDEO_GRID, t=frames)]
    return [images[0], images[1] + clip]


def placeholder_runs(prompt: list[int], pads: set[int]) -> list[int]:
    """Lengths of the runs of placeholder tokens in a prompt, in order."""
    runs, length = [], 0
    for token in prompt + [None]:
        if token in pads:
            length += 1
        elif length:
            runs.append(length)
            length = 0
    return runs


def generate(llm, reqs) -> list[dict]:
    """vLLM's greedy outputs: prompt and generated token ids per request."""
    from vllm import SamplingParams

    outs = llm.generate(reqs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    return [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)} for o in outs]


def transformers_generate(model, processor, request: dict, handle=None) -> dict:
    """transformers' greedy generate on one request (placeholders trimmed by the apply_fopru handle, if
    any): prompt ids, generated ids, and the (3, T) position ids its language model got for the prompt."""
    from transformers.video_utils import VideoMetadata

    media = request["multi_modal_data"]
    kwargs = {"images": media["image"]}
    if "video" in media:
        frames, metadata = media["video"][0]
        kwargs.update(videos=[frames], video_metadata=[VideoMetadata(**metadata)], do_sample_frames=False)
    inputs = processor(text=[request["prompt"]], **kwargs, return_tensors="pt")
    if handle is not None:
        inputs = handle.prepare_inputs(inputs)
    seen = []
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kw: seen.append(kw["position_ids"][-3:, 0].clone()), with_kwargs=True)
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    finally:
        hook.remove()
    prompt = inputs["input_ids"][0].tolist()
    return {"prompt": prompt, "tokens": out[0, len(prompt):].tolist(), "positions": seen[0]}


def run_grids(family: str, grid_thw, modality: str) -> list[tuple[int, int]]:
    """(rows, cols) of merged tokens of every run of the media of grid_thw: an image; a video's whole clip
    (frames stacked), or for Qwen3-VL each frame."""
    out = []
    for t, h, w in torch.as_tensor(grid_thw).tolist():
        rows, cols = h // qc.MERGE, w // qc.MERGE
        if modality == "video" and family == "qwen3":
            out += [(rows, cols)] * t
        else:
            out.append((rows * t, cols))
    return out


def local_indices(idx, cu_out, family: str, grid_thw, modality: str) -> list[list[int]]:
    """Per run, the kept indices within the run, from indices global over one encoder batch's runs
    (idx (kept,), cu_out the kept counts' prefix sums per run)."""
    idx, cu_out = torch.as_tensor(idx), torch.as_tensor(cu_out)
    starts = torch.tensor([0] + [r * c for r, c in run_grids(family, grid_thw, modality)]).cumsum(0)
    return [(idx[int(cu_out[i]):int(cu_out[i + 1])] - starts[i]).tolist() for i in range(len(starts) - 1)]


def kept_per_run(family: str, calls: list[dict]) -> dict[str, list[list[int]]]:
    """modality -> per run in encoding order, its kept local indices; calls: per encoder call, modality ->
    {"idx", "cu_seqlens", "grid"} (qwen_recorder's "kept")."""
    return {m: [run for call in calls if m in call
                for run in local_indices(call[m]["idx"], call[m]["cu_seqlens"], family, call[m]["grid"], m)]
            for m in ("image", "video")}
