"""transformers adapters: q/k capture on CLIP / SigLIP towers, and FoPru in LLaVA and
LLaVA-NeXT generate().

Every model is a tiny one built from a config in code with random weights (no downloads). The q/k
path is checked against the attention-map path (the same tower run eager with output_attentions):
exact indices and gathered features where the map path's selection margin is far above the float
error between the two paths, which each test measures and bounds.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fopru_kernels as F
from fopru_kernels.integrations.transformers import (  # imports transformers only when a LLaVA model is patched
    QKCapture,
    apply_fopru,
    compact_rows,
    keep_placeholder_runs,
    keep_placeholders,
    prune_vision_features,
    remove_fopru,
)
from fopru_kernels import reference_qk
from fopru_kernels.reference import FX_SCALE

transformers = pytest.importorskip("transformers")

IMAGE, PATCH = 56, 14  # a 4 x 4 patch grid: N = 16 patches (+ CLS for CLIP)
N = (IMAGE // PATCH) ** 2
KEEP = 6
TOWER = {
    "image_size": IMAGE, "patch_size": PATCH, "hidden_size": 64, "intermediate_size": 128,
    "num_attention_heads": 4, "num_hidden_layers": 3,
}
# Between the q/k path and the map path the probabilities differ by float32 rounding (the map is a
# float32 eager softmax, the q/k path float64 from float32 q/k, and the two runs' SDPA / eager layers
# feed layer -2 slightly different inputs). Measured on seeds 0-5: at most 1.6e-6 per head-summed value.
FLOAT_ERROR = 1e-5  # bound asserted on every compared significance, in probability units
MARGIN = 10 * FLOAT_ERROR  # selection margin the map path must have for idx equality to be meaningful


def tower(kind: str, seed: int = 2):
    """A tiny CLIPVisionModel or SiglipVisionModel, random weights, q/k sharpened (why: a random init
    attends almost uniformly, leaving selection margins as thin as the float error)."""
    config_cls, model_cls = {
        "clip": (transformers.CLIPVisionConfig, transformers.CLIPVisionModel),
        "siglip": (transformers.SiglipVisionConfig, transformers.SiglipVisionModel),
    }[kind]
    torch.manual_seed(seed)
    model = model_cls._from_config(config_cls(**TOWER), attn_implementation="sdpa").eval()
    with torch.no_grad():
        for block in model.encoder.layers:
            block.self_attn.q_proj.weight.mul_(8)
            block.self_attn.k_proj.weight.mul_(8)
    return model


def pixels(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(seed))


def map_path(model, x, layer: int):
    """(hidden_states[layer], attention of encoder.layers[layer]) from an eager run with output_attentions."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(pixel_values=x, output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    return out.hidden_states[layer], out.attentions[layer]


def probability_units(sig: torch.Tensor, score: str) -> torch.Tensor:
    """Map-path significance as head-summed probabilities: column / row sums become means, like the q/k path."""
    return sig.double() / FX_SCALE / (1 if score == "cls" else N)


def selection_margin(sig: torch.Tensor, keep: int) -> float:
    top = sig.sort(dim=1, descending=True).values
    return float((top[:, keep - 1] - top[:, keep]).min())


