"""Placeholder editing for the transformers adapters: a prompt's runs of image (or video) placeholder
tokens cut to the kept count of each image, and the batch re-padded, so that the language model's
placeholders match the pruned features one for one."""
from __future__ import annotations

from collections.abc import Mapping

import torch


def keep_placeholder_runs(
    input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int, lengths: list[int], keep: list[int]
) -> torch.Tensor:
    """(B, T) bool: the valid tokens to keep, all but the last lengths[i] - keep[i] placeholders of image i.

    Image i owns the placeholders lengths[0] + ... + lengths[i-1] onwards, counted over the valid
    placeholders of the whole batch in row-major order (how the model's masked_scatter fills them);
    every row must hold whole images.
    """
    image = (input_ids == image_token_id) & valid
    bounds = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
    row_ends = image.sum(dim=1).cumsum(0).cpu()
    if not bool(torch.isin(row_ends, bounds).all()) or (row_ends.numel() and int(row_ends[-1]) != int(bounds[-1])):
        raise ValueError(
            f"the image placeholders (id {image_token_id}) must be runs of {lengths} tokens, one per image, "
            f"whole images per row; got {image.sum(dim=1).tolist()} per row"
        )
    if not lengths:
        return valid
    bounds = bounds.to(input_ids.device)
    rank = image.reshape(-1).cumsum(0) - 1  # rank of each placeholder over the batch, row-major
    owner = torch.searchsorted(bounds[1:], rank.clamp(min=0), right=True).clamp(max=len(lengths) - 1)
    within = rank - bounds[owner]
    limit = torch.tensor(keep, dtype=torch.int64, device=input_ids.device)[owner]
    return valid & (~image | (within < limit).view_as(image))


def keep_placeholders(
    input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int, tokens_per_image: int, keep: int
) -> torch.Tensor:
    """(B, T) bool: the valid tokens to keep, all but the last N - keep placeholders of each image.

    The i-th image of a row owns that row's placeholders i * N ... (i + 1) * N - 1 (counted over the
    row, so images placed back to back are told apart), N = tokens_per_image.
    """
    image = (input_ids == image_token_id) & valid
    counts = image.sum(dim=1)
    if bool((counts % tokens_per_image).any()):
        raise ValueError(
            f"every row must hold a multiple of {tokens_per_image} image placeholder tokens (id {image_token_id}), "
            f"one run of {tokens_per_image} per image; got {counts.tolist()}"
        )
    rank_in_image = (image.cumsum(dim=1) - 1) % tokens_per_image
    return valid & (~image | (rank_in_image < keep))


def compact_inputs(inputs: Mapping, kept: torch.Tensor, pad_token_id: int, padding_side: str = "left") -> dict:
    """Every (B, T) tensor of `inputs` (input_ids, attention_mask, ...) compacted to the kept
    positions and re-padded (input_ids with pad_token_id, the rest with 0); others pass through."""
    shape = inputs["input_ids"].shape
    out = dict(inputs)
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == shape:
            pad = pad_token_id if name == "input_ids" else 0
            out[name] = compact_rows(value, kept, pad, padding_side)
    return out


def compact_rows(values: torch.Tensor, kept: torch.Tensor, pad_value: int, padding_side: str = "left") -> torch.Tensor:
    """values (B, T) -> (B, T') holding each row's `kept` entries in order, padded with pad_value."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    lengths = kept.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = values.new_full((values.shape[0], width), pad_value)
    column = kept.cumsum(dim=1) - 1
    if padding_side == "left":
        column += (width - lengths)[:, None]
    rows = torch.arange(values.shape[0], device=values.device)[:, None].expand_as(kept)
    out[rows[kept], column[kept]] = values[kept]
    return out
