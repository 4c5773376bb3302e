"""Functions the tests run inside vLLM's workers (`LLM.apply_model`): they must live in an importable
module, not in a test file, to reach worker processes. They record, for every encoder batch of a
FoPru model, what went in and what came out, through hooks of their own (not the plugin's)."""
from __future__ import annotations


def install(model) -> str:
    """Hooks recording per encoder batch: the scored layer's qkv, the tower's patch features, the
    projector's input and the model's kept indices. Returns the model class name."""
    records, handles = [], []
    if getattr(model, "fopru", None) is not None:
        attn = model.vision_tower.vision_model.encoder.layers[model.fopru.layer_index].self_attn
        heads, d = attn.qkv_proj.num_heads, attn.qkv_proj.head_size

        def on_qkv(module, args, out):
            qkv = out[0]
            records.append({
                "q": qkv[..., : heads * d].unflatten(-1, (heads, d)).clone(),
                "k": qkv[..., heads * d: 2 * heads * d].unflatten(-1, (heads, d)).clone(),
            })

        def on_tower(module, args, out):
            records[-1]["features"] = out.clone()

        def on_projector(module, args):
            records[-1]["pruned"] = args[0].clone()
            records[-1]["idx"] = model.fopru_last_idx.clone()

        handles += [
            attn.qkv_proj.register_forward_hook(on_qkv),
            model.vision_tower.register_forward_hook(on_tower),
            model.multi_modal_projector.register_forward_pre_hook(on_projector),
        ]
    model.test_records, model.test_handles = records, handles
    return type(model).__name__


def collect(model) -> list[dict]:
    """The records since `install`, with the hooks removed."""
    for handle in model.test_handles:
        handle.remove()
    return model.test_records


def qkv_hooks(model) -> int:
    """How many forward hooks sit on the tower's qkv projections (0 for a stock model)."""
    layers = model.vision_tower.vision_model.encoder.layers
    return sum(len(layer.self_attn.qkv_proj._forward_hooks) for layer in layers)


def tensor_parallel(model) -> dict:
    """Heads of the tower's first layer on this rank, of all."""
    qkv = model.vision_tower.vision_model.encoder.layers[0].self_attn.qkv_proj
    return {"heads": qkv.num_heads, "total": qkv.total_num_heads}


def install_next(model) -> None:
    """Records, after every image encoding of a FoPru LLaVA-NeXT model, its kept sources and counts."""
    records, encode = [], model._process_image_input

    def recorded(image_input):
        out = encode(image_input)
        records.append({"source": model.fopru_last_source.clone(), "cu_seqlens": model.fopru_last_cu_seqlens.clone()})
        return out

    model._process_image_input = recorded  # an instance attribute: removed by collect_next
    model.test_records = records


def collect_next(model) -> list[dict]:
    del model._process_image_input
    return model.test_records
