"""FoPru in Qwen2-VL, Qwen2.5-VL and Qwen3-VL generate(): tiny random models built here, no
downloads, a batch of two rows holding three images of different sizes and one video.

Every expectation is computed independently of the adapter: q and k are recomputed from the scored
block's input (the adapter hooks the qkv projection's output instead), every attention segment is
scored by the dense float64 oracle (reference_qk.significance_qk, no prefix) and summed per 2 x 2 merge
unit, Qwen2.5-VL's window order is undone with the model's window index, each image (and each video
over its clip; Qwen3-VL: each frame) is selected with the dense select(), and the M-RoPE positions are
walked from grid_thw and the kept indices by the rule the models use (text continues at a media item's
start + max(rows, cols) of its merged grid). The selections' margins are asserted to be decisive.
"""
from __future__ import annotations

import itertools
import sys

import pytest
import torch

import fopru_kernels as F
from fopru_kernels import reference_qk
from fopru_kernels.integrations.qwen_vl import selection_runs
from fopru_kernels.integrations.transformers import apply_fopru, remove_fopru

transformers = pytest.importorskip("transformers")

PAD, BOS, EOS, IMAGE, VIDEO, START, END = 0, 1, 2, 60, 61, 58, 59
PATCH, MERGE = 14, 2
PIXELS = 3 * 2 * PATCH * PATCH  # one patch row of pixel_values: channels * temporal patch * patch * patch
IMAGES = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 4, 4]])  # (t, h, w) patches: 2 x 3, 4 x 2 and 2 x 2 merged
VIDEOS = torch.tensor([[2, 4, 4]])  # two frames of 2 x 2 merged tokens
SECONDS = torch.tensor([1.5])  # Qwen2.5-VL: seconds per temporal patch
FAMILIES = ["qwen2", "qwen2_5", "qwen3"]


def tiny(family: str, attn: str = "sdpa"):
    """A seeded tiny ...ForConditionalGeneration on `attn` attention; the tower's q/k weights scaled x 4 so
    attention is peaked enough for decisive selection margins."""
    text = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1], "rope_theta": 10000.0})
    ids = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START, vision_end_token_id=END)
    vision = dict(num_heads=4, patch_size=PATCH, spatial_merge_size=MERGE, temporal_patch_size=2)
    if family == "qwen2":
        config = transformers.Qwen2VLConfig(
            vision_config=dict(vision, depth=2, embed_dim=32, hidden_size=32, mlp_ratio=2), text_config=text, **ids)
        cls = transformers.Qwen2VLForConditionalGeneration
    elif family == "qwen2_5":
        config = transformers.Qwen2_5_VLConfig(
            vision_config=dict(vision, depth=4, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                               window_size=56, fullatt_block_indexes=[1, 3], tokens_per_second=2),
            text_config=text, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        config = transformers.Qwen3VLConfig(
            vision_config=dict(vision, depth=3, hidden_size=32, intermediate_size=64, out_hidden_size=32,
                               num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
            text_config=dict(text, head_dim=8), **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=attn).eval()
    with torch.no_grad():
        for block in model.model.visual.blocks:
            block.attn.qkv.weight[: 2 * block.attn.qkv.in_features].mul_(4)
    return model


def merged(grid) -> tuple[int, int, int]:
    t, h, w = (int(v) for v in grid)
    return t, h // MERGE, w // MERGE


def prompts(family: str):
    """Row 0: image 0, then the video; row 1: images 1 and 2. Left padded, as the processors lay them out
    (Qwen3-VL: a timestamp token and its own vision_start / vision_end around every frame)."""
    runs = [[IMAGE] * (t * h * w) for t, h, w in map(merged, IMAGES)]
    vt, vh, vw = merged(VIDEOS[0])
    if family == "qwen3":
        video = [tok for f in range(vt) for tok in [40 + f, START, *[VIDEO] * (vh * vw), END]]
    else:
        video = [START, *[VIDEO] * (vt * vh * vw), END]
    row0 = [BOS, 5, START, *runs[0], END, 7, *video, 8]
    row1 = [BOS, START, *runs[1], END, 9, START, *runs[2], END, 10, 11]
    width = max(len(row0), len(row1))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in (row0, row1)])
    gen = torch.Generator().manual_seed(1)
    inputs = {
        "input_ids": ids,
        "attention_mask": (ids != PAD).long(),
        "mm_token_type_ids": (ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
        "pixel_values": torch.randn(int(IMAGES.prod(-1).sum()), PIXELS, generator=gen),
        "image_grid_thw": IMAGES,
        "pixel_values_videos": torch.randn(int(VIDEOS.prod(-1).sum()), PIXELS, generator=gen),
        "video_grid_thw": VIDEOS,
    }
    if family == "qwen2_5":
        inputs["second_per_grid_ts"] = SECONDS
    return inputs


def scored_block(visual) -> int:
    return list(getattr(visual, "fullatt_block_indexes", [len(visual.blocks) - 1]))[-1]


def stock_encoding(model, pixels, grid, modality: str):
    """The unpatched model's merged features (and deepstack features) of one modality, with q, k and the
    attention segments of the scored block recomputed from that block's input."""
    visual = model.model.visual
    block = visual.blocks[scored_block(visual)]
    seen = {}
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: seen.update(x=args[0], **kwargs), with_kwargs=True)
    try:
        with torch.no_grad():
            out = getattr(model.model, f"get_{modality}_features")(pixels, grid)
    finally:
        hook.remove()
    with torch.no_grad():
        qkv = block.attn.qkv(block.norm1(seen["x"])).view(seen["x"].shape[0], 3, block.attn.num_heads, -1)
        rotary = sys.modules[type(block.attn).__module__].apply_rotary_pos_emb_vision
        q, k = rotary(qkv[:, 0], qkv[:, 1], *seen["position_embeddings"])
    deep = getattr(out, "deepstack_features", None)
    return (torch.cat(out.pooler_output), None if deep is None else [torch.cat(f) for f in deep], q, k,
            seen["cu_seqlens"], block.attn.scaling)


