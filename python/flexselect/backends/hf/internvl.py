"""InternVL on transformers' native `InternVLForConditionalGeneration` (the `-hf` checkpoints, model_type "internvl").

Frames -> visual tokens as InternVL's video chat does: each frame is one tile, resized to the vision tower's square
input (448) and normalised with the checkpoint's values (ImageNet's by default); the tower's patch grid (32x32) is
pixel-shuffled by the downsample ratio and projected by `mlp1`, giving 16x16 = 256 tokens. A frame's block is
`<img>` + those 256 tokens + `</img>` = 258 tokens (the paper's count): the two delimiters are scored like visual
tokens and may be dropped, so `tokens_per_frame` is the grid plus 2 (see `FramedVisualTokens`).

Layout, as InternVL's video chat writes it: [prefix] "Frame1: " block "\\nFrame2: " block ... [suffix "\\n" question
...]. The "FrameN: " labels are text: never scored, never dropped. Each scoring pass numbers its set's frames 1..n
(a short video of its own); the answer pass labels only the frames that keep at least one token, again 1..m, so it
reads exactly like InternVL's chat over a video of those frames. Positions are 1-D and consecutive (0..N-1).

The labels make the visual columns non-contiguous: the layout records where the blocks' tokens sit
(`LayoutedInput.visual_columns`) and the shared scoring pass picks those columns. Q/K are captured as the attention
uses them, so a language model that normalises Q/K per head (Qwen3, InternVL3.5) is scored correctly too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...defaults import family_defaults
from ...errors import FlexSelectError
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

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class FramedVisualTokens(VisualTokens):
    """Visual tokens whose per-frame block is `<img>`, the grid's tokens (row-major), `</img>`."""

    frame_delimiters = 2  # tokens per frame outside the grid: the first and the last of each block

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1] + self.frame_delimiters


def frame_label(n: int) -> str:
    """Text before the n-th (1-based) frame block: blocks are separated by a newline, as InternVL's chat does."""
    return ("\n" if n > 1 else "") + f"Frame{n}: "


class InternVLBackend(HFBackend):
    """InternVL (see module docstring)."""

    family = "internvl"

    def __init__(self, model, tokenizer, preprocessor: dict) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        size = model.config.vision_config.image_size
        self.side = size[0] if isinstance(size, (list, tuple)) else size
        patch = model.config.vision_config.patch_size
        patches = self.side // (patch[0] if isinstance(patch, (list, tuple)) else patch)
        side = int(patches * model.config.downsample_ratio)
        self.grid = (side, side)
        self.mean = torch.tensor(preprocessor.get("image_mean", IMAGENET_MEAN), dtype=torch.float32)
        self.std = torch.tensor(preprocessor.get("image_std", IMAGENET_STD), dtype=torch.float32)
        self.defaults = family_defaults(self.family)
        start, end = self.defaults.special_tokens["frame_start"], self.defaults.special_tokens["frame_end"]
        delimiters = tokenizer.convert_tokens_to_ids([start, end])
        if any(i is None or i == tokenizer.unk_token_id for i in delimiters):
            raise FlexSelectError(f"the tokenizer has no {start} / {end} tokens: not an InternVL checkpoint")
        self.delimiter_ids = torch.tensor(delimiters, dtype=torch.long)
        self.eos_token_ids = eos_ids(model, tokenizer)
        self._labels: dict[int, list[int]] = {}

    @classmethod
    def load(cls, path: str | Path, device: str = "auto", dtype: str = "auto") -> InternVLBackend:
        from transformers import AutoTokenizer, InternVLForConditionalGeneration

        path = Path(path)
        model = load_pretrained(InternVLForConditionalGeneration, path, device, dtype)
        return cls(model, AutoTokenizer.from_pretrained(path), read_preprocessor(path))

    @torch.inference_mode()
    def encode(self, clip: Clip, progress: Progress | None = None) -> FramedVisualTokens:
        start_emb, end_emb = self.embed_ids(self.delimiter_ids)[:, None]

        def features(pixels: torch.Tensor) -> torch.Tensor:  # <img> tokens </img> per frame
            tokens = self.model.model.get_image_features(pixel_values=pixels).pooler_output
            f = tokens.shape[0]
            blocks = torch.cat(
                [start_emb.expand(f, 1, -1).to(tokens.dtype), tokens, end_emb.expand(f, 1, -1).to(tokens.dtype)], dim=1
            )
            return blocks.reshape(-1, blocks.shape[-1])

        return encode_square_frames(self, clip, features, progress, FramedVisualTokens)

    # -- vision features for a Lite ranker (it reads the tower before the host's projector; the tower runs once) -
    @property
    def vision_feature_dim(self) -> int:
        """Width of the features the host's projector reads (pixel-shuffled InternViT patches)."""
        vision = self.model.config.vision_config
        return vision.hidden_size * int(1 / self.model.config.downsample_ratio) ** 2

    def encode_with_vision_features(self, clip: Clip, progress: Progress | None = None) -> FramedVisualTokens:
        """`encode`, also keeping the input of the host's projector: [frames, grid tokens, vision_feature_dim]."""
        return encode_with_projector_inputs(self, clip, progress)

    def prompt(self, question: str) -> Prompt:
        return template_prompt(self.tokenizer, self.family, question)

    def _label_ids(self, n: int) -> torch.Tensor:
        if n not in self._labels:  # ids, not tensors: a tensor made under inference_mode cannot enter autograd later
            self._labels[n] = self.tokenizer(frame_label(n), add_special_tokens=False).input_ids
        return torch.tensor(self._labels[n], dtype=torch.long)

    def _layout(self, visual: VisualTokens, blocks: list[torch.Tensor], prompt: Prompt) -> LayoutedInput:
        """[prefix] label_1 block_1 label_2 block_2 ... [suffix]; blocks hold global token indices."""
        pieces = [self.embed_ids(prompt.prefix_ids)]
        columns = []
        at = len(prompt.prefix_ids)
        for n, block in enumerate(blocks, start=1):
            label = self._label_ids(n)
            pieces += [self.embed_ids(label), visual.embeds[block.to(self.device)]]
            at += len(label)
            columns.append(torch.arange(at, at + len(block)))
            at += len(block)
        pieces.append(self.embed_ids(prompt.suffix_ids))
        embeds = torch.cat(pieces)
        length = embeds.shape[0]
        return LayoutedInput(embeds[None], consecutive_positions(length, self.device), length, torch.cat(columns))

    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        blocks = list(visual.frame_tokens(frames).view(len(frames), visual.tokens_per_frame))
        return self._layout(visual, blocks, prompt)

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        kept = kept.cpu()
        counts = torch.unique_consecutive(kept // visual.tokens_per_frame, return_counts=True)[1]
        return self._layout(visual, list(torch.split(kept, counts.tolist())), prompt)
