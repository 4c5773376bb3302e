"""Tiny random Qwen2.5-VL and Qwen3-VL checkpoints that vLLM and transformers both load, built locally (no
download), and the media the Qwen tests feed them.

Vision towers of 3 (Qwen2-VL), 4 (Qwen2.5-VL: windows of 2 x 2 merged tokens, full attention in blocks 1 and 3) and 3
blocks (Qwen3-VL: deepstack features from blocks 0 and 1), hidden size 32, 2 heads; a tiny language model
(hidden 64, 2 heads of 32: a head size vLLM's CPU attention supports, M-RoPE sections 4 + 6 + 6); a
byte-level BPE tokenizer trained here with Qwen's special tokens and a chat template; Qwen's image and
video processors with pixel limits that keep the test images at their own size. float32.

The towers' q/k weights are scaled up (x 8) so attention is peaked: a random init attends almost
uniformly, which would leave selection margins as thin as the rounding between two implementations.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image

from checkpoint import train_tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "<|im_start|>user\nWhat is shown in this picture?<|im_end|>\n<|im_start|>assistant\nA small red house.<|im_end|>",
    "<|im_start|>user\nDescribe the video.<|im_end|>\n<|im_start|>assistant\nTwo cats play on a blue sofa.<|im_end|>",
    "<0.5 seconds><1.5 seconds><2.5 seconds><3.5 seconds> There are three birds on the wire above the road.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
]
FAMILIES = {
    # family: (patch size, vision config, text config extras)
    "qwen2": (14, dict(depth=3, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2), {}),
    "qwen2_5": (14, dict(depth=4, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, window_size=56,
                         fullatt_block_indexes=[1, 3], tokens_per_second=2), {}),
    "qwen3": (16, dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                       num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
              dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                 "mrope_section": [4, 6, 6], "mrope_interleaved": True})),
}
MERGE, TEMPORAL = 2, 2
# Images as (rows, cols) of merged tokens (each merged token is 2 x 2 patches), a video as frames of that.
IMAGE_GRIDS = [(4, 6), (6, 4), (5, 5)]
VIDEO_GRID, VIDEO_FRAMES, FPS = (4, 4), 4, 2.0


def tokenizer():
    return train_tokenizer(SPECIALS, CORPUS, CHAT_TEMPLATE, pad_token="<|endoftext|>", eos_token="<|im_end|>")


def _config(family: str, tok):
    import transformers

    patch, vision, text_extra = FAMILIES[family]
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=4096, bos_token_id=tok.eos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]})
    vision = dict(vision, patch_size=patch, spatial_merge_size=MERGE, temporal_patch_size=TEMPORAL)
    cls = {"qwen2": transformers.Qwen2VLConfig, "qwen2_5": transformers.Qwen2_5_VLConfig,
           "qwen3": transformers.Qwen3VLConfig}[family]
    return cls(vision_config=vision, text_config={**text, **text_extra}, **ids)


def _processor(family: str, tok):
    import transformers
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    patch = FAMILIES[family][0]
    unit = patch * MERGE
    sizes = dict(patch_size=patch, merge_size=MERGE, temporal_patch_size=TEMPORAL)
    limits = {"shortest_edge": unit * unit, "longest_edge": unit * unit * 256}
    if family != "qwen3":
        image = transformers.Qwen2VLImageProcessor(**sizes, size=limits)
        video = Qwen2VLVideoProcessor(**sizes, size=limits)
        cls = transformers.Qwen2_5_VLProcessor if family == "qwen2_5" else transformers.Qwen2VLProcessor
        return cls(image_processor=image, tokenizer=tok, video_processor=video,
                                                chat_template=CHAT_TEMPLATE)
    # Qwen3-VL normalises images and videos alike (mean = std = 0.5), and vLLM normalises its videos with the
    # image processor's values: they must agree for vLLM and transformers to see the same pixels.
    half = dict(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    image = transformers.Qwen2VLImageProcessor(**sizes, size=limits, **half)
    video = Qwen3VLVideoProcessor(**half, **sizes, size={"shortest_edge": unit * unit, "longest_edge": unit * unit * 1024},
                                  do_sample_frames=False)
    return transformers.Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                         chat_template=CHAT_TEMPLATE)


def model_class(family: str):
    """transformers' ...ForConditionalGeneration of the family."""
    import transformers

    return {"qwen2": transformers.Qwen2VLForConditionalGeneration,
            "qwen2_5": transformers.Qwen2_5_VLForConditionalGeneration,
            "qwen3": transformers.Qwen3VLForConditionalGeneration}[family]


def build(path: str, family: str, seed: int = 0) -> str:
    """Writes the tiny `family` ('qwen2', 'qwen2_5' or 'qwen3') checkpoint (config, safetensors, tokenizer,
    processors) to `path`; returns path."""
    import transformers

    tok = tokenizer()
    config = _config(family, tok)
    cls = model_class(family)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(8)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    _processor(family, tok).save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.eos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}, f)
    return path


def images(family: str, grids: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """Random RGB images whose sides are whole merged tokens: each keeps its size in the processor."""
    unit = FAMILIES[family][0] * MERGE
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (rows * unit, cols * unit, 3), dtype=np.uint8)) for rows, cols in grids]


def video(family: str, seed: int) -> tuple[np.ndarray, dict]:
    """A random clip (frames, H, W, 3) uint8 of VIDEO_FRAMES frames and its metadata, as vLLM takes it."""
    unit = FAMILIES[family][0] * MERGE
    rows, cols = VIDEO_GRID
    frames = np.random.default_rng(seed).integers(0, 256, (VIDEO_FRAMES, rows * unit, cols * unit, 3), dtype=np.uint8)
    metadata = {"fps": FPS, "total_num_frames": VIDEO_FRAMES, "frames_indices": list(range(VIDEO_FRAMES)),
                "duration": VIDEO_FRAMES / FPS, "video_backend": "opencv"}
    return frames, metadata