@pytest.mark.parametrize(
    "kind, score",
    [("clip", "cls"), ("clip", "received"), ("clip", "focal"), ("siglip", "received"), ("siglip", "focal")],
)
def test_qk_path_equals_attention_map_path(kind, score):
    model, x, layer = tower(kind), pixels(), -2
    p = 1 if kind == "clip" else 0
    pruned, idx = prune_vision_features(model, x, KEEP, score=score, kind="prob", layer=layer)

    with QKCapture(model, layer) as cap, torch.no_grad():
        model(pixel_values=x)
    tokens = cap.hidden[:, p:]
    hidden_map, attn = map_path(model, x, layer)
    assert attn.shape == (2, 4, N + p, N + p)
    map_sig = probability_units(F.significance(attn, score=score, num_prefix=p), score)
    qk_sig = F.significance_qk(cap.q, cap.k, score=score, num_prefix=p, scale=cap.scale, layout="bshd").double() / FX_SCALE
    assert (map_sig - qk_sig).abs().max() < FLOAT_ERROR
    assert selection_margin(map_sig, KEEP) > MARGIN
    if score == "focal":  # both paths must pick the same of received / paid attention
        col = F.significance(attn, score="received", num_prefix=p).double()
        row = F.significance(attn.transpose(-1, -2), score="received", num_prefix=p).double()  # row sums = columns of the transpose
        vc, vr = (((v - v.mean(dim=1, keepdim=True)) ** 2).sum(dim=1) for v in (col, row))
        assert ((vc - vr).abs() > 1e-3 * torch.maximum(vc, vr)).all()

    # The map path gathers from the q/k run's hidden states: the eager run's differ by float rounding.
    map_pruned, map_idx = F.prune_tokens(tokens, attn, KEEP, strategy="rank", score=score, num_prefix=p)
    assert torch.equal(idx, map_idx)
    assert torch.equal(pruned, map_pruned)
    assert torch.allclose(hidden_map, cap.hidden, atol=1e-4)


def test_siglip_tower_with_the_default_settings():
    """The defaults are FoPru's own (focal on the scaled logits) and need no CLS token: a SigLIP tower
    prunes as it is, and the kept tokens are the float64 oracle's (margins measured: > 1e5 x the error)."""
    model, x = tower("siglip"), pixels()
    pruned, idx = prune_vision_features(model, x, KEEP)
    with QKCapture(model, -2) as cap, torch.no_grad():
        model(pixel_values=x)
    sig = reference_qk.significance_qk(cap.q, cap.k, "focal", 0, cap.scale, None, "logit", "bshd")
    top = sig.sort(dim=1, descending=True).values
    assert bool((top[:, KEEP - 1] - top[:, KEEP] > 2**24).all())  # the kernels' error is ~2^12
    want_pruned, want_idx = reference_qk.prune_tokens_qk(cap.hidden, cap.q, cap.k, KEEP, "rank", "focal", 0, None,
                                                         cap.scale, None, "logit", "bshd")
    assert torch.equal(idx, want_idx) and torch.equal(pruned, want_pruned)
    _, prob_idx = prune_vision_features(model, x, KEEP, kind="prob")
    assert not torch.equal(prob_idx, idx)  # so the comparison above did tell the default kind apart


