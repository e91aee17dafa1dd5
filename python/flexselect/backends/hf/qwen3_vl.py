"""Qwen3-VL (dense `qwen3_vl` and MoE `qwen3_vl_moe`) on transformers.

What differs from Qwen2.5-VL, and how each difference is handled:
- Q/K are normalised per head (`q_norm`, `k_norm`) and rotated with the interleaved M-RoPE: nothing to do, the
  shared scoring pass captures Q/K inside the attention, after both.
- DeepStack: the vision tower also returns features of a few of its inner layers (`deepstack`, one [tokens, hidden]
  slice per level), which the language model adds to the hidden states of the visual positions after its first
  decoder layers. Every pass hands the language model the DeepStack rows of exactly the visual tokens it carries
  (a set's tokens when scoring, the kept tokens when answering), through `visual_pos_masks` and
  `deepstack_visual_embeds`, as `Qwen3VLModel.forward` does for a whole video.
- Timestamps as text: each temporal unit (2 frames, patch 16, merge 2: (H/32) x (W/32) tokens) is written as
  `<t seconds>` <|vision_start|> its tokens <|vision_end|>, where t is the mean time of the unit's frames with one
  decimal (the Qwen3-VL processor's). Positions restart per unit as transformers' `get_rope_index` lays out
  Qwen3-VL video: text is consecutive; a unit starting at position s gives token (row r, col c) the position
  (s, s + r, s + c), and the text after it resumes at s + max(rows, cols). The timestamp and delimiter tokens are
  text: never scored, never dropped (the budget counts visual tokens only).

Passes:
- scoring: [prefix] then, for each unit of the set in time order, its timestamp, delimiters and tokens, [suffix]:
  a short video of the set's units at their real times.
- answer: every unit of the video keeps its timestamp and delimiters (text is never dropped); each unit carries its
  kept tokens (possibly none) in their original order. Two position layouts:
  * "original" (default): every token sits where the full-video sequence puts it: a unit advances the position by
    max(rows, cols) whatever it keeps, so each kept token and all the text have their full-video positions;
  * "compact": a unit advances only by the extent of what it keeps (nothing when it keeps nothing), closing gaps.
  Measured on the planted-needle test (tests/test_qwen3_vl.py: tiny model, 64 units, 6.25% kept, the reference
  layer's attention from the question to the kept needle tokens in the answer pass, mean over heads and rows,
  summed): original 0.999934, compact 0.999934, identical to six decimals (that test's signal ignores positions by
  design). With no measured difference the default is "original": the answer pass then gives every kept token
  exactly what the full-video forward gives it (positions and DeepStack rows), which a test checks against
  transformers' own `Qwen3VLModel` forward.

The reference layer: the paper measured none for Qwen3-VL; defaults.json takes the depth of Qwen2.5-VL's 20 of 28
(26 of Qwen3-VL-8B's 36) and a warning says so. `flexselect layer-scan` measures it on a real checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ...errors import FlexSelectError
from ..base import Progress, Prompt, VisualTokens
from .llava_onevision import read_preprocessor
from .qwen2_5_vl import ENCODE_CHUNK_UNITS, Qwen25VLBackend, patchify
from .shared import LayoutedInput, load_pretrained

if TYPE_CHECKING:  # only for type hints: the models never decode video themselves
    from ...video import Clip

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass
class DeepStackVisualTokens(VisualTokens):
    """Qwen3-VL's visual tokens: the main embeddings plus their DeepStack slices and each unit's timestamp text."""

    deepstack: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [levels, num_tokens, hidden]
    label_seconds: np.ndarray = field(default_factory=lambda: np.zeros(0))  # [num_frames] time in each unit's label


def timestamp_label(seconds: float) -> str:
    return f"<{seconds:.1f} seconds>"


def unit_seconds(timestamps: np.ndarray, temporal_patch: int) -> np.ndarray:
    """Mean time of each unit's frames (the last unit repeats its last frame when short), as Qwen3-VL's processor."""
    ts = np.asarray(timestamps, dtype=np.float64)
    pad = (-len(ts)) % temporal_patch
    ts = np.concatenate([ts, np.repeat(ts[-1:], pad)]).reshape(-1, temporal_patch)
    return (ts[:, 0] + ts[:, -1]) / 2


class Qwen3VLBackend(Qwen25VLBackend):
    """Qwen3-VL / Qwen3-VL-MoE via `Qwen3VLForConditionalGeneration` / `Qwen3VLMoeForConditionalGeneration`."""

    def __init__(
        self, model, tokenizer, preprocessor: dict, family: str = "qwen3_vl", positions: str = "original"
    ) -> None:
        preprocessor = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], **preprocessor}
        super().__init__(model, tokenizer, preprocessor, family, positions)
        ids = tokenizer.convert_tokens_to_ids([VISION_START, VISION_END])
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise FlexSelectError(
                f"the tokenizer has no {VISION_START} / {VISION_END} tokens: not a Qwen3-VL checkpoint"
            )
        self.vision_start, self.vision_end = ids
        self._labels: dict[str, list[int]] = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", positions: str = "original"):
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "qwen3_vl_moe":
            from transformers import Qwen3VLMoeForConditionalGeneration as model_class
        else:
            from transformers import Qwen3VLForConditionalGeneration as model_class
        model = load_pretrained(model_class, path, device, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), read_preprocessor(path), config.model_type, positions)

    # -- frames -> visual tokens --------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, clip: Clip, progress: Progress | None = None) -> DeepStackVisualTokens:
        visual_tower = self.model.model.visual
        frames_per_chunk = ENCODE_CHUNK_UNITS * self.temporal_patch
        n = len(clip.frames)
        chunks, deepstack, grid = [], [], None
        for start in range(0, n, frames_per_chunk):
            pixels = self.pixels(clip.frames[start : start + frames_per_chunk])
            patches, (t, gh, gw) = patchify(pixels, self.patch, self.temporal_patch, self.merge)
            grid_thw = torch.tensor([[t, gh, gw]], device=self.device)
            out = visual_tower(patches.to(self.device, visual_tower.dtype), grid_thw=grid_thw)
            chunks.append(out.pooler_output)
            levels = list(getattr(out, "deepstack_features", None) or ())  # none in Qwen3.5's tower
            tokens = out.pooler_output
            deepstack.append(torch.stack(levels) if levels else tokens.new_zeros((0, *tokens.shape)))
            grid = (gh // self.merge, gw // self.merge)
            if progress:
                progress(min(start + frames_per_chunk, n), n)
        units = math.ceil(n / self.temporal_patch)
        factor = self.patch * self.merge
        return DeepStackVisualTokens(
            embeds=torch.cat(chunks).to(self.model.dtype),
            num_frames=units,
            grid=grid,
            timestamps=np.asarray(clip.timestamps[:: self.temporal_patch], dtype=np.float64),
            time_interval=1.0,  # unused: every unit restarts its positions
            frame_size=(grid[0] * factor, grid[1] * factor),
            source=clip.source,
            frames_per_unit=self.temporal_patch,
            deepstack=torch.cat(deepstack, dim=1).to(self.model.dtype),
            label_seconds=unit_seconds(clip.timestamps, self.temporal_patch),
        )

    # -- prompt and layouts -------------------------------------------------------------------------------------
    def _label_ids(self, seconds: float) -> list[int]:
        label = timestamp_label(seconds)
        if label not in self._labels:  # ids, not tensors: a tensor made under inference_mode cannot enter autograd
            self._labels[label] = self.tokenizer(label, add_special_tokens=False).input_ids
        return self._labels[label]

    def _layout(
        self, visual: DeepStackVisualTokens, units: list[int], tokens: list[torch.Tensor], prompt: Prompt, compact: bool
    ) -> LayoutedInput:
        """[prefix] (<t seconds> <|vision_start|> unit tokens <|vision_end|>)* [suffix]; `tokens[i]` holds global
        token indices of `units[i]` (any subset, in order). Positions as in the module docstring."""
        rows, cols = visual.grid
        ids, positions, columns = [prompt.prefix_ids], [torch.arange(len(prompt.prefix_ids)).expand(3, -1)], []
        at = pos = len(prompt.prefix_ids)  # sequence index and position of the next token

        def add(piece: torch.Tensor, piece_positions: torch.Tensor) -> None:
            nonlocal at
            ids.append(piece)
            positions.append(piece_positions)
            at += len(piece)

        def add_text(piece: list[int] | torch.Tensor) -> None:
            nonlocal pos
            piece = torch.as_tensor(piece, dtype=torch.long)
            add(piece, torch.arange(pos, pos + len(piece)).expand(3, -1))
            pos += len(piece)

        for unit, kept in zip(units, tokens):
            add_text([*self._label_ids(float(visual.label_seconds[unit])), self.vision_start])
            local = kept - unit * visual.tokens_per_frame
            r, c = local // cols, local % cols
            columns.append(torch.arange(at, at + len(kept)))
            add(torch.zeros(len(kept), dtype=torch.long), torch.stack([torch.full_like(r, pos), pos + r, pos + c]))
            if not compact:
                pos += max(rows, cols)
            elif len(kept):
                pos += int(torch.maximum(r, c).max()) + 1
            add_text([self.vision_end])
        add_text(prompt.suffix_ids)

        columns = torch.cat(columns)
        on_device = columns.to(self.device)
        kept_all = torch.cat(tokens).to(self.device)
        embeds = self.embed_ids(torch.cat(ids))
        embeds[on_device] = visual.embeds[kept_all]  # the visual rows were placeholders
        mask = torch.zeros(1, len(embeds), dtype=torch.bool, device=self.device)
        mask[0, on_device] = True
        extra = {"visual_pos_masks": mask, "deepstack_visual_embeds": list(visual.deepstack[:, kept_all].unbind(0))}
        return LayoutedInput(
            embeds[None],
            torch.cat(positions, dim=1)[:, None, :].to(self.device),
            pos,
            columns,
            extra=extra if len(visual.deepstack) else {},
        )

    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        units = sorted(frames)
        if units != list(frames):
            raise FlexSelectError("a frame set must list its frames in time order")
        return self._layout(visual, units, [visual.frame_tokens([u]) for u in units], prompt, compact=False)

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        kept = kept.cpu()
        owner = kept // visual.tokens_per_frame
        tokens = [kept[owner == u] for u in range(visual.num_frames)]
        return self._layout(visual, list(range(visual.num_frames)), tokens, prompt, compact=self.positions == "compact")
