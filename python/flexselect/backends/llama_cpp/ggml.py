"""The ctypes layer over ggml that llama-cpp-python does not declare: `struct ggml_tensor`'s head and the libggml-base
functions the eval callback reads tensors with.

The struct is written by hand from ggml.h (vendored ggml 0.25.3), so it is checked once, when the library is loaded:
a tensor made by ggml itself must read back through it with the type, shape, strides and name that ggml's own
functions report. A llama-cpp-python whose ggml laid the struct out differently fails there with one clear line,
instead of the callback reading names and shapes at the wrong offsets.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from ...errors import FlexSelectError

GGML_MAX_DIMS, GGML_MAX_SRC, GGML_MAX_OP_PARAMS, GGML_MAX_NAME = 4, 10, 64, 64
GGML_TYPE_F32, GGML_TYPE_F16 = 0, 1


class GGMLTensor(ctypes.Structure):
    """The head of `struct ggml_tensor`, enough to read shape, type and name."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
    ]


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


_SIGNATURES = {  # name: (argtypes, restype)
    "ggml_backend_tensor_get": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
    "ggml_op_desc": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
    "ggml_is_contiguous": ([ctypes.c_void_p], ctypes.c_bool),
    # for the layout check
    "ggml_init": ([_InitParams], ctypes.c_void_p),
    "ggml_free": ([ctypes.c_void_p], None),
    "ggml_new_tensor_3d": ([ctypes.c_void_p, ctypes.c_int, *[ctypes.c_int64] * 3], ctypes.c_void_p),
    "ggml_set_name": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    "ggml_get_name": ([ctypes.c_void_p], ctypes.c_char_p),
    "ggml_nelements": ([ctypes.c_void_p], ctypes.c_int64),
}

_LIB = None


def tensor(ptr: int) -> GGMLTensor:
    """The tensor at `ptr` (from an eval callback) read through the checked struct."""
    return ctypes.cast(ptr, ctypes.POINTER(GGMLTensor)).contents


def library() -> ctypes.CDLL:
    """libggml-base from the folder llama-cpp-python loads libllama from (its lib folder, or LLAMA_CPP_LIB_PATH for
    a llama.cpp built elsewhere, e.g. GGML_NATIVE=ON), its functions declared and the struct checked (once)."""
    global _LIB
    if _LIB is None:
        import llama_cpp

        lib_dir = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(llama_cpp.__file__).parent / "lib")
        candidates = sorted(lib_dir.glob("libggml-base.*")) or sorted(lib_dir.glob("ggml-base.*"))
        if not candidates:
            raise FlexSelectError(f"libggml-base not found in {lib_dir}; reinstall llama-cpp-python==0.3.36")
        lib = ctypes.CDLL(str(candidates[0]))
        for name, (argtypes, restype) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, restype
        check_layout(lib)
        _LIB = lib
    return _LIB


def check_layout(lib: ctypes.CDLL, struct: type[ctypes.Structure] = GGMLTensor) -> None:
    """A tensor that ggml makes and names must read back through `struct` as ggml's own accessors report it."""
    ctx = lib.ggml_init(_InitParams(1 << 16, None, True))  # no_alloc: the tensor's header only
    if not ctx:
        raise FlexSelectError("ggml_init failed while checking the ggml_tensor layout")
    try:
        ptr = lib.ggml_new_tensor_3d(ctx, GGML_TYPE_F16, 5, 3, 2)
        lib.ggml_set_name(ptr, b"flexselect-layout-check")
        t = ctypes.cast(ptr, ctypes.POINTER(struct)).contents
        read = (t.type, tuple(t.ne), t.nb[0] * lib.ggml_nelements(ptr), t.name)
        want = (GGML_TYPE_F16, (5, 3, 2, 1), lib.ggml_nbytes(ptr), lib.ggml_get_name(ptr))
    finally:
        lib.ggml_free(ctx)
    if read != want:
        raise FlexSelectError(
            f"this llama-cpp-python's ggml lays out struct ggml_tensor differently from flexselect's declaration "
            f"(read {read}, ggml says {want}); install llama-cpp-python==0.3.36"
        )