def test_adapters_check_backend_when_applied():
    message = r"backend must be one of 'auto', 'cpu', 'cuda', 'triton', 'reference', got 'gpu'"
    with pytest.raises(ValueError, match=message):
        prune_vision_features(tower("clip"), pixels(), KEEP, backend="gpu")
    model = tiny_llava()
    with pytest.raises(ValueError, match=message):
        apply_fopru(model, keep=KEEP, backend="gpu")
    assert getattr(model.model, "_fopru", None) is None


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [tuple(t.shape) for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def test_capture_keeps_sdpa_and_materialises_no_attention_map():
    model, x = tower("clip"), pixels()
    s = N + 1

    def square_maps(run) -> int:
        with _Shapes() as mode, torch.no_grad():
            run()
        return sum(len(shape) >= 2 and shape[-2:] == (s, s) for shape in mode.shapes)

    with QKCapture(model, -2) as cap:
        assert square_maps(lambda: model(pixel_values=x)) == 0
    assert cap.q.shape == cap.k.shape == (2, s, 4, 16)
    assert model.config._attn_implementation == "sdpa"
    # The detector does see the maps the eager path materialises.
    model.set_attn_implementation("eager")
    assert square_maps(lambda: model(pixel_values=x, output_attentions=True)) > 0


@pytest.mark.parametrize("layer", [1, 2, 3, -1, -2, -3])
def test_capture_layer_matches_hidden_states_index(layer):
    model, x = tower("siglip"), pixels(batch=1)
    with QKCapture(model, layer) as cap, torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    assert torch.equal(cap.hidden, out.hidden_states[layer])
    block = model.encoder.layers[layer - 1 if layer > 0 else layer]  # hidden_states[0] is the embeddings
    with torch.no_grad():  # q comes from this layer's own input, hidden_states[layer - 1]
        q = block.self_attn.q_proj(block.layer_norm1(out.hidden_states[layer - 1]))
    assert torch.equal(cap.q.flatten(2), q)


@pytest.mark.parametrize("layer", [0, -4, 4, 1.0])
def test_capture_rejects_layers_without_attention(layer):
    with pytest.raises(ValueError, match="layer must index hidden_states"):
        QKCapture(tower("clip"), layer)


def test_capture_rejects_other_models():
    with pytest.raises(ValueError, match="CLIP or SigLIP vision tower"):
        QKCapture(torch.nn.Linear(2, 2))


# LLaVA ---------------------------------------------------------------------------------------

IMAGE_TOKEN, PAD, VOCAB = 63, 0, 64


def tiny_llava(kind: str = "clip"):
    """A tiny LlavaForConditionalGeneration: CLIP tower with LLaVA-1.5's 'default' strategy (CLS dropped),
    or SigLIP with 'full' (no CLS); vision_feature_layer -2 as in LLaVA-1.5."""
    vision = transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig
    config = transformers.LlavaConfig(
        vision_config=vision(**TOWER),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN, image_seq_length=N, vision_feature_layer=-2,
        vision_feature_select_strategy="default" if kind == "clip" else "full",
    )
    return _random_model(transformers.LlavaForConditionalGeneration, config)


def prompts():
    """Two left-padded rows as a LLaVA processor makes them: row 0 holds two images back to back,
    row 1 one image; each image is N placeholder tokens. Three images in all."""
    img = [IMAGE_TOKEN] * N
    row0 = [1, 5, 6] + img + img + [7, 8]
    row1 = [1, 9] + img + [10, 11, 12]
    width = max(len(row0), len(row1))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in (row0, row1)])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (row0, row1)])
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels(batch=3)}


def _random_model(cls, config):
    """A seeded random-weight model on SDPA, its tower's q/k weights scaled up x 8 so attention is
    peaked enough for decisive selection margins."""
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for block in model.model.vision_tower.encoder.layers:
            block.self_attn.q_proj.weight.mul_(8)
            block.self_attn.k_proj.weight.mul_(8)
    return model


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=PAD)


def generate_with_fopru(model, inner, handle, inputs):
    """generate() on the handle's trimmed inputs; returns (trimmed, output ids, the inputs_embeds
    the language model saw, one per forward: the prompt pass first)."""
    seen = []
    hook = inner.language_model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["inputs_embeds"]), with_kwargs=True
    )
    trimmed = handle.prepare_inputs(inputs)
    try:
        out = generate(model, trimmed)
    finally:
        hook.remove()
    return trimmed, out, seen


@pytest.mark.parametrize(
    "kind, strategy, score, keep",
    [("clip", "rank", "cls", 6), ("clip", "row", "focal", 8), ("siglip", "rank", "received", 5), ("siglip", "rank", None, 5)],
)
def test_llava_generate_sees_keep_image_tokens(kind, strategy, score, keep):
    """score None: the adapters' defaults (focal on the logits), with the SigLIP tower too."""
    model, inputs = tiny_llava(kind), prompts()
    inner = model.model
    opts = dict(strategy=strategy) if score is None else dict(strategy=strategy, score=score)
    expected_pruned, expected_idx = prune_vision_features(inner.vision_tower, inputs["pixel_values"], keep, layer=-2, **opts)
    with torch.no_grad():
        expected = inner.multi_modal_projector(expected_pruned)

    handle = apply_fopru(model, keep=keep, **opts)
    trimmed, out, seen = generate_with_fopru(model, inner, handle, inputs)
    assert out.shape[1] == trimmed["input_ids"].shape[1] + 3
    image_positions = trimmed["input_ids"] == IMAGE_TOKEN
    assert image_positions.sum(dim=1).tolist() == [2 * keep, keep]
    prefill = seen[0]  # the prompt pass; later passes embed one generated token each
    assert prefill.shape[:2] == trimmed["input_ids"].shape
    assert torch.equal(prefill[image_positions], expected.reshape(-1, expected.shape[-1]))
    with torch.no_grad():
        text = inner.get_input_embeddings()(trimmed["input_ids"])
    assert torch.equal(prefill[~image_positions], text[~image_positions])
    assert torch.equal(handle.last_idx, expected_idx)
    remove_fopru(model)


