"""Defaults and family rules shared by every path (Python, GGUF export, C++ runtime): they live in `defaults.json`
beside this file. Runtime-free: no torch, no tokenizer, so every backend (and the C++ build) reads the same rules."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from importlib import resources

from .errors import FlexSelectError

log = logging.getLogger("flexselect")

DEFAULTS_FILE = resources.files("flexselect") / "defaults.json"
_RAW = json.loads(DEFAULTS_FILE.read_text())

SET_FRAMES: int = _RAW["set_frames"]
AGGREGATE: str = _RAW["aggregate"]
QUESTION = "{question}"  # where the question goes in a family's `prompt_suffix`


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
    prompt_suffix: str = QUESTION  # everything after the video; the first {question} is replaced
    tokens_per_second: float | None = None  # M-RoPE temporal positions per second; None: one step per frame unit
    special_tokens: dict[str, str] = field(default_factory=dict, hash=False)  # e.g. InternVL's frame delimiters
    reference_layer_measured: bool = True  # False: taken at Qwen2.5-VL's relative depth, never measured


def family_defaults(family: str) -> FamilyDefaults:
    try:
        return FamilyDefaults(family=family, **_RAW["families"][family])
    except KeyError:
        known = ", ".join(sorted(_RAW["families"]))
        raise FlexSelectError(f"unknown model family {family!r}; supported families: {known}") from None


def prompt_text(family: str, question: str) -> tuple[str, str]:
    """The family's chat template around the video: (text before the video, text after it with the question).

    Every runtime builds its prompt from this (the C++ runtime from the same JSON, replacing the same first
    `{question}`), so a question is tokenized identically everywhere.
    """
    d = family_defaults(family)
    return d.prompt_prefix, d.prompt_suffix.replace(QUESTION, question, 1)


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
            "and pass it as --layer.",
            family,
            layer,
            num_layers,
            "full-attention layer nearest" if hybrid else "layer at",
        )
    elif num_layers != d.num_layers:
        log.warning(
            "%s: the paper's reference layer %d is for %d layers; this model has %d, using layer %d (same relative "
            "depth). Run `flexselect layer-scan` to measure the best one.",
            family,
            d.reference_layer,
            d.num_layers,
            num_layers,
            layer,
        )
    return layer
