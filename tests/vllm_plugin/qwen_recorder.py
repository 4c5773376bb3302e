"""Functions the Qwen-VL tests run inside vLLM's workers (`LLM.apply_model`; importable, as recorder.py).
Their own hooks record what the plugin's model saw and did:
- per vision tower pass: its modality, the grid, the scored block's q / k / attention segments as its
  attention got them, the tower's merged features (without the plugin's significance channels), and the
  kept indices and their prefix sums per run the model recorded for it (`fopru_last`);
- per `embed_multimodal` call, for each modality it encoded: the grids, the kept indices and their prefix
  sums per run;
- per model forward: the M-RoPE positions (3, T) the language model got."""
from __future__ import annotations

import inspect

from fopru_kernels.integrations.vllm.common import BYTES


def install(model) -> str:
    records = {"tower": [], "kept": [], "positions": []}
    handles = []
    if model.fopru is not None:
        attention = model.visual.blocks[model.fopru.block].attn.attn
        signature = inspect.signature(attention.forward_native)

        def on_attention(module, args, kwargs):
            bound = signature.bind(*args, **kwargs).arguments
            records["tower"].append({name: bound[name].clone() for name in ("query", "key", "cu_seqlens")})

        def on_tower(module, args, kwargs, out):
            grid = inspect.signature(module.forward).bind(*args, **kwargs).arguments["grid_thw"]
            records["tower"][-1].update(grid=[list(map(int, g)) for g in grid], features=out[:, :-BYTES].clone())

        handles += [attention.register_forward_pre_hook(on_attention, with_kwargs=True),
                    model.visual.register_forward_hook(on_tower, with_kwargs=True)]
        embed = model.embed_multimodal

        def embed_and_record(**kwargs):
            first = len(records["tower"])
            out = embed(**kwargs)
            keys = {"pixel_values": "image", "pixel_values_videos": "video"}
            encoded = [keys[key] for key in kwargs if key in keys]  # the model encodes in this order
            kept = {m: {k: v.clone() for k, v in model.fopru_last[m].items()} for m in encoded}
            records["kept"].append({m: {**v, "grid": kwargs[f"{m}_grid_thw"].clone()} for m, v in kept.items()})
            passes = records["tower"][first:]
            if len(passes) == len(encoded):  # one tower pass per modality (not so for a data-parallel rank)
                for record, modality in zip(passes, encoded):
                    record.update(modality=modality, idx=kept[modality]["idx"], cu_seqlens_out=kept[modality]["cu_seqlens"])
            return out

        model.embed_multimodal = embed_and_record  # instance attributes, removed by collect
    forward = model.forward

    def forward_and_record(input_ids, positions, *args, **kwargs):
        records["positions"].append(positions.clone())
        return forward(input_ids, positions, *args, **kwargs)

    model.forward = forward_and_record
    model.test_records, model.test_handles = records, handles
    return type(model).__name__


def collect(model) -> dict:
    """The records since `install`, with the hooks and wrappers removed."""
    for handle in model.test_handles:
        handle.remove()
    for name in ("forward", "embed_multimodal"):
        vars(model).pop(name, None)
    return model.test_records


def tensor_parallel(model) -> dict:
    """Heads of the tower's first block on this rank, of all."""
    return {"heads": model.visual.blocks[0].attn.attn.num_heads, "total": model.config.vision_config.num_heads}


def hooks(model) -> dict:
    """What FoPru put into a model: its plan, whether it prunes media, the hooks on its vision tower."""
    return {"fopru": model.fopru, "prunes_media": model.fopru_prunes_media, "tower_hooks": len(model.visual._forward_hooks)}
