"""FlexSelect-Lite: a small ranker trained to reproduce the reference layer's token ranking (see ranker.py).

ranker = load_ranker("runs/lite", backend)     # bundle folder, its manifest.json, or a .onnx file
scores = ranker.score(visual, frames, prompt)  # same order as visual.frame_tokens(frames)
"""

from .bundle import load_ranker, save_bundle
from .cli import add_lite_commands
from .ranker import LiteRanker

__all__ = ["LiteRanker", "add_lite_commands", "load_ranker", "save_bundle"]
