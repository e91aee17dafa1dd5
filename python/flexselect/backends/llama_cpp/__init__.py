"""GGUFs on llama.cpp through llama-cpp-python: the backend (`backend.py`), the eval callback that captures the
reference layer's queries and keys (`capture.py`) and the ctypes layer over ggml it reads tensors with (`ggml.py`)."""

from .backend import LlamaCppBackend, LlamaSetIndex

__all__ = ["LlamaCppBackend", "LlamaSetIndex"]
