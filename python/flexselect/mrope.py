"""M-RoPE layouts of the Qwen-VL families, shared by the transformers backend, the llama.cpp backend and (as
test vectors) the C++ runtime's `positions.cpp`: no runtime is imported here.

A video starting at position s gives token (unit u, row r, col c) the position (s + floor(u * interval), s + r, s + c),
with interval = tokens_per_second * temporal_patch_size / sampling fps (Qwen2-VL: interval 1, no time scaling), and
the text after the video resumes at the largest video position + 1 (the original Qwen2.5-VL definition; transformers
5.23's own `get_rope_index` resumes at s + max(rows, cols) instead, which differs for videos).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from .errors import FlexSelectError

if TYPE_CHECKING:
    from .backends.base import VisualTokens

PIXEL_FACTOR = 28  # patch 14 x spatial merge 2: each side of a frame must be a multiple of this


def frame_size(height: int, width: int, factor: int = PIXEL_FACTOR) -> tuple[int, int]:
    """Each side rounded to the nearest multiple of `factor` (at least one): the size the vision tower takes."""
    return max(factor, round(height / factor) * factor), max(factor, round(width / factor) * factor)


def time_interval(tokens_per_second: float | None, temporal_patch: int, sample_fps: float) -> float:
    """Temporal position step per frame unit: `tokens_per_second` (the family's, from defaults.json) positions per
    second of video, or 1 per unit for a family without time scaling (Qwen2-VL: None)."""
    if tokens_per_second is None:
        return 1.0
    if not sample_fps > 0:
        raise FlexSelectError(f"the sampling rate must be positive, got {sample_fps}")
    return tokens_per_second * temporal_patch / sample_fps


def video_positions(num_frames: int, grid: tuple[int, int], interval: float) -> torch.Tensor:
    """M-RoPE offsets [3, num_frames*rows*cols] of a video's tokens relative to the video's start position."""
    rows, cols = grid
    t = torch.tensor([math.floor(u * interval) for u in range(num_frames)], dtype=torch.long)
    return torch.stack(
        [
            t[:, None, None].expand(num_frames, rows, cols),
            torch.arange(rows)[None, :, None].expand(num_frames, rows, cols),
            torch.arange(cols)[None, None, :].expand(num_frames, rows, cols),
        ]
    ).reshape(3, -1)


def layout_positions(
    prefix_len: int, video_offsets: torch.Tensor, video_extent: int, suffix_len: int
) -> tuple[torch.Tensor, int]:
    """Positions [3, P + V + T] of prefix, video tokens and suffix, and the position of the next token.

    `video_extent` is the largest offset of the *whole* video the tokens come from, so the text after a subset of
    tokens keeps the position it has after the full video.
    """
    prefix = torch.arange(prefix_len).expand(3, -1)
    suffix_start = prefix_len + video_extent + 1
    suffix = torch.arange(suffix_start, suffix_start + suffix_len).expand(3, -1)
    return torch.cat([prefix, video_offsets + prefix_len, suffix], dim=1), suffix_start + suffix_len


def full_video_extent(visual: VisualTokens) -> int:
    rows, cols = visual.grid
    return max(math.floor((visual.num_frames - 1) * visual.time_interval), rows - 1, cols - 1)


def compact_positions(offsets: torch.Tensor) -> torch.Tensor:
    """Re-grid kept tokens: temporal offsets become the dense rank of the kept units, so no gaps remain in time."""
    t = offsets[0]
    ranks = torch.unique(t, return_inverse=True)[1]
    return torch.stack([ranks, offsets[1], offsets[2]])