def expected_selection(model, family, pixels, grid, modality, score, kind, budget):
    """Kept merged-token indices of one modality by the oracle, per run, and the stock features."""
    features, deep, q, k, cu, scale = stock_encoding(model, pixels, grid, modality)
    bounds = cu.tolist()
    token_sig = torch.cat([reference_qk.significance_qk(q[None, a:b], k[None, a:b], score, 0, scale, None, kind, "bshd")[0]
                           for a, b in zip(bounds, bounds[1:])])
    sig = token_sig.view(-1, MERGE * MERGE).sum(dim=1)
    if family == "qwen2_5":  # encoder order is the model's window order
        window = sys.modules[type(model.model.visual).__module__].get_vision_window_index
        sig = sig[torch.argsort(window(grid, MERGE, 56, PATCH)[0])]
    runs = []  # (n, rows, cols) per selection run
    for t, h, w in map(merged, grid):
        if modality == "video" and family == "qwen3":
            runs += [(h * w, h, w)] * t
        else:
            runs.append((t * h * w, t * h, w))
    kept, start = [], 0
    for n, rows, cols in runs:
        keep, strategy = budget(n, rows, cols)
        seg = sig[start:start + n]
        if strategy == "rank":
            top = seg.sort(descending=True).values
            assert top[keep - 1] - top[keep] > 4 * 2 * 4  # decisive: far above one fx step per head and token
        else:
            rowsum = seg.view(rows, cols).sum(1).sort(descending=True).values
            assert rowsum[keep // cols - 1] - rowsum[keep // cols] > 4 * 2 * 4 * cols
        kept.append(F.select(seg[None], keep, strategy=strategy, grid=(rows, cols))[0])
        start += n
    return kept, [n for n, _, _ in runs], features, deep


def expected_positions(ids, mask, family, kept):
    """(3, B, T) M-RoPE positions of a trimmed prompt, walked from grid_thw and the kept indices."""
    out = torch.zeros(3, *ids.shape, dtype=torch.int64)
    media = {IMAGE: [(g, 1) for g in IMAGES], VIDEO: [(g, 1 if family == "qwen2" else 2 * float(SECONDS[0]))
                                                        for g in VIDEOS]}
    if family == "qwen3":  # every frame is a media item of its own, t = 0
        media[VIDEO] = [(torch.tensor([1, *g[1:].tolist()]), 0) for g in VIDEOS for _ in range(int(g[0]))]
    queues = {tok: iter(zip(items, kept[tok])) for tok, items in media.items()}
    for b in range(ids.shape[0]):
        cur, cols = 0, mask[b].nonzero().flatten().tolist()
        for tok, group in itertools.groupby(cols, key=lambda c: int(ids[b, c])):
            group = list(group)
            if tok not in (IMAGE, VIDEO):
                for c in group:
                    out[:, b, c] = cur
                    cur += 1
                continue
            (grid, interval), local = next(queues[tok])
            _, h, w = merged(grid)
            assert len(local) == len(group)
            for c, li in zip(group, local.tolist()):
                out[:, b, c] = torch.tensor([cur + int(li // (h * w) * interval), cur + li // w % h, cur + li % w])
            cur += max(h, w)
    return out


def watch_language_model(model, run):
    """Runs `run()` recording the language model's kwargs on every call (prefill first)."""
    calls = []
    hook = model.model.language_model.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    try:
        with torch.no_grad():
            out = run()
    finally:
        hook.remove()
    return out, calls


def generate(model, inputs):
    return model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=PAD)


def budget_of(settings: dict, family: str, modality: str):
    """The expected kept count per run, written out from the README's rule."""
    def budget(n, rows, cols):
        frames = 1
        if modality == "video" and family != "qwen3":
            frames = int(VIDEOS[0][0])
        if "ratio" in settings:
            k = int(n * settings["ratio"]) if settings.get("strategy", "rank") == "rank" else int(rows * settings["ratio"]) * cols
        else:
            k = min(settings["keep"] * frames, n)
        return k, settings.get("strategy", "rank")
    return budget


SETTINGS = {"keep3-rank-focal-logit": dict(keep=3),
            "ratio-row-received-prob": dict(ratio=0.5, strategy="row", score="received", kind="prob")}


@pytest.mark.parametrize(
    "family, settings, attn",
    [pytest.param(f, s, "sdpa", id=f"{f}-{name}") for f in FAMILIES for name, s in SETTINGS.items()]
    + [pytest.param("qwen2_5", SETTINGS["keep3-rank-focal-logit"], "eager", id="qwen2_5-eager-tower")],
)
def test_generate_sees_kept_tokens_at_their_positions(family, settings, attn):
    model, inputs = tiny(family, attn), prompts(family)
    score, kind = settings.get("score", "focal"), settings.get("kind", "logit")
    kept, features, deep, sizes = {}, {}, {}, {}
    for modality, token, pixels, grid in (("image", IMAGE, inputs["pixel_values"], IMAGES),
                                           ("video", VIDEO, inputs["pixel_values_videos"], VIDEOS)):
        kept[token], sizes[token], features[token], deep[token] = expected_selection(
            model, family, pixels, grid, modality, score, kind, budget_of(settings, family, modality))
    stock_out, stock_calls = watch_language_model(model, lambda: generate(model, inputs))

    handle = apply_fopru(model, **settings)
    trimmed = handle.prepare_inputs(inputs)
    out, calls = watch_language_model(model, lambda: generate(model, trimmed))
    assert model.model.visual.config._attn_implementation == attn  # the tower keeps its attention
    ids, mask = trimmed["input_ids"], trimmed["attention_mask"].bool()
    assert out.shape[1] == ids.shape[1] + 3
    prefill = calls[0]
    for token in (IMAGE, VIDEO):
        # The language model gets exactly the kept count per run: runs of placeholders, in prompt order.
        where = ((ids == token) & mask).reshape(-1).nonzero().flatten()
        counts = [len(g) for g in torch.tensor_split(where, (torch.diff(where) > 1).nonzero().flatten() + 1)]
        assert counts == [len(k) for k in kept[token]]
        offsets = [0, *itertools.accumulate(sizes[token])]
        idx = torch.cat([k + o for k, o in zip(kept[token], offsets)])
        assert torch.equal(prefill["inputs_embeds"][(ids == token) & mask], features[token][idx])
        if family == "qwen3":  # deepstack features pruned with the same indices
            visual = prefill["visual_pos_masks"]
            rows = (ids[visual] == token)
            for layer, joint in enumerate(prefill["deepstack_visual_embeds"]):
                assert torch.equal(joint[rows], deep[token][layer][idx])
    with torch.no_grad():
        text = model.model.get_input_embeddings()(ids)
    media = (ids == IMAGE) | (ids == VIDEO)
    assert torch.equal(prefill["inputs_embeds"][~media], text[~media])

    positions = prefill["position_ids"][-3:]
    want = expected_positions(ids, mask, family, kept)
    assert torch.equal(positions[:, mask], want[:, mask])
    # Text continues as in the unpruned model: the same positions for the same text tokens, and the
    # same positions for every generated token.
    stock_ids, stock_mask = inputs["input_ids"], inputs["attention_mask"].bool()
    stock_text = stock_calls[0]["position_ids"][-3:][:, stock_mask & (stock_ids != IMAGE) & (stock_ids != VIDEO)]
    assert torch.equal(positions[:, mask & ~media], stock_text)
    for stock_call, call in zip(stock_calls[1:], calls[1:]):
        assert torch.equal(call["position_ids"][-3:], stock_call["position_ids"][-3:])
    assert len(calls) == len(stock_calls) == 3
    remove_fopru(model)


@pytest.mark.parametrize("family", FAMILIES)
def test_remove_fopru_restores_stock_outputs(family):
    model, inputs = tiny(family), prompts(family)
    with torch.no_grad():
        logits = model(**inputs).logits
    reference = generate(model, inputs)
    handle = apply_fopru(model, ratio=0.25)
    with torch.no_grad():
        pruned_logits = model(**handle.prepare_inputs(inputs)).logits  # a plain forward (no generate) works too
    assert pruned_logits.shape[1] < logits.shape[1]
    with pytest.raises(ValueError, match="already applied"):
        apply_fopru(model.model, keep=2)
    remove_fopru(model.model)
    assert not {"get_image_features", "get_video_features", "get_rope_index"} & set(vars(model.model))
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, logits)
    assert torch.equal(generate(model, inputs), reference)
    remove_fopru(model)  # a no-op once removed


def test_budget_counts_per_run():
    handle = apply_fopru(tiny("qwen2_5"), keep=3)
    counts = handle.image_token_counts(IMAGES, VIDEOS)
    assert counts == {"image": [(6, 3), (8, 3), (4, 3)], "video": [(8, 6)]}  # a video keeps keep per frame
    ratio = selection_runs(IMAGES, "image", ratio=0.3)  # floor(n * 0.3) of 6, 8, 4 merged tokens
    assert [(r.n, r.keep, r.rows, r.cols) for r in ratio] == [(6, 1, 2, 3), (8, 2, 4, 2), (4, 1, 2, 2)]
    clip = selection_runs(VIDEOS, "video", ratio=0.5, strategy="row")  # 4 stacked rows of 2: 2 rows kept
    assert [(r.n, r.keep, r.rows, r.cols) for r in clip] == [(8, 4, 4, 2)]
    qwen3 = apply_fopru(tiny("qwen3"), keep=3, strategy="row")  # whole rows; Qwen3-VL videos per frame
    assert qwen3.image_token_counts(IMAGES, VIDEOS) == {"image": [(6, 3), (8, 2), (4, 2)], "video": [(4, 2), (4, 2)]}
    with pytest.raises(ValueError, match="modality must be 'image' or 'video'"):
        selection_runs(IMAGES, "audio", keep=1)


def test_settings_are_checked():
    model = tiny("qwen2_5")
    for kwargs, pattern in [
        (dict(keep=3, layer=0), r"layer must index a full-attention block of the vision tower, one of \[1, 3\], got 0"),
        (dict(keep=3, score="cls"), r"score must be one of 'focal', 'received' \(Qwen-VL towers have no CLS token\), got 'cls'"),
        (dict(keep=3, kind="softmax"), r"kind must be one of 'prob', 'logit', got 'softmax'"),
        (dict(keep=0), r"^keep must be an int >= 1"),
        (dict(ratio=0.0), r"^ratio must be a number in \(0, 1\]"),
        (dict(keep=3, ratio=0.5), r"^give exactly one of 'keep'"),
        (dict(keep=3, strategy="top"), r"^strategy must be one of 'rank', 'row', got 'top'"),
        (dict(keep=3, backend="gpu"), r"backend must be one of .* got 'gpu'"),
    ]:
        with pytest.raises(ValueError, match=pattern):
            apply_fopru(model, **kwargs)
        assert getattr(model.model, "_fopru", None) is None
    handle = apply_fopru(model, ratio=0.05)
    with pytest.raises(ValueError, match=r"the budget keeps no token of a 2 x 3 image run"):
        handle.prepare_inputs(prompts("qwen2_5"))
    remove_fopru(model)
    assert apply_fopru(model, keep=2, layer=-3).capture.block == 1  # negative indices count from the end
    remove_fopru(model)


def test_unpruned_prompt_is_refused():
    model, inputs = tiny("qwen2"), prompts("qwen2")
    apply_fopru(model, keep=2)
    with pytest.raises(ValueError, match=r"the prompt holds 18 image placeholders where FoPru keeps 6: pass"):
        generate(model, inputs)
    remove_fopru(model)
