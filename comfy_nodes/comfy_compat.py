"""The ComfyUI services the nodes use, in one place: folders (`folder_paths`), progress (`comfy.utils`), and
`comfy.model_management` (Cancel, handing models to ComfyUI's memory management, releasing cached GPU memory).
Tests patch `throw_if_interrupted` and point the folders at temporary ones."""

from __future__ import annotations

import os

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch

LLM_FOLDER = "LLM"  # what other Video-LLM packs use: models/LLM/<checkpoint folder or .gguf>
RANKER_FOLDER = "flexselect"  # models/flexselect/<lite ranker>


# -- folders ---------------------------------------------------------------------------------------------------------
def annotated_filepath(name: str) -> str:
    """'clip.mp4', 'clip.mp4 [output]' (ComfyUI's annotation) -> full path."""
    return folder_paths.get_annotated_filepath(name)


def register_model_folders() -> None:
    """models/LLM and models/flexselect as model folders (another pack may have added LLM already)."""
    for name in (LLM_FOLDER, RANKER_FOLDER):
        if name not in folder_paths.folder_names_and_paths:
            folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))


def model_folders(name: str) -> list[str]:
    register_model_folders()
    return list(folder_paths.get_folder_paths(name))


def video_files() -> list[str]:
    """Video files in the input folder (by ComfyUI's own content-type filter, as core Load Video lists them)."""
    folder = folder_paths.get_input_directory()
    try:
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    except OSError:
        return []
    return folder_paths.filter_files_content_types(files, ["video"])


# -- progress and Cancel ---------------------------------------------------------------------------------------------
def progress_bar(total: int) -> comfy.utils.ProgressBar:
    return comfy.utils.ProgressBar(max(1, int(total)))


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


# -- model management ------------------------------------------------------------------------------------------------
class _Managed(torch.nn.Module):
    """What a ModelPatcher moves. ModelPatcher sets `.device` on the module it holds, which a transformers model
    refuses (there it is a read-only property); the model follows every `.to()` as a submodule."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.device = model.device


def model_patcher(module, device):
    """A ComfyUI ModelPatcher for a torch model, so ComfyUI's model management sees, offloads and unloads it
    (None for a model that is not a torch module: llama.cpp keeps its own memory)."""
    if device is None or not isinstance(module, torch.nn.Module):
        return None
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        _Managed(module), load_device=torch.device(device), offload_device=mm.unet_offload_device()
    )


def load_models(patchers) -> None:
    """Bring models back onto their device before use (ComfyUI may have offloaded them for another model)."""
    patchers = [p for p in patchers if p is not None]
    if patchers:
        # A full load: partial (lowvram) loading only works for ComfyUI's own layer types.
        mm.load_models_gpu(patchers, force_full_load=True)


def loaded_models() -> list:
    """The ModelPatchers ComfyUI's model management holds now."""
    return [m.model for m in mm.current_loaded_models if m.model is not None]


def unload_models(patchers) -> None:
    """Take models out of ComfyUI's model management (moved to the offload device, forgotten)."""
    patchers = [p for p in patchers if p is not None]
    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model in patchers:
            mm.current_loaded_models.pop(i).model_unload()


def soft_empty_cache() -> None:
    """Release the GPU memory torch keeps cached."""
    mm.soft_empty_cache()


def available_ram_bytes() -> int:
    import psutil  # one of ComfyUI's own requirements

    return int(psutil.virtual_memory().available)
