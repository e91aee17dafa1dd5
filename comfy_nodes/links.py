"""The values that travel on FlexSelect's links, and their link types.

ComfyUI caches node outputs and hands the same object to every node linked to it, so these are never changed after
they are made. Each has a short `repr`: ComfyUI puts `str()` of a node's inputs into the history of a failed run,
and a clip's frame array would otherwise fill kilobytes of it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from comfy_api.latest import io

ClipType = io.Custom("FLEXSELECT_CLIP")
ModelType = io.Custom("FLEXSELECT_MODEL")
RankerType = io.Custom("FLEXSELECT_RANKER")
SelectionType = io.Custom("FLEXSELECT_SELECTION")


@dataclass(frozen=True, repr=False)
class ClipValue:
    """FLEXSELECT_CLIP: the sampled frames (a `flexselect.video.Clip`: uint8 frames and their timestamps)."""

    clip: Any

    def __repr__(self) -> str:
        n, h, w = self.clip.frames.shape[:3]
        ts = self.clip.timestamps
        return (
            f"<FlexSelect clip: {n} frames {w}x{h}, {float(ts[0]):.2f}-{float(ts[-1]):.2f} s of "
            f"{os.path.basename(str(self.clip.source))}>"
        )

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class ModelHandle:
    """FLEXSELECT_MODEL: what to load. Loaded on first use, shared through the model cache, reloaded after a free."""

    key: tuple  # load arguments + the checkpoint's fingerprint: a replaced checkpoint is a new model
    label: str
    load_args: tuple  # ((name, value), ...) for FlexSelect.load

    def __repr__(self) -> str:
        return f"<FlexSelect model: {self.label}>"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class RankerHandle:
    """FLEXSELECT_RANKER: a Lite ranker, loaded against a model's backend when FlexSelect first uses it."""

    path: str
    label: str

    def __repr__(self) -> str:
        return f"<FlexSelect Lite ranker: {self.label}>"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class SelectionResult:
    """FLEXSELECT_SELECTION: everything Answer needs, plus what a user may want to inspect."""

    model_key: tuple
    question: str
    visual: Any  # VisualTokens
    prompt: Any  # Prompt
    selection: Any  # pipeline.Selection (kept, scores, sets, budget, layer, selector, seconds)
    kept_per_unit: np.ndarray  # [temporal units] kept tokens per unit
    timing: dict = field(default_factory=dict)

    @property
    def kept(self):
        return self.selection.kept

    def __repr__(self) -> str:
        return (
            f"<FlexSelect selection: {len(self.selection.kept)} of {self.visual.num_tokens} tokens for "
            f"{self.question[:60]!r}>"
        )

    __str__ = __repr__
