"""Helpers the transformers family adapters share besides the scoring pass (`shared.py`): the checkpoint's
preprocessor settings, square frames for the vision towers that take them, end-of-answer ids and the prompt.

Kept apart from any family's module, so that no adapter imports another family's adapter for a helper.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ...defaults import prompt_text
from ..base import Prompt


def read_preprocessor(path: Path, names: tuple[str, ...] = ("video_preprocessor_config.json",
                                                           "preprocessor_config.json")) -> dict:
    """The checkpoint's first preprocessor settings file of `names` (video before image by default), or {}."""
    for name in names:
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    return {}


def square_pixels(frames: np.ndarray, side: int, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> normalised float [N, 3, side, side] (resized to the tower's square input)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float()
    if tuple(x.shape[2:]) != (side, side):
        x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False).clamp(0, 255)
    return (x / 255.0 - mean[:, None, None]) / std[:, None, None]


def eos_ids(model, tokenizer) -> set[int]:
    """Tokens that end an answer: the generation config's eos ids and the tokenizer's."""
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if isinstance(eos, list) else [eos]
    return {i for i in [*eos, tokenizer.eos_token_id] if i is not None}


def template_prompt(tokenizer, family: str, question: str) -> Prompt:
    """The family's chat template (`defaults.prompt_text`) around the question, tokenized without added specials."""
    def ids(text: str) -> torch.Tensor:
        return torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)

    prefix, suffix = prompt_text(family, question)
    return Prompt(ids(prefix), ids(suffix), question)


def consecutive_positions(length: int, device: torch.device) -> torch.Tensor:
    """1-D RoPE positions 0..length-1 as [1, length]."""
    return torch.arange(length, device=device)[None]
