"""Plain helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import numpy as np

from flexselect.video import Clip


def random_clip(n_frames: int = 8, height: int = 56, width: int = 84, fps: float = 2.0, seed: int = 0) -> Clip:
    """Random frames sampled at `fps` from the start: a `Clip` as `load_clip` returns one, without a video file."""
    frames = np.random.default_rng(seed).integers(0, 256, size=(n_frames, height, width, 3), dtype=np.uint8)
    return Clip.from_frames(frames, fps, source="random")