def test_remove_fopru_restores_full_generation():
    model, inputs = tiny_llava(), prompts()
    reference = generate(model, inputs)
    handle = apply_fopru(model, keep=KEEP)
    # The longest row (two images) loses 2 * (N - KEEP) placeholders; generate adds 3 tokens.
    assert generate(model, handle.prepare_inputs(inputs)).shape[1] == inputs["input_ids"].shape[1] - 2 * (N - KEEP) + 3
    for target in (model, model.model):  # the hooks live on the LlavaModel, whichever was passed
        with pytest.raises(ValueError, match="already applied"):
            apply_fopru(target, keep=KEEP)
    remove_fopru(model)
    assert torch.equal(generate(model, inputs), reference)
    remove_fopru(model)  # a no-op once removed


def test_llava_rejects_a_call_that_overrides_the_scored_layer():
    model, inputs = tiny_llava(), prompts()
    handle = apply_fopru(model, keep=KEEP)
    with pytest.raises(ValueError, match="projector got other features"), torch.no_grad():
        model(**handle.prepare_inputs(inputs), vision_feature_layer=-1)
    remove_fopru(model)


def test_apply_fopru_rejects_unsupported_models_and_keep():
    with pytest.raises(ValueError, match="supports LlavaForConditionalGeneration, LlavaModel, LlavaNext"):
        apply_fopru(tower("clip"), keep=KEEP)
    with pytest.raises(ValueError, match=r"^keep must be in \[1, 16\] \(the image's patches\), got 17"):
        apply_fopru(tiny_llava(), keep=N + 1)


@pytest.mark.parametrize("strategy, ratio, keep", [("rank", 0.4, 6), ("row", 0.5, 8)])
def test_llava_keep_from_ratio(strategy, ratio, keep):
    model = tiny_llava()
    assert apply_fopru(model, ratio=ratio, strategy=strategy).keep == keep  # floor(16 * 0.4); 2 of 4 rows of 4
    remove_fopru(model)


def test_placeholders_trimmed_per_image_and_repadded():
    x = IMAGE_TOKEN
    ids = torch.tensor([[PAD, 1, x, x, x, x, x, x, 7], [PAD, PAD, PAD, PAD, 1, x, x, x, 9]])
    valid = ids != PAD
    kept = keep_placeholders(ids, valid, IMAGE_TOKEN, tokens_per_image=3, keep=2)
    assert torch.equal(compact_rows(ids, kept, PAD), torch.tensor([[1, x, x, x, x, 7], [PAD, PAD, 1, x, x, 9]]))
    right = torch.tensor([[1, x, x, x, x, 7], [1, x, x, 9, PAD, PAD]])
    assert torch.equal(compact_rows(ids, kept, PAD, "right"), right)
    with pytest.raises(ValueError, match="multiple of 4 image placeholder"):
        keep_placeholders(ids, valid, IMAGE_TOKEN, tokens_per_image=4, keep=2)


# LLaVA-NeXT ----------------------------------------------------------------------------------

NEXT_IMAGE = 42  # crops of 3 x 3 patches (+ CLS for CLIP); anyres tiles of 2 x 1, 1 x 2 or 2 x 2 crops
# (H, W) of the three images: wide (2 x 2 tiles, rows unpadded), tall (2 x 1 tiles), square (1 x 2
# tiles, columns unpadded); 5, 3 and 3 crops with the base image.
NEXT_SIZES = torch.tensor([[60, 100], [100, 40], [42, 42]])


