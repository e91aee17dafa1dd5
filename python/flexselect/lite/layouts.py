"""How a Lite ranker sees one frame set: its own projector over the host's vision features, and its input sequence.

A ranker reads what the host's vision tower produced *before* the host's own projector (the authors' design, so the
tower runs once and both projectors read it), turns it into its own visual tokens, places them in the host's prompt
(re-tokenized for the ranker where its tokenizer differs) and scores them at its last layer. Per host family:

- `qwen2_5_vl`: features per frame [tokens, 4 x 1280], the ViT's last hidden states of each token's 2x2 merge
  group; the ranker's own patch merger (RMSNorm + 2-layer GELU MLP) -> 896.
- `llava_onevision`: [27, 27, 1152], the selected SigLIP layer's patch grid; its own 2-layer GELU MLP, the host's
  2x2 bilinear pooling, and its own newline token after each pooled row (210 tokens a frame, as the authors').
- `internvl`: [256, 4096], the pixel-shuffled InternViT features; its own `mlp1` (LayerNorm + 2-layer GELU MLP),
  between the `<img>` / `</img>` of its own vocabulary, after InternVL's "FrameN: " labels.
- `host_embeds`: [tokens, D_host], the host's post-merger embeddings (all llama.cpp and the C++ runtime can give);
  a 2-layer GELU MLP, the sequence [visual tokens, question].

Every layout reduces a set to one `RankerInputs`, the ranker's (and its ONNX graph's) whole input: the ranker's
token ids with placeholder rows where its projected visual tokens go, the raw features, the positions (M-RoPE
[3, L] for Qwen, 1-D otherwise), the columns whose scores the host needs (in `visual.frame_tokens(frames)` order)
and the question rows: all rows after the video (the last T rows), as in the reference layer.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FlexSelectError

if TYPE_CHECKING:
    from ..backends.base import Prompt, VisualTokens

LAYOUTS = ("qwen2_5_vl", "llava_onevision", "internvl", "host_embeds")
FAMILY_LAYOUT = {"qwen2_5_vl": "qwen2_5_vl", "llava_onevision": "llava_onevision", "internvl": "internvl"}
INPUTS = ("input_ids", "vision_features", "visual_rows", "position_ids", "score_columns", "question_rows")
INTERNVL_LABEL = "Frame{n}: "  # InternVL's video chat labels each frame block (see backends/hf/internvl.py)


@dataclass
class RankerInputs:
    """One frame set as the ranker reads it (the ONNX graph's inputs, same names)."""

    input_ids: torch.Tensor  # [L] long, ranker vocabulary; rows in visual_rows hold 0 and are overwritten
    vision_features: torch.Tensor  # [F, R, D] float (LLaVA: [F, rows, cols, D]): the set's frames' features
    visual_rows: torch.Tensor  # [V] long: sequence rows of the projected visual tokens, in projector order
    position_ids: torch.Tensor  # [K, L] long: K = 3 (M-RoPE t, h, w) or 1
    score_columns: torch.Tensor  # [S] long: rows whose scores the host wants, in frame_tokens(frames) order
    question_rows: torch.Tensor  # [T] long: the rows that score (the last T: the text after the video)

    def as_tuple(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in INPUTS)

    def to(self, device: torch.device | str) -> RankerInputs:
        return RankerInputs(*(t.to(device) for t in self.as_tuple()))


# -- projectors: vision features [F, R, D] -> the ranker's visual tokens [V, hidden] ------------------------------
class PatchMerger(nn.Module):
    """Qwen2.5-VL's patch merger shape: RMSNorm over each ViT patch, then a 2-layer GELU MLP over a 2x2 group."""

    def __init__(self, context_dim: int, hidden: int, merge_unit: int = 4, eps: float = 1e-6) -> None:
        super().__init__()
        self.context_dim, self.eps = context_dim, eps
        self.ln_q = nn.Module()
        self.ln_q.weight = nn.Parameter(torch.ones(context_dim))
        width = context_dim * merge_unit
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features.reshape(-1, self.context_dim).float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)  # Qwen2RMSNorm, float32 inside
        x = (self.ln_q.weight * x.to(self.ln_q.weight.dtype)).reshape(features.shape[0] * features.shape[1], -1)
        return self.mlp(x)


