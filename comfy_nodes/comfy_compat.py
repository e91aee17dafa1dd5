"""The few ComfyUI services the nodes use, with stand-ins when ComfyUI is absent (tests, plain Python).

Inside ComfyUI: `folder_paths` (input folder, model folders), `comfy.utils.ProgressBar`, and
`comfy.model_management` (interrupt check, soft_empty_cache). Outside: a temp input folder, model folders under
$FLEXSELECT_COMFY_MODELS (or a temp dir), no-op progress and interrupt. Tests patch `throw_if_interrupted`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

try:  # ComfyUI present
    import folder_paths as _folder_paths  # type: ignore
except Exception:  # noqa: BLE001 - any failure means "not inside ComfyUI"
    _folder_paths = None

try:
    import comfy.utils as _comfy_utils  # type: ignore
except Exception:  # noqa: BLE001
    _comfy_utils = None

try:
    import comfy.model_management as _mm  # type: ignore
except Exception:  # noqa: BLE001
    _mm = None

IN_COMFY = _folder_paths is not None
LLM_FOLDER = "LLM"  # what other Video-LLM packs use: models/LLM/<checkpoint folder or .gguf>
RANKER_FOLDER = "flexselect"  # models/flexselect/<lite ranker>

_fallback_root: Path | None = None
_fallback_folders: dict[str, list[str]] = {}


def _root() -> Path:
    global _fallback_root
    if _fallback_root is None:
        env = os.environ.get("FLEXSELECT_COMFY_MODELS")
        _fallback_root = Path(env) if env else Path(tempfile.mkdtemp(prefix="flexselect-comfy-"))
    return _fallback_root


# -- folders ---------------------------------------------------------------------------------------------------------
def input_directory() -> str:
    if _folder_paths is not None:
        return _folder_paths.get_input_directory()
    path = _root() / "input"
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def annotated_filepath(name: str) -> str:
    """'clip.mp4', 'clip.mp4 [output]' (ComfyUI's annotation) -> full path."""
    if _folder_paths is not None:
        return _folder_paths.get_annotated_filepath(name)
    return os.path.join(input_directory(), name)


def register_model_folders() -> None:
    """Make sure models/LLM and models/flexselect exist as model folders (other packs may have added LLM already)."""
    for name in (LLM_FOLDER, RANKER_FOLDER):
        if _folder_paths is not None:
            if name not in _folder_paths.folder_names_and_paths:
                _folder_paths.add_model_folder_path(name, os.path.join(_folder_paths.models_dir, name))
        elif name not in _fallback_folders:
            _fallback_folders[name] = [str(_root() / "models" / name)]


def add_model_folder(name: str, path: str | os.PathLike) -> None:
    """Add a folder to a model folder list (ComfyUI's, or the stand-in's)."""
    register_model_folders()
    if _folder_paths is not None:
        _folder_paths.add_model_folder_path(name, str(path))
    elif str(path) not in _fallback_folders[name]:
        _fallback_folders[name].append(str(path))


def model_folders(name: str) -> list[str]:
    register_model_folders()
    if _folder_paths is not None:
        try:
            return list(_folder_paths.get_folder_paths(name))
        except KeyError:
            return []
    return list(_fallback_folders.get(name, []))


def video_files() -> list[str]:
    """Video files in the input folder (ComfyUI's own filter when present, else by extension)."""
    folder = input_directory()
    try:
        files = sorted(f for f in os.listdir(folder) if os.path.isfile(os.path.join(folder, f)))
    except OSError:
        return []
    if _folder_paths is not None and hasattr(_folder_paths, "filter_files_content_types"):
        return _folder_paths.filter_files_content_types(files, ["video"])
    exts = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpeg", ".mpg", ".gif", ".flv", ".wmv", ".ts")
    return [f for f in files if f.lower().endswith(exts)]


# -- progress and interrupt -----------------------------------------------------------------------------------------
class _NullBar:
    def __init__(self, total: int) -> None:
        self.total = total
        self.current = 0

    def update_absolute(self, value, total=None, preview=None) -> None:
        if total is not None:
            self.total = total
        self.current = value

    def update(self, value) -> None:
        self.current += value


def progress_bar(total: int):
    if _comfy_utils is not None:
        return _comfy_utils.ProgressBar(max(1, int(total)))
    return _NullBar(max(1, int(total)))


def throw_if_interrupted() -> None:
    """Raise ComfyUI's InterruptProcessingException if the user pressed Cancel (no-op outside ComfyUI)."""
    if _mm is not None:
        _mm.throw_exception_if_processing_interrupted()


def soft_empty_cache() -> None:
    if _mm is not None and hasattr(_mm, "soft_empty_cache"):
        _mm.soft_empty_cache()
        return
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001
        pass


def available_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
