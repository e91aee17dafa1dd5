"""Defaults shared by every path (Python, GGUF export, C++ runtime): they live in `defaults.json` beside this file."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from importlib import resources

from .errors import FlexSelectError

log = logging.getLogger("flexselect")

DEFAULTS_FILE = resources.files("flexselect") / "defaults.json"
_RAW = json.loads(DEFAULTS_FILE.read_text())

SET_FRAMES: int = _RAW["set_frames"]
AGGREGATE: str = _RAW["aggregate"]


@dataclass(frozen=True)
class FamilyDefaults:
    family: str
    num_layers: int  # depth of the model the paper tuned `reference_layer` on
    reference_layer: int  # 0-based
    budget: int  # kept visual tokens for the whole video
    fps: float
    max_frames: int
    max_side: int
    prompt_prefix: str = ""  # chat template up to the video (families whose template all paths share)
    prompt_suffix: str = "{question}"  # everything after the video; {question} is replaced
    reference_layer_measured: bool = True  # False: taken at Qwen2.5-VL's relative depth, never measured


def family_defaults(family: str) -> FamilyDefaults:
    try:
        return FamilyDefaults(family=family, **_RAW["families"][family])
    except KeyError:
        known = ", ".join(sorted(_RAW["families"]))
        raise FlexSelectError(f"unknown model family {family!r}; supported families: {known}") from None


@functools.cache  # pure, and so the warning below is logged once per model shape, not once per question
def reference_layer_for(family: str, num_layers: int, candidates: tuple[int, ...] | None = None) -> int:
    """The paper's reference layer, or the layer at the same relative depth for a model of another depth (with a
    warning, as for a family whose layer was never measured). `candidates`: the layers that can be scored; when
    not all can (a hybrid model's full-attention layers), the candidate nearest that depth, the shallower on a tie."""
    d = family_defaults(family)
    depth = d.reference_layer * num_layers / d.num_layers
    layer = d.reference_layer
    if num_layers != d.num_layers:
        layer = min(num_layers - 1, max(1, round(depth)))
    hybrid = candidates is not None and len(candidates) < num_layers
    if hybrid and layer not in candidates:
        layer = min(candidates, key=lambda c: (abs(c - depth), c))
    if not d.reference_layer_measured:
        log.warning(
            "%s: reference layer %d of %d was never measured (the paper covers no such model): it is the %s "
            "Qwen2.5-VL's relative depth (20 of 28). Run `flexselect layer-scan --model ...` to measure the best one "
            "and pass it as --layer.", family, layer, num_layers,
            "full-attention layer nearest" if hybrid else "layer at",
        )
    elif num_layers != d.num_layers:
        log.warning(
            "%s: the paper's reference layer %d is for %d layers; this model has %d, using layer %d (same relative "
            "depth). Run `flexselect layer-scan` to measure the best one.",
            family, d.reference_layer, d.num_layers, num_layers, layer,
        )
    return layer