class PooledProjector(nn.Module):
    """LLaVA-Video's: 2-layer GELU MLP per SigLIP patch, 2x2 bilinear pooling (as the host), a newline per row."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.mm_projector = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image_newline = nn.Parameter(torch.zeros(hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features [F, rows, cols, D]: a grid, so that no size has to be recovered by a square root (and every
        size stays symbolic in an ONNX export)."""
        frames, rows, cols, _ = features.shape
        x = self.mm_projector(features).permute(0, 3, 1, 2)
        x = F.interpolate(x, size=[(rows + 1) // 2, (cols + 1) // 2], mode="bilinear")
        x = x.permute(0, 2, 3, 1)  # [F, rows, cols, hidden]
        newline = self.image_newline.to(x.dtype).expand(frames, x.shape[1], 1, -1)
        return torch.cat([x, newline], dim=2).reshape(-1, x.shape[-1])


class NormedProjector(nn.Module):
    """InternVL's `mlp1`: LayerNorm, Linear, GELU, Linear (indices 0, 1, 3 as in the checkpoints)."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp1 = nn.Sequential(
            nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden)
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp1(features).reshape(-1, self.mlp1[-1].out_features)


class EmbedsProjector(nn.Module):
    """The host_embeds layout: a 2-layer GELU MLP over the host's post-merger embeddings."""

    def __init__(self, vision_dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(vision_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features).reshape(-1, self.mlp[-1].out_features)


PROJECTORS: dict[str, type[nn.Module]] = {
    "qwen2_5_vl": PatchMerger,
    "llava_onevision": PooledProjector,
    "internvl": NormedProjector,
    "host_embeds": EmbedsProjector,
}


def make_projector(layout: str, vision_dim: int, hidden: int) -> nn.Module:
    if layout not in PROJECTORS:
        raise FlexSelectError(f"unknown ranker layout {layout!r}; known: {', '.join(LAYOUTS)}")
    if layout == "qwen2_5_vl":
        if vision_dim % 4:
            raise FlexSelectError(f"a patch-merger ranker needs 2x2 groups of ViT patches, got width {vision_dim}")
        return PatchMerger(vision_dim // 4, hidden)
    return PROJECTORS[layout](vision_dim, hidden)


def projected_tokens_per_frame(layout: str, features: torch.Tensor) -> int:
    """Visual tokens the projector makes from one frame of `features` [F, ...]."""
    if layout == "llava_onevision":
        rows, cols = (features.shape[1] + 1) // 2, (features.shape[2] + 1) // 2
        return rows * (cols + 1)  # each pooled row ends with the newline
    return features.shape[1]


# -- input sequences ---------------------------------------------------------------------------------------------
Retokenize = Callable[[torch.Tensor], torch.Tensor]  # host ids -> ranker ids (identity when they share a tokenizer)
TextIds = Callable[[str], list[int]]  # text -> ranker ids


def build_inputs(
    layout: str,
    visual: VisualTokens,
    frames: list[int],
    prompt: Prompt,
    retokenize: Retokenize,
    text_ids: TextIds,
    special_ids: dict[str, int],
) -> RankerInputs:
    """The ranker's view of one frame set (see module docstring)."""
    features = set_features(layout, visual, frames)
    per_frame = projected_tokens_per_frame(layout, features)
    n_visual = len(frames) * per_frame
    if layout == "host_embeds":
        question = torch.tensor(text_ids(prompt.question), dtype=torch.long)
        return _sequence(
            [torch.zeros(n_visual, dtype=torch.long), question],
            features,
            torch.arange(n_visual),
            torch.arange(n_visual),
        )
    prefix, suffix = retokenize(prompt.prefix_ids), retokenize(prompt.suffix_ids)
    p = len(prefix)
    if layout == "qwen2_5_vl":
        from ..mrope import layout_positions, video_positions

        rows = p + torch.arange(n_visual)
        offsets = video_positions(len(frames), visual.grid, visual.time_interval)
        positions, _ = layout_positions(p, offsets, int(offsets.max()), len(suffix))
        return _sequence(
            [prefix, torch.zeros(n_visual, dtype=torch.long), suffix], features, rows, rows, positions.long()
        )
    if layout == "llava_onevision":
        rows = p + torch.arange(n_visual)
        cols = visual.grid[1]
        grid = torch.arange(n_visual).view(len(frames), visual.grid[0], cols + 1)[:, :, :cols]
        return _sequence(
            [prefix, torch.zeros(n_visual, dtype=torch.long), suffix], features, rows, p + grid.reshape(-1)
        )
    if layout == "internvl":
        pieces, rows, cols, at = [prefix], [], [], p
        start, end = special_ids["<img>"], special_ids["</img>"]
        for n in range(1, len(frames) + 1):
            label = torch.tensor(text_ids(("\n" if n > 1 else "") + INTERNVL_LABEL.format(n=n)), dtype=torch.long)
            block = torch.cat([torch.tensor([start]), torch.zeros(per_frame, dtype=torch.long), torch.tensor([end])])
            pieces += [label, block]
            at += len(label)
            rows.append(at + 1 + torch.arange(per_frame))
            cols.append(at + torch.arange(per_frame + 2))
            at += len(block)
        pieces.append(suffix)
        return _sequence(pieces, features, torch.cat(rows), torch.cat(cols))
    raise FlexSelectError(f"unknown ranker layout {layout!r}; known: {', '.join(LAYOUTS)}")


def _sequence(
    pieces: list[torch.Tensor],
    features: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    positions: torch.Tensor | None = None,
) -> RankerInputs:
    ids = torch.cat(pieces).long()
    if positions is None:
        positions = torch.arange(len(ids))[None]
    after_video = int(max(rows.max(), cols.max())) + 1
    return RankerInputs(ids, features, rows.long(), positions, cols.long(), torch.arange(after_video, len(ids)))


def set_features(layout: str, visual: VisualTokens, frames: list[int]) -> torch.Tensor:
    """The vision features of the set's frames, [F, R, D] (host_embeds: the frames' embedding rows)."""
    if layout == "host_embeds":
        rows = visual.embeds[visual.frame_tokens(frames).to(visual.embeds.device)]
        return rows.view(len(frames), -1, rows.shape[-1])
    features = getattr(visual, "vision_features", None)
    if features is None:
        raise FlexSelectError(
            "this ranker reads the vision tower's features, but the video was encoded without them: "
            "encode it with a pipeline that has the ranker (FlexSelect.load(..., ranker=...))"
        )
    features = features[torch.tensor(frames, device=features.device)]
    if layout == "llava_onevision":  # the SigLIP patches as their square grid
        side = math.isqrt(features.shape[1])
        features = features.view(len(frames), side, side, -1)
    return features
