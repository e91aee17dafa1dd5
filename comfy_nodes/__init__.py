"""FlexSelect for ComfyUI: query-aware visual token selection for long-video question answering.

Install: put (or symlink) this folder in ComfyUI/custom_nodes/ and install requirements.txt with ComfyUI's Python
(see README.md). The nodes use ComfyUI's V1 contract, so ComfyUI 0.3.x and newer load them.
"""

import os
import sys


if __name__.rsplit(".", 1)[-1] == "flexselect":  # older ComfyUI imports a pack under its folder's name
    raise ImportError("rename custom_nodes/flexselect to custom_nodes/comfyui-flexselect: the name 'flexselect' "
                      "belongs to the library these nodes import")


def _find_library() -> None:
    """Use an installed flexselect; else the checkout this folder lives in (symlinked into custom_nodes/)."""
    try:
        import flexselect  # noqa: F401

        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.realpath(__file__))
    checkout_lib = os.path.join(os.path.dirname(here), "python")
    if os.path.isfile(os.path.join(checkout_lib, "flexselect", "__init__.py")):
        sys.path.append(checkout_lib)
        return
    raise ImportError(
        "FlexSelect nodes need the flexselect library in ComfyUI's Python: symlink comfy_nodes/ from a flexselect "
        "checkout into custom_nodes/, or run `python -m pip install --no-deps -e /path/to/flexselect` with ComfyUI's "
        "python (then `pip install -r requirements.txt`; torch stays ComfyUI's own)"
    )


_find_library()

from . import comfy_compat  # noqa: E402
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: E402

comfy_compat.register_model_folders()

WEB_DIRECTORY = "./web"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
