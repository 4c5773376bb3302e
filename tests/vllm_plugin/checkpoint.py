"""Tiny random LLaVA-1.5 and LLaVA-NeXT checkpoints that vLLM and transformers both load, built locally
(no download).

CLIP 336/14 tower (24 x 24 = 576 patches, 3 layers, 4 heads of 16), vision_feature_layer -2 and the
'default' select strategy as in LLaVA-1.5; a tiny Llama (2 heads of 32: a head size vLLM's CPU
attention supports); a byte-level BPE tokenizer trained here on a few sentences, with `<image>` as a
special token and a chat template; LlavaProcessor with the CLIP image processor. float32.

The tower's q/k weights are scaled up (x 8) so its attention is peaked: a random init attends almost
uniformly, which would leave selection margins as thin as the rounding between two implementations.
"""
from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessor,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

IMAGE_SIZE, PATCH = 336, 14
PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 576
SPECIALS = ["<pad>", "<s>", "</s>", "<image>"]
# vLLM's chat code puts "<image>\n" before the text of a message with an image ("string" format).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
CORPUS = [
    "USER: What is shown in this picture? ASSISTANT: A small red house next to a tall green tree.",
    "USER: Describe the image in detail. ASSISTANT: Two cats sit on a blue sofa in the morning light.",
    "USER: How many birds are there? ASSISTANT: There are three birds on the wire above the road.",
    "The quick brown fox jumps over the lazy dog while the sun sets behind the hills.",
]


def train_tokenizer(specials: list[str], corpus: list[str], chat_template: str, **tokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (vocabulary 400) trained here on `corpus`, with `specials` as special
    tokens (ids 0, 1, ... in that order); tokens: PreTrainedTokenizerFast's token arguments."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus * 4, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, **tokens)
    tok.chat_template = chat_template
    return tok


def _tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(SPECIALS, CORPUS, CHAT_TEMPLATE, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                           extra_special_tokens={"image_token": "<image>"})


def _vllm_weight_names(path: str) -> None:
    """transformers 5 saves the CLIP tower as `vision_tower.{embeddings,encoder,...}`; vLLM's loader
    wants the CLIPVisionModel layout `vision_tower.vision_model.*` (transformers reads both)."""
    weights = load_file(path)
    prefix = "vision_tower."
    renamed = {
        (prefix + "vision_model." + k[len(prefix):] if k.startswith(prefix) and not k.startswith(prefix + "vision_model.")
         else k): v
        for k, v in weights.items()
    }
    save_file(renamed, path, metadata={"format": "pt"})


def _text_config(tok) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8192,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )


def build_text_only(path: str, seed: int = 0) -> str:
    """A tiny LlamaForCausalLM with the same tokenizer: an architecture the plugin does not support."""
    tok = _tokenizer()
    torch.manual_seed(seed)
    LlamaForCausalLM(_text_config(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


PINPOINTS = [[IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE], [2 * IMAGE_SIZE, 2 * IMAGE_SIZE]]


def build(path: str, next_model: bool = False, seed: int = 0) -> str:
    """Writes the checkpoint (config, safetensors, tokenizer, processor) to `path`; returns path.
    next_model: LLaVA-NeXT (anyres tiles of 2 x 1, 1 x 2 or 2 x 2 crops, plus the base crop) instead."""
    tok = _tokenizer()
    config_cls, model_cls = (LlavaNextConfig, LlavaNextForConditionalGeneration) if next_model else (
        LlavaConfig, LlavaForConditionalGeneration)
    config = config_cls(
        vision_config=CLIPVisionConfig(
            image_size=IMAGE_SIZE, patch_size=PATCH, hidden_size=64, intermediate_size=128,
            num_attention_heads=4, num_hidden_layers=3, projection_dim=64,
        ),
        text_config=_text_config(tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
        **({"image_grid_pinpoints": PINPOINTS} if next_model else {"image_seq_length": PATCHES}),
    )
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for block in model.model.vision_tower.encoder.layers:
            block.self_attn.q_proj.weight.mul_(8)
            block.self_attn.k_proj.weight.mul_(8)
    model.save_pretrained(path)
    _vllm_weight_names(os.path.join(path, "model.safetensors"))
    sizes = dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    if next_model:
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor(**sizes, image_grid_pinpoints=PINPOINTS), tokenizer=tok,
            patch_size=PATCH, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
    else:
        processor = LlavaProcessor(
            image_processor=CLIPImageProcessor(**sizes), tokenizer=tok, patch_size=PATCH,
            vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, num_additional_image_tokens=1,
        )
    processor.save_pretrained(path)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "do_sample": False}, f)
    return path
