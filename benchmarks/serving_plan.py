"""What the serving report measures: the shapes of each section on a GPU (LLaVA-1.5 sizes) and on a
CPU (tiny shapes that prove the code paths), the timing settings, and the backends timed."""
from __future__ import annotations

from dataclasses import dataclass

import torch

import fopru_kernels

from .timing import Timing

@dataclass(frozen=True)
class QKShape:
    """One encoder layer: q, k, v (B, H, S, d), tokens (B, S - P, D); keep K of the S - P patches."""

    batches: tuple[int, ...]
    H: int = 16
    S: int = 577
    d: int = 64
    D: int = 1024
    keep: int = 144
    num_prefix: int = 1


@dataclass(frozen=True)
class VarlenShape:
    """B packed images with patch grids `grids`, each keeping rows // 4 of its grid rows (25%);
    the dense comparison is one (B, rows * cols) batch of the same total, grid `dense_grid`."""

    grids: tuple[tuple[int, int], ...]
    dense_grid: tuple[int, int]
    D: int = 1024

    @property
    def sizes(self) -> list[int]:
        return [r * c for r, c in self.grids]

    @property
    def keeps(self) -> list[int]:
        return [(r // 4) * c for r, c in self.grids]

    @property
    def dense_keep(self) -> int:
        return (self.dense_grid[0] // 4) * self.dense_grid[1]


@dataclass(frozen=True)
class QwenShape:
    """Images packed for Qwen-VL's vision tower: patch grids `grids` (rows, cols; both even, so 2 x 2
    patches merge into one language-model token: `group` = 4), one full-attention block of `hidden`
    channels in `heads` heads with a SiLU-gated MLP of `intermediate`, merged tokens of `merged_dim`;
    each image keeps a quarter of its merged tokens."""

    grids: tuple[tuple[int, int], ...]
    hidden: int = 1280
    heads: int = 16
    intermediate: int = 3420
    merged_dim: int = 3584
    group: int = 4

    @property
    def sizes(self) -> list[int]:
        return [r * c for r, c in self.grids]

    @property
    def keeps(self) -> list[int]:
        return [r * c // self.group // 4 for r, c in self.grids]


@dataclass(frozen=True)
class LlavaShape:
    """LLaVA-1.5 built from a config in code (random weights): CLIP tower + Llama language model."""

    vision: dict
    text: dict
    image_token_id: int
    batches: tuple[int, ...]
    keeps: tuple[int, ...]
    text_tokens: int = 48  # prompt tokens besides the image placeholders (LLaVA-1.5 template + question)
    warmup: int = 2
    reps: int = 5


@dataclass(frozen=True)
class Plan:
    qk: QKShape
    varlen: VarlenShape
    llava: LlavaShape
    qwen: QwenShape
    timing: Timing
    copy_bytes: int


LLAVA_15_VISION = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)
LLAVA_15_TEXT = dict(
    vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
    pad_token_id=32001, bos_token_id=1, eos_token_id=2,
)
# Qwen2.5-VL-7B's vision tower (hidden 1280, 16 heads of d = 80, MLP 3420, merged D = 3584) on 8
# dynamic-resolution images of 192 to 2240 patches, 7744 in all.
QWEN_GRIDS = ((16, 16), (32, 32), (24, 40), (48, 36), (20, 28), (40, 56), (12, 16), (28, 28))
# 4 LLaVA tiles of 576 and dynamic-resolution images of 256..2304 patches; 6144 = 8 x (24 x 32) in all.
VARLEN_GRIDS = ((24, 24), (16, 16), (24, 24), (48, 48), (24, 24), (32, 32), (24, 24), (16, 16))


def gpu_plan(quick: bool) -> Plan:
    """LLaVA-1.5 shapes (Qwen2.5-VL-7B's for the packed q/k section). Full: q/k at B 1 and 32, LLaVA at
    B 1 and 8 with keep 576/288/144/64.
    --quick: q/k at B=32 (where the targets are), LLaVA at B=1 with keep 576/144, fewer repeats."""
    return Plan(
        qk=QKShape(batches=(32,) if quick else (1, 32)),
        varlen=VarlenShape(grids=VARLEN_GRIDS, dense_grid=(24, 32)),
        llava=LlavaShape(
            vision=LLAVA_15_VISION, text=LLAVA_15_TEXT, image_token_id=32000,
            batches=(1,) if quick else (1, 8), keeps=(576, 144) if quick else (576, 288, 144, 64),
            reps=3 if quick else 5,
        ),
        qwen=QwenShape(grids=QWEN_GRIDS),
        timing=Timing(0.02 if quick else 0.05, 10, 200, 3 if quick else 5),
        copy_bytes=1 << 30,
    )


def tiny_plan(quick: bool) -> Plan:
    """Shapes small enough for the reference and the tiny model on a CPU: exercises every path."""
    return Plan(
        qk=QKShape(batches=(2,) if quick else (1, 2), H=2, S=17, d=8, D=16, keep=4),
        varlen=VarlenShape(grids=tuple((r // 2, c // 2) for r, c in VARLEN_GRIDS), dense_grid=(12, 16), D=16),
        llava=LlavaShape(
            vision=dict(image_size=56, patch_size=14, hidden_size=64, intermediate_size=128,
                        num_attention_heads=4, num_hidden_layers=3),
            text=dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2),
            image_token_id=63, batches=(1,) if quick else (1, 2), keeps=(16, 4) if quick else (16, 8, 4, 2),
            text_tokens=8, warmup=1, reps=2,
        ),
        qwen=QwenShape(grids=((4, 4), (8, 8), (6, 10), (12, 8), (4, 6), (10, 12), (4, 4), (6, 6)), hidden=64, heads=4,
                       intermediate=128, merged_dim=32),
        timing=Timing(0.01, 2, 3, 0),
        copy_bytes=8 << 20,
    )


def plan_for(device: torch.device, quick: bool) -> Plan:
    return gpu_plan(quick) if device.type == "cuda" else tiny_plan(quick)


def backends_for(device: torch.device) -> list[str]:
    """The fused backends timed on `device`: CUDA C++ and Triton on a GPU; the C++ CPU op (or the
    reference without the compiled library) on a CPU."""
    if device.type == "cuda":
        have = fopru_kernels.available_backends(device)
        return [b for b in ("cuda", "triton") if b in have]
    return ["cpu"] if fopru_kernels.HAS_LIBRARY else ["reference"]