def tiny_llava_next(kind: str = "clip"):
    """A tiny LlavaNextForConditionalGeneration, strategies as in tiny_llava, q/k sharpened likewise."""
    vision = transformers.CLIPVisionConfig if kind == "clip" else transformers.SiglipVisionConfig
    side = NEXT_IMAGE
    config = transformers.LlavaNextConfig(
        vision_config=vision(**{**TOWER, "image_size": side}),
        text_config=transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, bos_token_id=1, eos_token_id=2,
        ),
        image_token_id=IMAGE_TOKEN, vision_feature_layer=-2,
        vision_feature_select_strategy="default" if kind == "clip" else "full",
        image_grid_pinpoints=[[side, 2 * side], [2 * side, side], [2 * side, 2 * side]],
    )
    return _random_model(transformers.LlavaNextForConditionalGeneration, config)


def next_reference(model, kind: str, score: str):
    """What the unpatched model packs, traced independently of the adapter: per image its packed
    features (n_i, D), and per packed token its crop token (row of the (crops * N) projected crop tokens
    it equals bit for bit; pack_image_features only moves data) or -1 for image_newline, plus the
    significance_qk of every crop token (crops * N,)."""
    inner, p = model.model, 1 if kind == "clip" else 0
    x = torch.randn(3, 5, 3, NEXT_IMAGE, NEXT_IMAGE, generator=torch.Generator().manual_seed(3))
    with QKCapture(inner.vision_tower, -2) as cap, torch.no_grad():
        feats = inner.get_image_features(x, NEXT_SIZES)
        crop_tokens = inner.multi_modal_projector(cap.hidden[:, p:]).flatten(0, 1)
    feats = getattr(feats, "pooler_output", feats)  # older transformers return the list itself
    sig = F.significance_qk(cap.q, cap.k, score=score, num_prefix=p, scale=cap.scale, kind="logit", layout="bshd")
    sig = sig.reshape(-1)  # the adapter's default kind
    packed = torch.cat(feats)
    match = (packed[:, None] == crop_tokens[None]).all(-1)
    newline = (packed == inner.image_newline).all(-1)
    assert (match.sum(1) + newline.long() == 1).all()  # every packed token traced to exactly one source
    source = torch.where(newline, -1, match.long().argmax(1))
    return x, feats, source, sig


def next_prompts(lengths):
    """Row 0: images 0 and 1 back to back; row 1: image 2 (left padded), as the processor lays them out."""
    img = [[IMAGE_TOKEN] * n for n in lengths]
    row0 = [1, 5] + img[0] + img[1] + [7]
    row1 = [1, 9] + img[2] + [10, 11]
    width = max(len(row0), len(row1))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in (row0, row1)])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in (row0, row1)])
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize(
    "kind, score, keep, ratio",
    [("clip", "cls", 7, None), ("clip", "focal", None, 0.5), ("siglip", "received", None, 0.3)],
)
def test_llava_next_generate_sees_pruned_packed_tokens(kind, score, keep, ratio):
    model = tiny_llava_next(kind)
    inner = model.model
    x, feats, source, sig = next_reference(model, kind, score)
    lengths = [f.shape[0] for f in feats]
    inputs = {**next_prompts(lengths), "pixel_values": x, "image_sizes": NEXT_SIZES}

    # Expected selection: every newline, plus the top patch tokens of each image by significance.
    bounds = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    expected_idx, expected_keep = [], []
    for b in range(3):
        seg = source[bounds[b] : bounds[b + 1]]
        patch_at = (seg >= 0).nonzero().flatten()
        k = min(keep, patch_at.numel()) if ratio is None else F.retained_count(patch_at.numel(), ratio)
        top = patch_at[F.select(sig[seg[patch_at]][None], k)[0]]
        expected_idx.append(bounds[b] + torch.cat([(seg < 0).nonzero().flatten(), top]).sort().values)
        expected_keep.append(len(expected_idx[-1]))
    expected_idx = torch.cat(expected_idx)
    assert all(0 < k < n for k, n in zip(expected_keep, lengths))  # a real pruning of every image

    handle = apply_fopru(model, keep=keep, ratio=ratio, score=score)
    assert handle.image_token_counts(NEXT_SIZES) == (lengths, expected_keep)
    trimmed, out, seen = generate_with_fopru(model, inner, handle, inputs)
    assert out.shape[1] == trimmed["input_ids"].shape[1] + 3
    image_positions = trimmed["input_ids"] == IMAGE_TOKEN
    assert image_positions.sum(dim=1).tolist() == [expected_keep[0] + expected_keep[1], expected_keep[2]]
    prefill = seen[0]
    assert torch.equal(prefill[image_positions], torch.cat(feats)[expected_idx])
    with torch.no_grad():
        text = inner.get_input_embeddings()(trimmed["input_ids"])
    assert torch.equal(prefill[~image_positions], text[~image_positions])
    assert torch.equal(handle.last_idx, expected_idx)
    assert torch.equal(handle.last_source, source[expected_idx])
    assert handle.last_cu_seqlens.tolist() == [0, *torch.tensor(expected_keep).cumsum(0).tolist()]
    remove_fopru(model)


