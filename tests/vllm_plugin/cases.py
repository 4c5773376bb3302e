"""What the vLLM tests share: engine arguments, images, requests, and the transformers reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))

ENGINE = dict(
    enforce_eager=True, max_model_len=2048, dtype="float32", max_num_seqs=2, limit_mm_per_prompt={"image": 3},
    enable_mm_embeds=True, seed=0,
)
NEXT_ENGINE = dict(max_model_len=8192)  # LLaVA-NeXT: up to 5 crops of 576 tokens per image, unpruned
MAX_TOKENS = 8
# The paper's settings, spelled out (both engines and transformers' apply_fopru get them explicitly),
# and a second set covering every other value of every key.
PAPER = {"keep": 144, "strategy": "rank", "score": "focal", "kind": "logit"}
OTHERS = {"ratio": 0.25, "strategy": "row", "score": "cls", "kind": "prob"}  # 6 of 24 rows: K = 144
KEEP = 144
USER = "USER: {images}\nWhat is shown in this picture? ASSISTANT:"


def images(count: int, seed: int) -> list[Image.Image]:
    """Random RGB images of assorted sizes (the processor resizes and crops them to 336 x 336)."""
    rng = np.random.default_rng(seed)
    sizes = [(300, 400), (336, 336), (500, 280)]
    return [Image.fromarray(rng.integers(0, 256, (*sizes[i % 3], 3), dtype=np.uint8)) for i in range(count)]


def requests() -> list[dict]:
    """One batch: a prompt with 1 image and a prompt with 3 images."""
    return [
        {"prompt": USER.format(images="<image>" * n), "multi_modal_data": {"image": images(n, seed)}}
        for n, seed in ((1, 1), (3, 2))
    ]


def generate(llm, reqs) -> list[dict]:
    """Greedy outputs: prompt and generated token ids per request."""
    from vllm import SamplingParams

    outs = llm.generate(reqs, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    return [{"prompt": list(o.prompt_token_ids), "tokens": list(o.outputs[0].token_ids)} for o in outs]


def placeholders(prompt: list[int], image_token: int) -> int:
    return sum(t == image_token for t in prompt)


def transformers_generate(model, processor, request, handle=None) -> dict:
    """transformers' greedy generate on one request; with an apply_fopru handle the placeholders are
    trimmed to the kept count first. Returns prompt ids, generated ids and the handle (None without)."""
    inputs = processor(images=request["multi_modal_data"]["image"], text=request["prompt"], return_tensors="pt")
    if handle is not None:
        inputs = handle.prepare_inputs(inputs)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    prompt = inputs["input_ids"][0].tolist()
    return {
        "prompt": prompt,
        "tokens": out[0, len(prompt):].tolist(),
        "inputs": inputs,
    }


def run_engine(tmp_path, model_dir, engine_args: dict, env: dict | None = None, suite: str = "llava") -> dict:
    """A suite's requests (run_engine.py: 'llava' or 'qwen:FAMILY') through an engine in a process of its
    own; its JSON result."""
    out = tmp_path / "result.json"
    full_env = {**os.environ, "PYTHONPATH": HERE, **(env or {})}
    full_env.pop("VLLM_ENABLE_V1_MULTIPROCESSING")  # the default there, as a user runs it
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "run_engine.py"), str(out), json.dumps(engine_args), model_dir, suite],
        cwd=str(tmp_path), env=full_env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    with open(out) as f:
        return json.load(f)
