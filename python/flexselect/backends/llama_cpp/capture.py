"""The eval callback that captures the reference layer's post-RoPE queries and keys during `llama_decode` and
stops the graph after them (the backend's module docstring says how the stop works)."""

from __future__ import annotations

import numpy as np

from . import ggml


class Capture:
    """The eval callback's state: which layer to capture, what was captured, whether to stop after it."""

    def __init__(self) -> None:
        self.active = False
        self.abort = True
        self.want_q = False
        self.q_name = self.k_name = b""
        self.q: list[np.ndarray] = []
        self.k: list[np.ndarray] = []
        self.done = False  # both captured in the current micro-batch (reset before every llama_decode)
        self.error: str | None = None

    def start(self, layer: int, abort: bool) -> None:
        self.active, self.abort = True, abort
        self.q_name, self.k_name = f"Qcur-{layer}".encode(), f"Kcur-{layer}".encode()
        self.q, self.k = [], []
        self.done = False
        self.error = None

    def stop(self) -> None:
        self.active = False

    def __call__(self, tensor_p: int, ask: bool, _user: int) -> bool:
        if not self.active:
            return False
        t, lib = ggml.tensor(tensor_p), ggml.library()
        name = t.name
        if self.done and self.abort:
            return ask  # ask for the first node of a later graph split, then stop that split too
        if name != self.q_name and name != self.k_name:
            return False
        if lib.ggml_op_desc(tensor_p) != b"ROPE":
            return False  # the pre-RoPE projection views carry the same name
        if ask:
            return True
        if name == self.q_name and not self.want_q:
            self.q.append(None)
        else:
            shape = (t.ne[2], t.ne[1], t.ne[0])  # tokens, heads, head_dim (ggml's ne is fastest-first)
            if t.type != ggml.GGML_TYPE_F32 or not lib.ggml_is_contiguous(tensor_p):
                self.error = f"{name.decode()} is not a contiguous f32 tensor (type {t.type})"
                return False  # an exception cannot cross the C callback: reported after llama_decode
            out = np.empty(shape, dtype=np.float32)
            lib.ggml_backend_tensor_get(tensor_p, out.ctypes.data, 0, out.nbytes)
            (self.q if name == self.q_name else self.k).append(out)
        if len(self.q) == len(self.k):
            self.done = True
            return not self.abort
        return True
