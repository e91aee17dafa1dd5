"""Qwen2.5-VL (and Qwen2-VL) on transformers: frames -> visual tokens, the prompt around them, M-RoPE positions.

Frames are paired into temporal units (temporal patch 2); each unit becomes (H/28) x (W/28) visual tokens, placed
with the M-RoPE layout of `flexselect.mrope` (the one the models were trained with, shared with llama.cpp).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...defaults import family_defaults
from ...errors import FlexSelectError
from ...mrope import (
    PIXEL_FACTOR,
    compact_positions,
    frame_size,
    full_video_extent,
    layout_positions,
    time_interval,
    video_positions,
)
from ..base import Progress, Prompt, VisualTokens
from .common import eos_ids, read_preprocessor, template_prompt
from .shared import HFBackend, LayoutedInput, load_pretrained

if TYPE_CHECKING:  # only for type hints: the models never decode video themselves
    from ...video import Clip

log = logging.getLogger("flexselect")

ENCODE_CHUNK_UNITS = 16  # units per vision-tower call: bounds activation memory on long videos


def patchify(frames: torch.Tensor, patch: int, temporal_patch: int, merge: int) -> tuple[torch.Tensor, tuple]:
    """Normalised frames [N, C, H, W] -> Qwen vision patches [units*gh*gw, C*tp*p*p] and the (t, gh, gw) grid.

    The order (2x2 merge blocks contiguous) is the one Qwen's image processor produces; an odd last frame is
    repeated to fill the last temporal patch, as the processor does.
    """
    if frames.shape[0] % temporal_patch:
        pad = temporal_patch - frames.shape[0] % temporal_patch
        frames = torch.cat([frames, frames[-1:].expand(pad, -1, -1, -1)])
    n, c, h, w = frames.shape
    t, gh, gw = n // temporal_patch, h // patch, w // patch
    x = frames.reshape(t, temporal_patch, c, gh // merge, merge, patch, gw // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(t * gh * gw, c * temporal_patch * patch * patch), (t, gh, gw)


class Qwen25VLBackend(HFBackend):
    """Qwen2.5-VL / Qwen2-VL via `Qwen2_5_VLForConditionalGeneration` / `Qwen2VLForConditionalGeneration`."""

    def __init__(
        self, model, tokenizer, preprocessor: dict, family: str = "qwen2_5_vl", positions: str = "original"
    ) -> None:
        if positions not in ("original", "compact"):
            raise FlexSelectError(f"positions must be 'original' or 'compact', got {positions!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.family = family
        self.positions = positions
        vision = model.config.vision_config
        self.patch = vision.patch_size
        self.temporal_patch = vision.temporal_patch_size
        self.merge = vision.spatial_merge_size
        self.defaults = family_defaults(family)
        # The family's rule (defaults.json), shared with the llama.cpp backend and the C++ runtime, whose GGUFs do not
        # carry it. Qwen2-VL has none: its temporal position steps by 1 per unit, whatever the fps.
        self.tokens_per_second = self.defaults.tokens_per_second
        if getattr(vision, "tokens_per_second", None) not in (None, self.tokens_per_second):
            log.warning(
                "%s: the checkpoint's tokens_per_second %s differs from the family's %s in defaults.json; "
                "using defaults.json's, as every runtime does",
                family,
                vision.tokens_per_second,
                self.tokens_per_second,
            )
        self.mean = torch.tensor(preprocessor.get("image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.std = torch.tensor(preprocessor.get("image_std", [0.26862954, 0.26130258, 0.27577711]))
        self.eos_token_ids = eos_ids(model, tokenizer)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto", positions: str = "original"):
        from transformers import AutoConfig, AutoTokenizer

        path = Path(path)
        config = AutoConfig.from_pretrained(path)
        if config.model_type == "qwen2_5_vl":
            from transformers import Qwen2_5_VLForConditionalGeneration as model_class
        else:
            from transformers import Qwen2VLForConditionalGeneration as model_class
        model = load_pretrained(model_class, path, device, dtype)
        preprocessor = read_preprocessor(path, ("preprocessor_config.json",))
        return cls(model, AutoTokenizer.from_pretrained(path), preprocessor, config.model_type, positions)

    # -- frames -> visual tokens --------------------------------------------------------------------------------
    def pixels(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised float [N, 3, H', W'] at a size the vision tower takes."""
        x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
        size = frame_size(x.shape[2], x.shape[3], self.patch * self.merge)
        if size != tuple(x.shape[2:]):
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
        return (x / 255.0 - self.mean[:, None, None]) / self.std[:, None, None]

    @torch.inference_mode()
    def encode(self, clip: Clip, progress: Progress | None = None) -> VisualTokens:
        visual_tower = self.model.model.visual
        frames_per_chunk = ENCODE_CHUNK_UNITS * self.temporal_patch
        n = len(clip.frames)
        chunks, grid = [], None
        for start in range(0, n, frames_per_chunk):
            pixels = self.pixels(clip.frames[start : start + frames_per_chunk])
            patches, (t, gh, gw) = patchify(pixels, self.patch, self.temporal_patch, self.merge)
            grid_thw = torch.tensor([[t, gh, gw]], device=self.device)
            out = visual_tower(patches.to(self.device, visual_tower.dtype), grid_thw=grid_thw)
            chunks.append(out.pooler_output)
            grid = (gh // self.merge, gw // self.merge)
            if progress:
                progress(min(start + frames_per_chunk, n), n)
        units = math.ceil(n / self.temporal_patch)
        return VisualTokens(
            embeds=torch.cat(chunks).to(self.model.dtype),
            num_frames=units,
            grid=grid,
            timestamps=np.asarray(clip.timestamps[:: self.temporal_patch], dtype=np.float64),
            time_interval=time_interval(self.tokens_per_second, self.temporal_patch, clip.sample_fps),
            frame_size=(grid[0] * PIXEL_FACTOR, grid[1] * PIXEL_FACTOR),
            source=clip.source,
            frames_per_unit=self.temporal_patch,
        )

    # -- vision features for a Lite ranker (it reads the ViT before the host's merger; the ViT runs once) --------
    @property
    def vision_feature_dim(self) -> int:
        """Width of one visual token's pre-merger features: its merge group of ViT patches, concatenated."""
        return self.model.config.vision_config.hidden_size * self.merge * self.merge

    def encode_with_vision_features(self, clip: Clip, progress: Progress | None = None) -> VisualTokens:
        """`encode`, also keeping what the merger reads: the ViT's last hidden states, one merge group per visual
        token, in token order (the tower works in window order; that permutation is undone here)."""
        tower = self.model.model.visual
        unit = self.merge * self.merge
        chunks: list[torch.Tensor] = []

        def keep(module, args, kwargs, output) -> None:
            hidden = output.last_hidden_state.view(-1, unit * output.last_hidden_state.shape[-1])
            if hasattr(module, "window_size"):  # Qwen2.5-VL's windowed tower (Qwen2-VL's keeps token order)
                from transformers.vision_utils import get_vision_window_index

                window_index, _ = get_vision_window_index(
                    kwargs["grid_thw"],
                    spatial_merge_size=module.spatial_merge_size,
                    window_size=module.window_size,
                    patch_size=module.patch_size,
                )
                hidden = hidden[torch.argsort(window_index)]
            chunks.append(hidden)

        handle = tower.register_forward_hook(keep, with_kwargs=True)
        try:
            visual = self.encode(clip, progress)
        finally:
            handle.remove()
        features = torch.cat(chunks).view(visual.num_frames, visual.tokens_per_frame, -1)
        return dataclasses.replace(visual, vision_features=features)

    # -- prompt and layouts -------------------------------------------------------------------------------------
    def prompt(self, question: str) -> Prompt:
        return template_prompt(self.tokenizer, self.family, question)

    def _layout(self, visual_embeds, offsets, extent, prompt: Prompt) -> LayoutedInput:
        embeds = torch.cat([self.embed_ids(prompt.prefix_ids), visual_embeds, self.embed_ids(prompt.suffix_ids)])
        positions, next_position = layout_positions(len(prompt.prefix_ids), offsets, extent, len(prompt.suffix_ids))
        start = len(prompt.prefix_ids)
        columns = torch.arange(start, start + len(visual_embeds))
        return LayoutedInput(embeds[None], positions[:, None, :].to(self.device), next_position, columns)

    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        # The set is scored as a short video of its own frames (as in the paper's code).
        offsets = video_positions(len(frames), visual.grid, visual.time_interval)
        extent = int(offsets.max())
        return self._layout(visual.embeds[visual.frame_tokens(frames).to(self.device)], offsets, extent, prompt)

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        offsets = self.kept_positions(visual, kept)
        extent = full_video_extent(visual) if self.positions == "original" else int(offsets.max())
        return self._layout(visual.embeds[kept.to(self.device)], offsets, extent, prompt)

    def kept_positions(self, visual: VisualTokens, kept: torch.Tensor) -> torch.Tensor:
        """Offsets of the kept tokens: their original full-video positions, or re-gridded compactly."""
        offsets = video_positions(visual.num_frames, visual.grid, visual.time_interval)[:, kept]
        return offsets if self.positions == "original" else compact_positions(offsets)
