"""The library's messages are written for its command line ("use a smaller --budget"); on a node they name the
node's inputs instead."""

from __future__ import annotations

import re

from flexselect.errors import FlexSelectError

# CLI flag -> what a node user changes instead
_FLAGS = {
    "--budget": "budget",
    "--set-frames": "set_frames",
    "--frames": "frames",
    "--max-new-tokens": "max_new_tokens",
    "--n-ctx": "context",
    "--layer": "layer",
    "--max-side": "max_side",
}
_REPLACEMENTS = [
    (re.compile(r"--device cuda was asked for"), "device 'cuda' was picked"),
    (re.compile(r"use --device cpu"), "pick device 'cpu'"),
    (re.compile(r"pass --ranker PATH"), "connect a Load Lite Ranker (FlexSelect) node"),
    (re.compile(r"pass --mmproj \S+"), "pick its mmproj file"),
    (
        re.compile(r"the language model GGUF as --gguf and this file as --mmproj"),
        "the language model GGUF as model and this file as mmproj",
    ),
    (
        re.compile(r"; pass the folder of a local checkpoint, e\.g\. --model \S+"),
        "; pick a checkpoint folder in models/LLM",
    ),
    (re.compile(r"\((\d+) frames x (\d+)\)"), r"(\1 temporal units x \2 tokens)"),
    (re.compile(r"--(?:model|gguf)\b"), "model"),
    (re.compile(r"--mmproj\b"), "mmproj"),
]


def node_wording(message: str) -> str:
    """A library message reworded for the node surface: no CLI flags, one line, no trailing whitespace."""
    for pattern, repl in _REPLACEMENTS:
        message = pattern.sub(repl, message)
    for flag, name in sorted(_FLAGS.items(), key=lambda kv: -len(kv[0])):
        message = re.sub(re.escape(flag) + r"(?![\w-])", f"`{name}`", message)
    return " ".join(message.split())


def for_nodes(error: FlexSelectError) -> FlexSelectError:
    return FlexSelectError(node_wording(str(error)))
