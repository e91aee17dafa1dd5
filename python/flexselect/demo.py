"""The embedded default: a tiny random-weight Qwen2.5-VL and a generated video, built on first use.

It runs the real pipeline end to end on any machine with no download. The weights are random, so the answer is
noise: this checks the wiring, it is not a real answer. `--model /path/to/Qwen2.5-VL-7B-Instruct` is the real use.
"""

from __future__ import annotations

import os
from pathlib import Path

DEMO_QUESTION = "What appears in the red square, and when?"
DEMO_NOTICE = (
    "DEMO: tiny random-weight model on a generated video - this checks the wiring, the answer is noise. "
    "Real use: flexselect answer VIDEO \"QUESTION\" --model /path/to/Qwen2.5-VL-7B-Instruct"
)


def cache_dir() -> Path:
    return Path(os.environ.get("FLEXSELECT_CACHE", Path.home() / ".cache" / "flexselect"))


def demo_root() -> Path:
    # Versioned: a checkpoint cached by an older tiny builder (different tokenizer) must not be reused.
    return cache_dir() / "demo-v2"


def demo_model() -> Path:
    """The demo's tiny checkpoint, built once (benchmarks borrow its tokenizer)."""
    from .tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(demo_root() / "tiny-qwen2_5_vl")


def demo_assets() -> tuple[Path, Path]:
    """(model folder, video file) of the demo, created once in the cache folder."""
    from .video import write_test_video

    root = demo_root()
    model = demo_model()
    video = root / "needle.mp4"
    if not video.is_file():
        partial = root / "needle.partial.mp4"
        write_test_video(partial, num_frames=240, fps=8.0, width=224, height=168, needle_frames=range(150, 158))
        partial.rename(video)
    return model, video
