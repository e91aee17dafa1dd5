"""ComfyUI loads this repository as a node pack (ComfyUI-Manager clones it into custom_nodes/, the registry unpacks
it there): the nodes are in comfy_nodes/, the library they run in python/flexselect. Importing this file imports
nothing else (pytest does, as the test folder's parent); ComfyUI calls `comfy_entrypoint`, which loads the nodes."""

WEB_DIRECTORY = "./comfy_nodes/web"


async def comfy_entrypoint():
    from .comfy_nodes import comfy_entrypoint as nodes_entrypoint

    return await nodes_entrypoint()
