"""FlexSelect for ComfyUI: query-aware visual token selection for long-video question answering.

The repository is the node pack: ComfyUI-Manager clones it and the registry ships it into custom_nodes/, where the
root `__init__.py` loads this package. V3 nodes (`comfy_api.latest`), which ComfyUI 0.3.75 and newer load.
"""

import os
import sys


def _use_bundled_library() -> None:
    """The pack brings the flexselect library with it (python/flexselect beside this folder), first on sys.path, so
    the nodes run the library release they ship with even if another flexselect is installed."""
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "python")
    if os.path.isfile(os.path.join(lib, "flexselect", "__init__.py")) and lib not in sys.path:
        sys.path.insert(0, lib)


_use_bundled_library()

from . import comfy_compat  # noqa: E402  (after the library's path is set up)
from .nodes import FlexSelectExtension  # noqa: E402

comfy_compat.register_model_folders()


async def comfy_entrypoint() -> FlexSelectExtension:
    return FlexSelectExtension()


__all__ = ["comfy_entrypoint"]
