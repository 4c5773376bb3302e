"""M-RoPE positions of pruned media in vLLM (Qwen-VL), through vLLM's mechanism for pruned media.

vLLM computes a request's M-RoPE positions once, when the request starts (the model's
`get_mrope_input_positions`), and lets a model that prunes media (`SupportsMultiModalPruning`) rewrite
them once the media are encoded: the model's `embed_multimodal` appends position channels to the
embeddings it returns, and the runner's `_gather_mm_embeddings` hands every prefill chunk's embeddings
to the model's `recompute_mrope_positions`, which strips the channels and returns the request's
positions and position delta.

FoPru gives every token the position the unpruned model gives it, as the transformers adapter does:
- `prompt_positions` (request start): every text token gets its position in the unpruned prompt, from
  the model's own method run on the prompt with every placeholder run restored to its unpruned length
  (`integrations.qwen_vl.trimmed_rope_index`); placeholders get provisional positions;
- `relative_positions` (encoding): each kept token's position relative to the start of its run, from the
  model's own method on the media item alone, travels with its embedding (`common.append_ints`);
- `place_media_positions` (each prefill chunk): writes run start + relative position into the chunk's
  placeholders. Text positions are right from the start, so nothing depends on where chunks end.
vLLM's helper `evs.recompute_mrope_positions` is not used: after an image it continues the text at the
image's start + its grid width (the unpruned model: + max(rows, cols)), and it looks for a chunk's media
from the next `<|vision_start|>` on, which a chunk that ends right after a `<|vision_start|>` has passed.

The runner calls `recompute_mrope_positions` only while its flag `is_multimodal_pruning_enabled` is true;
vLLM sets the flag from the video-pruning setting (`--video-pruning-rate`) alone, and its CPU runner never
sets it. `enable_runner_flag` makes the flag also true for a model whose `fopru_prunes_media` is true.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch

from ..qwen_vl import Run, trimmed_rope_index
from .common import split_ints

FLAG = "is_multimodal_pruning_enabled"
POSITION_CHANNELS = 3  # (t, h, w) relative to the run's start, as ints (common.append_ints)

# The model's own get_mrope_input_positions(input_tokens, mm_features) -> ((3, L) positions, delta).
StockPositions = Callable[[list, list], tuple[torch.Tensor, int]]


def enable_runner_flag() -> None:
    """Makes vLLM's model runners (GPUModelRunner and its CPU subclass) read `is_multimodal_pruning_enabled`
    as (the value vLLM set) or (the loaded model's `fopru_prunes_media`). Idempotent; installed when the
    first model that prunes with FoPru is built, before the runner executes anything."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if isinstance(GPUModelRunner.__dict__.get(FLAG), property):
        return

    def get(runner) -> bool:
        model = runner.__dict__.get("model")
        return bool(runner.__dict__.get(FLAG, False) or getattr(model, "fopru_prunes_media", False))

    def put(runner, value) -> None:
        runner.__dict__[FLAG] = value

    setattr(GPUModelRunner, FLAG, property(get, put))


def media_item(modality: str, data: Mapping[str, torch.Tensor], offset: int, length: int):
    """A vLLM MultiModalFeatureSpec for `data` ({"image_grid_thw": (3,) tensor, ...}) at `offset`."""
    from vllm.multimodal.inputs import (
        MultiModalFeatureSpec,
        MultiModalFieldConfig,
        MultiModalFieldElem,
        MultiModalKwargsItem,
        PlaceholderRange,
    )

    field = MultiModalFieldConfig.batched(modality).field
    item = MultiModalKwargsItem({key: MultiModalFieldElem(data=value, field=field) for key, value in data.items()})
    return MultiModalFeatureSpec(data=item, modality=modality, identifier="fopru",
                                 mm_position=PlaceholderRange(offset=offset, length=length))


def relative_positions(stock: StockPositions, modality: str, data: Mapping[str, torch.Tensor], merge: int,
                       pad: int, vision_start: int, vision_end: int, per_frame: bool) -> torch.Tensor:
    """(n, 3) int64: the (t, h, w) M-RoPE position of every merged token of one media item (encoder
    order), minus the start of its run (the position after the run's `<|vision_start|>`), by the model's
    own `stock` method on the item alone: `<|vision_start|>`, its n placeholders (`pad`), `<|vision_end|>`
    (a per_frame video: that for every frame). data: the item's grid `{modality}_grid_thw` (t, h, w
    patches) and what else `stock` reads (Qwen2.5-VL videos: `second_per_grid_ts`); merge: the spatial
    merge size."""
    t, h, w = (int(v) for v in data[f"{modality}_grid_thw"])
    frames = t if per_frame and modality == "video" else 1
    run = [vision_start] + [pad] * (t // frames * h * w // merge**2) + [vision_end]
    tokens = run * frames
    offset, length = (0, len(tokens)) if frames > 1 else (1, len(run) - 2)
    positions, _ = stock(tokens, [media_item(modality, data, offset, length)])
    ids = torch.tensor(tokens)
    return _from_run_start(torch.as_tensor(positions, dtype=torch.int64), ids, pad, vision_start).T


def _from_run_start(positions: torch.Tensor, ids: torch.Tensor, pad: int, vision_start: int) -> torch.Tensor:
    """(3, P) positions of the `pad` tokens of ids (L,), each minus (its run's vision_start position + 1)."""
    pads = (ids == pad).nonzero().flatten()
    starts = (ids == vision_start).nonzero().flatten()
    owner = starts[torch.searchsorted(starts, pads, right=True) - 1]
    return positions[:, pads] - positions[:1, owner] - 1


def prompt_positions(stock: StockPositions, input_tokens: Sequence[int], mm_features: list,
                     runs: Callable[[object], list[Run]], token_ids: Mapping[str, int]) -> tuple[torch.Tensor, int]:
    """(positions (3, N), delta) of a prompt whose placeholder runs hold the kept counts: every text token
    at its position in the unpruned prompt, every placeholder at a provisional one (its run's last kept
    count of positions), delta such that generation continues as in the unpruned prompt.

    stock: the model's own get_mrope_input_positions; mm_features: the request's media items (vLLM's
    MultiModalFeatureSpec, placeholder ranges of the pruned prompt); runs(feature): that item's runs in
    prompt order (their n: unpruned placeholders, keep: placeholders in this prompt); token_ids:
    modality -> placeholder token id.
    """
    features = sorted(mm_features, key=lambda f: f.mm_position.offset)
    ids = torch.tensor(list(input_tokens), dtype=torch.int64)
    by_modality = {m: [r for f in features if f.modality == m for r in runs(f)] for m in token_ids}
    restored = []  # (index of a run's last placeholder in this prompt, tokens it gets back)
    for modality, modality_runs in by_modality.items():
        where = (ids == token_ids[modality]).nonzero().flatten().tolist()
        ends = torch.tensor([r.keep for r in modality_runs], dtype=torch.int64).cumsum(0).tolist()
        if len(where) != (ends[-1] if ends else 0):
            raise ValueError(f"FoPru: the prompt holds {len(where)} {modality} placeholders where its media keep "
                             f"{ends[-1] if ends else 0}")
        restored += [(where[end - 1], r.n - r.keep) for end, r in zip(ends, modality_runs)]

    def shift(index: int, inclusive: bool) -> int:
        return index + sum(extra for last, extra in restored if last < index or inclusive and last == index)

    def unpruned(feature):
        start, length = feature.mm_position.offset, feature.mm_position.length
        first, last = shift(start, False), shift(start + length - 1, True)
        return dataclasses.replace(feature, mm_position=type(feature.mm_position)(offset=first, length=last - first + 1))

    unpruned_features = [unpruned(f) for f in features]

    def rope_index(unpruned_ids: torch.Tensor, **_):
        positions, delta = stock(unpruned_ids[0].tolist(), unpruned_features)
        return torch.as_tensor(positions, dtype=torch.int64)[:, None], torch.tensor([[delta]])

    positions, deltas = trimmed_rope_index(rope_index, {"input_ids": ids[None]}, token_ids, by_modality, kept=None)
    return positions[:, 0], int(deltas)


def place_media_positions(input_ids, embeddings: Sequence[torch.Tensor], positions: torch.Tensor,
                          num_computed_tokens: int, pads: Sequence[int], vision_start: int,
                          ) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """The model's recompute_mrope_positions: embeddings of one prefill chunk, each (rows, D + position
    channels), fill the prompt's placeholders (`pads` ids) from num_computed_tokens on, in order. Returns
    the embeddings without their channels, the prompt's positions (3, N) with those placeholders at their
    run's start + their relative position, and the position delta."""
    stripped, relative = zip(*(split_ints(e, POSITION_CHANNELS) for e in embeddings)) if embeddings else ((), ())
    positions = positions.clone()
    rows = sum(r.shape[0] for r in relative)
    if rows:
        ids = torch.as_tensor(input_ids, dtype=torch.int64, device=positions.device)
        placeholders = torch.isin(ids, torch.tensor(list(pads), device=ids.device)).nonzero().flatten()
        placeholders = placeholders[placeholders >= num_computed_tokens][:rows]
        if placeholders.numel() != rows:
            raise RuntimeError(f"FoPru: {rows} media embeddings for {placeholders.numel()} placeholders")
        starts = (ids == vision_start).nonzero().flatten()
        owner = starts[torch.searchsorted(starts, placeholders, right=True) - 1]
        positions[:, placeholders] = positions[:1, owner] + 1 + torch.cat(relative).to(positions.device).T
    delta = int(positions.max()) + 1 - positions.shape[1] if positions.numel() else 0
    return list(stripped), positions, delta
