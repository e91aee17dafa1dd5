"""Model families: detect the family of a checkpoint from its config and load its backend."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import FlexSelectError
from .base import Backend

# config.json `model_type` -> family in defaults.json. Not supported: internvl_chat (the original remote-code
# InternVL checkpoints): use the transformers-native "-hf" conversion.
SUPPORTED = {
    "qwen2_5_vl": "qwen2_5_vl",
    "qwen2_vl": "qwen2_vl",
    "qwen3_vl": "qwen3_vl",
    "qwen3_vl_moe": "qwen3_vl_moe",
    "qwen3_5": "qwen3_5",
    "qwen3_5_moe": "qwen3_5_moe",
    "llava_onevision": "llava_onevision",
    "internvl": "internvl",
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
        raise FlexSelectError(f"model type {model_type!r} is not supported; supported: {', '.join(sorted(SUPPORTED))}")
    return SUPPORTED[model_type]


def load_backend(
    path: str | os.PathLike, device: str = "auto", dtype: str = "auto", positions: str = "original"
) -> Backend:
    """Load a checkpoint folder's backend. `positions` (original / compact) applies to the M-RoPE families only:
    the 1-D RoPE families always give the kept tokens consecutive positions."""
    from .hf.shared import check_checkpoint_files, check_dtype, resolve_device

    family = detect_family(path)  # a clear error for folders that are not a supported checkpoint
    check_checkpoint_files(Path(path))  # missing or truncated weights: one line, not a safetensors traceback
    resolve_device(device)
    check_dtype(dtype)
    if family == "llava_onevision":
        from .hf.llava_onevision import LlavaOnevisionBackend

        return LlavaOnevisionBackend.load(path, device=device, dtype=dtype)
    if family == "internvl":
        from .hf.internvl import InternVLBackend

        return InternVLBackend.load(path, device=device, dtype=dtype)
    if family in ("qwen3_5", "qwen3_5_moe"):
        from .hf.qwen3_5 import Qwen35Backend

        return Qwen35Backend.load(path, device=device, dtype=dtype, positions=positions)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        from .hf.qwen3_vl import Qwen3VLBackend

        return Qwen3VLBackend.load(path, device=device, dtype=dtype, positions=positions)
    from .hf.qwen2_5_vl import Qwen25VLBackend

    return Qwen25VLBackend.load(path, device=device, dtype=dtype, positions=positions)
