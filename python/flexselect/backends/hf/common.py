"""Helpers the transformers family adapters share besides the scoring pass (`shared.py`): the checkpoint's
preprocessor settings, square frames for the vision towers that take them, end-of-answer ids and the prompt.

Kept apart from any family's module, so that no adapter imports another family's adapter for a helper.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ...defaults import prompt_text
from ..base import Progress, Prompt, VisualTokens

if TYPE_CHECKING:  # only for type hints: the models never decode video themselves
    from ...video import Clip


def read_preprocessor(
    path: Path, names: tuple[str, ...] = ("video_preprocessor_config.json", "preprocessor_config.json")
) -> dict:
    """The checkpoint's first preprocessor settings file of `names` (video before image by default), or {}."""
    for name in names:
        if (path / name).is_file():
            return json.loads((path / name).read_text())
    return {}


ENCODE_CHUNK_FRAMES = 16  # frames per vision-tower call: bounds activation memory on long videos


def encode_square_frames(
    backend,
    clip: Clip,
    features: Callable[[torch.Tensor], torch.Tensor],
    progress: Progress | None = None,
    visual_class: type[VisualTokens] = VisualTokens,
):
    """Frames -> visual tokens for the towers that take square frames (LLaVA-OneVision, InternVL): chunks of frames
    resized to `backend.side` and normalised with its mean/std; `features(pixels)` gives the chunk's token rows.
    One unit per frame, 1-D positions (time_interval 1)."""
    n = len(clip.frames)
    chunks = []
    for start in range(0, n, ENCODE_CHUNK_FRAMES):
        pixels = square_pixels(
            clip.frames[start : start + ENCODE_CHUNK_FRAMES], backend.side, backend.mean, backend.std
        )
        chunks.append(features(pixels.to(backend.device)))
        if progress:
            progress(min(start + ENCODE_CHUNK_FRAMES, n), n)
    return visual_class(
        embeds=torch.cat(chunks).to(backend.model.dtype),
        num_frames=n,
        grid=backend.grid,
        timestamps=np.asarray(clip.timestamps, dtype=np.float64),
        time_interval=1.0,
        frame_size=(backend.side, backend.side),
        source=clip.source,
    )


def encode_with_projector_inputs(backend, clip: Clip, progress: Progress | None = None):
    """`backend.encode(clip)`, also keeping what the host's projector reads (`vision_features`, for a Lite ranker):
    taken by a hook on `multi_modal_projector` as the tower runs, so the tower runs once."""
    chunks: list[torch.Tensor] = []
    handle = backend.model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: chunks.append(args[0].reshape(-1, *args[0].shape[-2:]))
    )
    try:
        visual = backend.encode(clip, progress)
    finally:
        handle.remove()
    return dataclasses.replace(visual, vision_features=torch.cat(chunks))


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