def test_llava_next_remove_fopru_restores_full_generation():
    model = tiny_llava_next()
    x, feats, _, _ = next_reference(model, "clip", "cls")
    inputs = {**next_prompts([f.shape[0] for f in feats]), "pixel_values": x, "image_sizes": NEXT_SIZES}
    with torch.no_grad():
        reference_logits = model(**inputs).logits
    reference = generate(model, inputs)
    handle = apply_fopru(model, ratio=0.25)
    assert generate(model, handle.prepare_inputs(inputs)).shape[1] < reference.shape[1]
    with pytest.raises(ValueError, match="already applied"):
        apply_fopru(model.model, keep=KEEP)
    remove_fopru(model.model)
    assert "pack_image_features" not in vars(model.model)
    assert torch.equal(generate(model, inputs), reference)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference_logits)


def test_llava_next_rejects_row_strategy_and_ambiguous_budgets():
    model = tiny_llava_next()
    with pytest.raises(ValueError, match=r"^strategy must be one of 'rank' \(LLaVA-NeXT's packed image sequence"):
        apply_fopru(model, keep=KEEP, strategy="row")
    with pytest.raises(ValueError, match="^give exactly one of 'keep'"):
        apply_fopru(model, keep=KEEP, ratio=0.5)
    with pytest.raises(ValueError, match="^give exactly one of 'keep'"):
        apply_fopru(model)
    with pytest.raises(ValueError, match=r"^ratio must be a number in \(0, 1\]"):
        apply_fopru(model, ratio=1.5)
    assert getattr(model.model, "_fopru", None) is None and "pack_image_features" not in vars(model.model)


def test_placeholder_runs_trimmed_per_image():
    x = IMAGE_TOKEN
    # Row 0 holds images of 3 and 2 placeholders back to back, row 1 one image of 4.
    ids = torch.tensor([[PAD, PAD, 1, x, x, x, x, x, 7], [1, x, x, x, x, 9, 9, 9, 9]])
    valid = ids != PAD
    kept = keep_placeholder_runs(ids, valid, IMAGE_TOKEN, [3, 2, 4], [1, 2, 3])
    trimmed = torch.tensor([[PAD, PAD, PAD, 1, x, x, x, 7], [1, x, x, x, 9, 9, 9, 9]])
    assert torch.equal(compact_rows(ids, kept, PAD), trimmed)
    with pytest.raises(ValueError, match="whole images per row"):
        keep_placeholder_runs(ids, valid, IMAGE_TOKEN, [2, 4, 3], [1, 1, 1])  # row 0 would split image 1
    with pytest.raises(ValueError, match="whole images per row"):
        keep_placeholder_runs(ids, valid, IMAGE_TOKEN, [3, 2, 5], [1, 1, 1])
