"""LLaVA-Video / LLaVA-OneVision on transformers (`LlavaOnevisionForConditionalGeneration`).

Frames -> visual tokens, as transformers' own video path (`get_video_features`) does: each frame is resized to the
SigLIP tower's square input (384 for the released checkpoints), encoded, projected, then 2x2 bilinear-pooled, so a
27x27 patch grid becomes 14x14 = 196 tokens per frame. transformers then appends ONE `image_newline` embedding after
the whole video; the original LLaVA-Video code (and the paper's 210 tokens per frame) instead ends every pooled row
with a newline, 14 per frame. We follow transformers: a frame is exactly its 196 pooled tokens (grid 14x14), and the
single newline sits between the video and the question in every pass. It is neither scored nor dropped (there is
only one), so the per-frame budget unit is 196 and the default budget of 6720 tokens keeps ~34 frames' worth
instead of the paper's 32.

Layout: [prompt prefix] [video tokens] [newline] [question suffix], LLaVA-Video's Qwen2 chat format from
defaults.json. Positions are 1-D: each scoring pass and the answer pass number their sequence 0..N-1, so kept tokens
simply sit at consecutive positions.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...defaults import family_defaults
from ..base import Progress, Prompt, VisualTokens
from .common import (
    consecutive_positions,
    encode_square_frames,
    encode_with_projector_inputs,
    eos_ids,
    read_preprocessor,
    template_prompt,
)
from .shared import HFBackend, LayoutedInput, load_pretrained

if TYPE_CHECKING:  # only for type hints: the models never decode video themselves
    from ...video import Clip

SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)


class LlavaOnevisionBackend(HFBackend):
    """LLaVA-Video / LLaVA-OneVision (see module docstring)."""

    family = "llava_onevision"

    def __init__(self, model, tokenizer, preprocessor: dict) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        vision = model.config.vision_config
        self.side = vision.image_size
        pooled = math.ceil(vision.image_size // vision.patch_size / 2)  # transformers' apply_pooling
        self.grid = (pooled, pooled)
        self.mean = torch.tensor(preprocessor.get("image_mean", SIGLIP_MEAN), dtype=torch.float32)
        self.std = torch.tensor(preprocessor.get("image_std", SIGLIP_STD), dtype=torch.float32)
        self.eos_token_ids = eos_ids(model, tokenizer)
        self.defaults = family_defaults(self.family)

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto") -> LlavaOnevisionBackend:
        from transformers import AutoTokenizer, LlavaOnevisionForConditionalGeneration

        path = Path(path)
        model = load_pretrained(LlavaOnevisionForConditionalGeneration, path, device, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), read_preprocessor(path))

    @torch.inference_mode()
    def encode(self, clip: Clip, progress: Progress | None = None) -> VisualTokens:
        def features(pixels: torch.Tensor) -> torch.Tensor:
            out = self.model.model.get_video_features(pixel_values_videos=pixels[None].to(self.model.dtype))
            return out.pooler_output[0, :-1]  # the trailing newline is added once, by the layout

        return encode_square_frames(self, clip, features, progress)

    # -- vision features for a Lite ranker (it reads the tower before the host's projector; the tower runs once) -
    @property
    def vision_feature_dim(self) -> int:
        """Width of the features the host's projector reads (the selected SigLIP layer's patches)."""
        layer = self.model.config.vision_feature_layer
        return self.model.config.vision_config.hidden_size * (1 if isinstance(layer, int) else len(layer))

    def encode_with_vision_features(self, clip: Clip, progress: Progress | None = None) -> VisualTokens:
        """`encode`, also keeping the input of the host's projector per frame: [frames, patches, vision_feature_dim]."""
        return encode_with_projector_inputs(self, clip, progress)

    def prompt(self, question: str) -> Prompt:
        return template_prompt(self.tokenizer, self.family, question)

    def _layout(self, visual_embeds: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        newline = self.model.model.image_newline.to(visual_embeds.dtype)[None]
        embeds = torch.cat(
            [self.embed_ids(prompt.prefix_ids), visual_embeds, newline, self.embed_ids(prompt.suffix_ids)]
        )
        start = len(prompt.prefix_ids)
        columns = torch.arange(start, start + len(visual_embeds))
        return LayoutedInput(
            embeds[None], consecutive_positions(embeds.shape[0], self.device), embeds.shape[0], columns
        )

    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        return self._layout(visual.embeds[visual.frame_tokens(frames).to(self.device)], prompt)

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        return self._layout(visual.embeds[kept.to(self.device)], prompt)
