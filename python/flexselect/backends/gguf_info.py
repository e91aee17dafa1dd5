"""Reading a GGUF's metadata (architecture, depth, widths, tensor names): what the llama.cpp backend checks before
loading and what the export step checks after writing. Needs the `gguf` package (extra `gguf`)."""

from __future__ import annotations

import os

from ..errors import FlexSelectError


def _field(reader, key: str):
    """A scalar or string metadata value of a GGUF (None when absent)."""
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value.tolist()[0] if hasattr(value, "tolist") else value


def inspect_gguf(path: str | os.PathLike) -> dict:
    """Read back what matters of a written GGUF: architecture, block count, widths, tensor names."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on truncated or foreign files
        raise FlexSelectError(f"{path} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    info = {"path": str(path), "architecture": arch, "tensors": [t.name for t in reader.tensors]}
    if arch == "clip":
        info["projector_type"] = _field(reader, "clip.projector_type") or _field(reader, "clip.vision.projector_type")
        info["block_count"] = _field(reader, "clip.vision.block_count")
        info["projection_dim"] = _field(reader, "clip.vision.projection_dim")
        info["has_vision"] = bool(_field(reader, "clip.has_vision_encoder"))
        deepstack = reader.fields.get("clip.vision.is_deepstack_layers")  # Qwen3-VL: one flag per vision block
        info["deepstack_layers"] = sum(bool(deepstack.parts[i][0]) for i in deepstack.data) if deepstack else 0
    else:
        info["block_count"] = _field(reader, f"{arch}.block_count")
        info["embedding_length"] = _field(reader, f"{arch}.embedding_length")
        info["deepstack_layers"] = _field(reader, f"{arch}.n_deepstack_layers") or 0  # Qwen3-VL
        recurrent = reader.fields.get(f"{arch}.attention.recurrent_layers")  # Qwen3.5: linear-attention layers
        if recurrent is not None:
            info["recurrent_layers"] = [i for i, j in enumerate(recurrent.data) if bool(recurrent.parts[j][0])]
        info["vocab_size"] = (
            len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
        )
    return info
