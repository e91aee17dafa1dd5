"""Model families: detect the family of a checkpoint from its config and load its backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FlexSelectError
from .base import Backend

# config.json `model_type` -> (family in defaults.json, loader)
SUPPORTED = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_vl": "qwen2_vl",
}


def detect_family(path: str | os.PathLike) -> str:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FlexSelectError(
            f"{path} is not a transformers model folder (no config.json); pass the folder of a local checkpoint, "
            "e.g. --model /models/Qwen2.5-VL-7B-Instruct"
        )
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise FlexSelectError(f"{config_file} is not valid JSON ({e}); the checkpoint looks damaged") from None
    if model_type not in SUPPORTED:
        raise FlexSelectError(
            f"model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}"
        )
    return SUPPORTED[model_type]


def load_backend(path: str | os.PathLike, device: str = "auto", dtype: str = "auto",
                 positions: str = "original") -> Backend:
    detect_family(path)  # a clear error for folders that are not a supported checkpoint
    from .qwen2_5_vl import Qwen25VLBackend

    return Qwen25VLBackend.load(path, device=device, dtype=dtype, positions=positions)
