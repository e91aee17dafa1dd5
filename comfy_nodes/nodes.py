"""FlexSelect as ComfyUI nodes (V1 contract: works on ComfyUI 0.3.x and newer).

    Load Video (FlexSelect) --clip--> FlexSelect --selection--> Answer (FlexSelect) --> STRING
    Load Video-LLM (FlexSelect) --model--^------------------------^
    Load Lite Ranker (FlexSelect) --ranker--> (optional input of FlexSelect)

Long videos: frames are sampled while decoding and resized on the fly (never every frame at full size), and the
memory a clip will take is estimated before anything is decoded. Links carry custom types (FLEXSELECT_CLIP,
FLEXSELECT_MODEL, FLEXSELECT_RANKER, FLEXSELECT_SELECTION); ComfyUI caches and shares node outputs, so nothing here
changes an input. Models load on first use, are cached by path and options, and are freed by Free Models.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from flexselect.errors import FlexSelectError

from . import comfy_compat as compat

log = logging.getLogger("flexselect.comfy")

CATEGORY = "FlexSelect"
NO_FILE = "(none: use the video input)"
NO_MODEL = "(no model in models/LLM)"
NO_RANKER = "(no ranker in models/flexselect)"
AUTO_MMPROJ = "auto (mmproj*.gguf beside the model)"
DEFAULT_RAM_FRACTION = 0.5  # a clip may take at most this share of the RAM available when it is loaded
RANKER_EXTS = (".safetensors", ".onnx", ".pt", ".pth", ".bin")


# =====================================================================================================================
# Values that travel on links
# =====================================================================================================================
@dataclass(frozen=True)
class ModelHandle:
    """FLEXSELECT_MODEL: what to load (loaded on first use, shared through the cache, reloaded after a free)."""

    key: tuple
    label: str
    load_args: tuple  # ((name, value), ...) for FlexSelect.load

    def get(self):
        return _model_cache.get(self)


@dataclass(frozen=True)
class RankerHandle:
    """FLEXSELECT_RANKER: a Lite ranker file, loaded against a model's backend when FlexSelect first uses it."""

    path: str
    label: str


@dataclass
class SelectionResult:
    """FLEXSELECT_SELECTION: everything Answer needs, plus what a user may want to inspect."""

    model_key: tuple
    question: str
    visual: Any  # VisualTokens
    prompt: Any  # Prompt
    selection: Any  # pipeline.Selection (kept, scores, sets, budget, layer, selector, seconds)
    kept_per_frame: np.ndarray  # [units] kept tokens per temporal unit
    timing: dict = field(default_factory=dict)

    @property
    def kept(self):
        return self.selection.kept

    @property
    def scores(self):
        return self.selection.scores


# =====================================================================================================================
# Caches
# =====================================================================================================================
class _ModelCache:
    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._pipes: dict[tuple, Any] = {}
        self._ranked: dict[tuple, Any] = {}  # (model key, ranker path) -> FlexSelect sharing the model's backend
        self._visual: OrderedDict[tuple, tuple] = OrderedDict()  # (id(clip), model key) -> (clip, VisualTokens)
        self.max_visual = 4

    def get(self, handle: ModelHandle):
        with self._lock:
            pipe = self._pipes.get(handle.key)
            if pipe is None:
                from flexselect.pipeline import FlexSelect

                log.info("FlexSelect: loading %s", handle.label)
                try:
                    pipe = FlexSelect.load(**dict(handle.load_args))
                except FlexSelectError:
                    raise
                except (OSError, ValueError) as e:  # transformers' messages for a broken folder
                    raise FlexSelectError(f"could not load the model {handle.label}: {e}") from e
                self._pipes[handle.key] = pipe
            return pipe

    def with_ranker(self, handle: ModelHandle, ranker: RankerHandle):
        with self._lock:
            key = (handle.key, ranker.path)
            pipe = self._ranked.get(key)
            if pipe is None:
                # Same backend, ranker-scored: the cached model is neither copied nor changed.
                pipe = self.get(handle).with_ranker(ranker.path)
                self._ranked[key] = pipe
            return pipe

    def visual(self, clip, handle: ModelHandle):
        with self._lock:
            hit = self._visual.get((id(clip), handle.key))
            if hit is not None and hit[0] is clip:
                self._visual.move_to_end((id(clip), handle.key))
                return hit[1]
            return None

    def put_visual(self, clip, handle: ModelHandle, visual) -> None:
        with self._lock:
            self._visual[(id(clip), handle.key)] = (clip, visual)  # holds the clip: its id cannot be reused
            while len(self._visual) > self.max_visual:
                self._visual.popitem(last=False)

    def free(self) -> int:
        with self._lock:
            n = len(self._pipes) + len(self._ranked)
            self._pipes.clear()
            self._ranked.clear()
            self._visual.clear()
        gc.collect()
        compat.soft_empty_cache()
        return n

    def loaded(self) -> list[tuple]:
        return list(self._pipes)


_model_cache = _ModelCache()


# =====================================================================================================================
# Helpers
# =====================================================================================================================
def _check_interrupt(*_args) -> None:
    compat.throw_if_interrupted()


class _StageBars:
    """The pipeline's (stage, done, total) progress -> one ComfyUI bar per stage; Cancel is honoured at each call."""

    def __init__(self) -> None:
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        compat.throw_if_interrupted()
        if stage != self.stage:
            self.stage, self.bar = stage, compat.progress_bar(total)
        self.bar.update_absolute(done, total)


def _to_image(frames_uint8: np.ndarray):
    """uint8 [N, H, W, 3] -> ComfyUI IMAGE (float32 [N, H, W, 3] in 0..1), a new tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).float().div_(255.0)


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _inside(folder: str, name: str) -> Path | None:
    base = Path(folder).resolve()
    path = (base / name).resolve()
    try:
        path.relative_to(base)
    except ValueError:
        return None
    return path


def _is_mmproj(name: str) -> bool:
    return "mmproj" in Path(name).name.lower()


def model_choices() -> list[str]:
    """Checkpoint folders (with a config.json, up to two levels deep) and GGUF files in the LLM model folders."""
    found: set[str] = set()
    for folder in compat.model_folders(compat.LLM_FOLDER):
        root = Path(folder)
        if not root.is_dir():
            continue
        for cfg in list(root.glob("*/config.json")) + list(root.glob("*/*/config.json")):
            found.add(cfg.parent.relative_to(root).as_posix())
        for gguf in list(root.glob("*.gguf")) + list(root.glob("*/*.gguf")):
            if not _is_mmproj(gguf.name):
                found.add(gguf.relative_to(root).as_posix())
    return sorted(found) or [NO_MODEL]


def mmproj_choices() -> list[str]:
    found: set[str] = set()
    for folder in compat.model_folders(compat.LLM_FOLDER):
        root = Path(folder)
        if root.is_dir():
            for gguf in list(root.glob("*.gguf")) + list(root.glob("*/*.gguf")):
                if _is_mmproj(gguf.name):
                    found.add(gguf.relative_to(root).as_posix())
    return [AUTO_MMPROJ, *sorted(found)]


def ranker_choices() -> list[str]:
    found: set[str] = set()
    for folder in compat.model_folders(compat.RANKER_FOLDER):
        root = Path(folder)
        if not root.is_dir():
            continue
        for p in list(root.iterdir()) + list(root.glob("*/*")):
            if p.is_file() and p.suffix.lower() in RANKER_EXTS:
                found.add(p.relative_to(root).as_posix())
            elif p.is_dir() and (any(p.glob("*.safetensors")) or any(p.glob("*.onnx"))):
                found.add(p.relative_to(root).as_posix())
    return sorted(found) or [NO_RANKER]


def resolve_model_file(folder_kind: str, name: str) -> Path:
    where = compat.model_folders(folder_kind)
    for folder in where:
        path = _inside(folder, name)
        if path is not None and path.exists():
            return path
    raise FlexSelectError(
        f"{name!r} was not found in the {folder_kind} model folders ({', '.join(where) or 'none registered'})"
    )


def planned_frames(info, frames: int, fps: float, start: float, end: float) -> int:
    """How many frames a Load Video call will sample (an upper bound when the fps grid is used)."""
    duration = float(getattr(info, "duration", 0.0) or 0.0)
    lo = max(0.0, start)
    hi = end if end > 0 else duration
    if duration > 0:
        hi = min(hi, duration)
    if fps > 0:
        span = max(hi - lo, 0.0)
        by_fps = max(1, math.ceil(span * fps)) if span > 0 else int(getattr(info, "num_frames", frames) or frames)
        n = min(frames, by_fps)
    else:
        n = frames
    total = int(getattr(info, "num_frames", 0) or 0)
    return min(n, total) if total > 0 else n


# =====================================================================================================================
# Load Video (FlexSelect)
# =====================================================================================================================
class FlexSelectLoadVideo:
    """Sample frames from a video while decoding (memory checked first): a clip for FlexSelect and a preview."""

    DESCRIPTION = (
        "Samples frames from a video while decoding it, resized on the fly, so hour-long videos fit in memory. "
        "The memory the clip needs is estimated first; a request over the limit is refused with the numbers."
    )
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLEXSELECT_CLIP", "IMAGE", "STRING")
    RETURN_NAMES = ("clip", "preview", "info")
    OUTPUT_TOOLTIPS = (
        "The sampled frames (uint8) with their timestamps, for FlexSelect.",
        "An evenly spaced subsample of the sampled frames (preview_frames of them) as an IMAGE batch.",
        "What was sampled: frames, times, size, memory.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        files = compat.video_files()
        return {
            "required": {
                "file": ([*files, NO_FILE], {"video_upload": True,
                                             "tooltip": "A video in ComfyUI's input folder (ignored when a VIDEO is connected)."}),
                "frames": ("INT", {"default": 128, "min": 1, "max": 8192, "step": 1,
                                   "tooltip": "Frames to sample evenly over [start, end]. With fps > 0: the most frames to take."}),
                "fps": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 120.0, "step": 0.1,
                                  "tooltip": "Sample at this rate (capped at `frames`). 0 = use `frames` evenly."}),
                "start": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e7, "step": 0.1,
                                    "tooltip": "Start time in seconds."}),
                "end": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1e7, "step": 0.1,
                                  "tooltip": "End time in seconds; 0 = the end of the video."}),
                "max_side": ("INT", {"default": 560, "min": 28, "max": 4096, "step": 4,
                                     "tooltip": "Frames are resized while decoding so the longer side is at most this."}),
                "memory_limit_gb": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 4096.0, "step": 0.5,
                                              "tooltip": "Refuse clips that need more. 0 = half of the RAM available now."}),
                "preview_frames": ("INT", {"default": 16, "min": 1, "max": 1024, "step": 1,
                                           "tooltip": "How many of the sampled frames go to the preview IMAGE output."}),
            },
            "optional": {
                "video": ("VIDEO", {"tooltip": "A core VIDEO (e.g. from Load Video): its file is read with the "
                                               "same streaming sampler; its frames are never all decoded."}),
            },
        }

    @classmethod
    def IS_CHANGED(cls, file, **_kwargs):
        if file == NO_FILE:
            return ""
        path = compat.annotated_filepath(file)
        try:
            st = os.stat(path)
            return f"{st.st_mtime_ns}:{st.st_size}"
        except OSError:
            return ""

    def load(self, file, frames, fps, start, end, max_side, memory_limit_gb, preview_frames, video=None):
        from flexselect import video as fv
        from flexselect.show import even_subsample

        if end and end <= start:
            raise FlexSelectError(f"end ({end} s) must be after start ({start} s), or 0 for the end of the video")
        cleanup = None
        try:
            if video is not None:
                path, cleanup, in_memory = _video_input_source(video)
            else:
                if file == NO_FILE or not file:
                    raise FlexSelectError("no video: pick a file (or upload one), or connect a VIDEO input")
                path, in_memory = compat.annotated_filepath(file), None
                if not os.path.isfile(path):
                    raise FlexSelectError(f"video not found: {path}")
            if in_memory is not None:
                clip = _clip_from_components(in_memory, frames, fps, start, end, max_side)
            else:
                info = fv.probe(path)
                n = planned_frames(info, frames, fps, start, end)
                need = fv.estimate_clip_bytes(info, n, max_side)
                need += min(preview_frames, n) * need // max(n, 1) * 4  # the float32 preview batch
                _check_memory(need, n, info, max_side, memory_limit_gb)
                bar = compat.progress_bar(n)

                def on_frame(i, total):
                    compat.throw_if_interrupted()  # Cancel takes effect between frames
                    bar.update_absolute(i, total)

                clip = fv.load_clip(path, num_frames=None if fps > 0 else frames, fps=fps if fps > 0 else None,
                                    start=start if start > 0 else None, end=end if end > 0 else None,
                                    max_frames=frames, max_side=max_side, on_frame=on_frame)
        finally:
            if cleanup is not None:
                cleanup()
        n = len(clip.frames)
        if n == 0:
            raise FlexSelectError("no frames were sampled: check start/end against the video's length")
        preview = _to_image(clip.frames[even_subsample(n, preview_frames)])
        h, w = clip.frames.shape[1:3]
        ts = clip.timestamps
        info_text = (f"{n} frames {w}x{h} from {os.path.basename(str(clip.source)) or 'video'}, "
                     f"{float(ts[0]):.2f}-{float(ts[-1]):.2f} s at {clip.sample_fps:.3g} fps, "
                     f"{_gib(clip.frames.nbytes)} in memory")
        return (clip, preview, info_text)


def _check_memory(need: int, n: int, info, max_side: int, limit_gb: float) -> None:
    if limit_gb > 0:
        limit, why = int(limit_gb * 2**30), f"memory_limit_gb = {limit_gb:g}"
    else:
        avail = compat.available_ram_bytes()
        if avail is None:
            return
        limit = int(avail * DEFAULT_RAM_FRACTION)
        why = f"{DEFAULT_RAM_FRACTION:.0%} of the {_gib(avail)} of RAM available now (set memory_limit_gb to change)"
    if need > limit:
        raise FlexSelectError(
            f"refusing to load {n} frames of {getattr(info, 'width', '?')}x{getattr(info, 'height', '?')} "
            f"(longer side resized to at most {max_side}): that needs about {_gib(need)}, over the limit of "
            f"{_gib(limit)} ({why}). Sample fewer frames, lower max_side or fps, or set start/end to a shorter range."
        )


def _video_input_source(video):
    """(path, cleanup, None) for a core VIDEO backed by a file or stream; (None, None, video) if it is in memory.

    Never calls a file-backed VIDEO's get_components(): that decodes every frame at full size as float32.
    """
    get_source = getattr(video, "get_stream_source", None)
    if get_source is None:
        return None, None, video  # VideoFromComponents: frames are already decoded, in memory
    src = get_source()
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src), None, None
    if hasattr(src, "read"):  # BytesIO (uploaded/in-memory container): spill to a temp file, streamed
        tmp_dir = tempfile.mkdtemp(prefix="flexselect-video-")
        path = os.path.join(tmp_dir, "video")
        if hasattr(src, "seek"):
            src.seek(0)
        with open(path, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        if hasattr(src, "seek"):
            src.seek(0)
        return path, lambda: shutil.rmtree(tmp_dir, ignore_errors=True), None
    raise FlexSelectError(f"cannot read this VIDEO input (its source is a {type(src).__name__})")


def _clip_from_components(video, frames, fps, start, end, max_side):
    """A Clip from a VIDEO whose frames are already in memory (VideoFromComponents): sample, resize, to uint8."""
    import torch
    import torch.nn.functional as F

    from flexselect import video as fv

    comps = video.get_components()  # already decoded: returns the tensors it holds
    images = comps.images  # float [N, H, W, 3] in 0..1
    rate = float(comps.frame_rate) if comps.frame_rate else 0.0
    total = int(images.shape[0])
    if total == 0:
        raise FlexSelectError("the VIDEO input has no frames")
    times = np.arange(total) / rate if rate > 0 else np.arange(total, dtype=np.float64)
    lo, hi = max(start, 0.0), (end if end > 0 else float("inf"))
    window = np.nonzero((times >= lo) & (times <= hi))[0]
    if window.size == 0:
        raise FlexSelectError(f"no frames between {lo} s and {end} s in the VIDEO input ({total} frames)")
    if fps > 0 and rate > 0:
        want = min(frames, max(1, math.ceil((times[window[-1]] - times[window[0]] + 1 / rate) * fps)))
    else:
        want = min(frames, window.size)
    picked = window[np.unique(np.round(np.linspace(0, window.size - 1, want)).astype(np.int64))]
    x = images[torch.from_numpy(picked)].permute(0, 3, 1, 2).float()
    h, w = x.shape[2:]
    if max(h, w) > max_side:
        s = max_side / max(h, w)
        x = F.interpolate(x, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                          antialias=True, align_corners=False)
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    info = fv.VideoInfo(path="VIDEO input", num_frames=total, fps=rate, duration=total / rate if rate else 0.0,
                        width=int(w), height=int(h))
    # Clip.sample_fps follows from the picked frames' timestamps
    return fv.Clip(frames=u8, timestamps=times[picked].astype(np.float64), source="VIDEO input", info=info)


# =====================================================================================================================
# Loaders
# =====================================================================================================================
class FlexSelectLoadModel:
    """A Video-LLM from models/LLM: a transformers checkpoint folder, or a GGUF file with its mmproj."""

    DESCRIPTION = ("Picks a Video-LLM from models/LLM (a transformers checkpoint folder such as "
                   "Qwen2.5-VL-7B-Instruct, or a .gguf with its mmproj). Loaded on first use, cached, never downloaded.")
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLEXSELECT_MODEL",)
    RETURN_NAMES = ("model",)

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (model_choices(), {"tooltip": "Checkpoint folder or .gguf in models/LLM."}),
                "mmproj": (mmproj_choices(), {"tooltip": "GGUF only: the vision projector file."}),
                "device": (["auto", "cuda", "cpu", "mps"], {"default": "auto"}),
                "dtype": (["auto", "bfloat16", "float16", "float32"], {"default": "auto"}),
                "context": ("INT", {"default": 32768, "min": 2048, "max": 1048576, "step": 1024,
                                    "tooltip": "GGUF only: context length."}),
            }
        }

    def load(self, model, mmproj, device, dtype, context):
        if model == NO_MODEL:
            raise FlexSelectError("no model: put a checkpoint folder or a .gguf (+ mmproj) in ComfyUI's models/LLM")
        path = resolve_model_file(compat.LLM_FOLDER, model)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FlexSelectError(f"{path} is not a transformers checkpoint folder (no config.json)")
            args = (("model", str(path)), ("device", device), ("dtype", dtype))
        else:
            if mmproj == AUTO_MMPROJ:
                near = sorted(p for p in path.parent.glob("*.gguf") if _is_mmproj(p.name))
                if len(near) != 1:
                    raise FlexSelectError(
                        f"pick the mmproj for {path.name}: found {len(near)} mmproj*.gguf files beside it "
                        f"({', '.join(p.name for p in near) or 'none'})"
                    )
                mm = near[0]
            else:
                mm = resolve_model_file(compat.LLM_FOLDER, mmproj)
            n_gpu_layers = 0 if device == "cpu" else -1
            args = (("gguf", str(path)), ("mmproj", str(mm)), ("n_ctx", context), ("n_gpu_layers", n_gpu_layers))
        return (ModelHandle(key=args, label=model, load_args=args),)


class FlexSelectLoadRanker:
    """A FlexSelect-Lite ranker from models/flexselect: scores tokens without the big model's scoring passes."""

    DESCRIPTION = "A FlexSelect-Lite ranker from models/flexselect; connect it to FlexSelect's optional ranker input."
    CATEGORY = CATEGORY
    FUNCTION = "load"
    RETURN_TYPES = ("FLEXSELECT_RANKER",)
    RETURN_NAMES = ("ranker",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"ranker": (ranker_choices(), {"tooltip": "Lite ranker in models/flexselect."})}}

    def load(self, ranker):
        if ranker == NO_RANKER:
            raise FlexSelectError("no ranker: put a FlexSelect-Lite ranker in ComfyUI's models/flexselect")
        path = resolve_model_file(compat.RANKER_FOLDER, ranker)
        return (RankerHandle(path=str(path), label=ranker),)


class FlexSelectFreeModels:
    """Drops every cached FlexSelect model and visual tokens, then asks ComfyUI to release cached GPU memory."""

    DESCRIPTION = "Frees the models FlexSelect loaded (they reload on next use). Connect anything to run it after."
    CATEGORY = CATEGORY
    FUNCTION = "free"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("passthrough",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"optional": {"after": ("STRING", {"forceInput": True,
                                                  "tooltip": "Run after this (e.g. an answer); passed through."})}}

    @classmethod
    def IS_CHANGED(cls, **_kwargs):
        return float("nan")  # always runs

    def free(self, after=None):
        n = _model_cache.free()
        msg = f"freed {n} FlexSelect model(s)"
        return {"ui": {"text": [msg]}, "result": (after if after is not None else msg,)}


# =====================================================================================================================
# FlexSelect
# =====================================================================================================================
class FlexSelect:
    """Keeps the visual tokens the question needs (reference-layer scores, or a Lite ranker) and shows them."""

    DESCRIPTION = ("Encodes the clip's frames once (cached), scores every visual token against the question in "
                   "frame sets, keeps the top `budget`. The heatmap shows the kept tokens in red.")
    CATEGORY = CATEGORY
    FUNCTION = "select"
    RETURN_TYPES = ("FLEXSELECT_SELECTION", "IMAGE", "STRING")
    RETURN_NAMES = ("selection", "heatmap", "info")
    OUTPUT_TOOLTIPS = (
        "Kept token indices, scores, per-frame counts, timing; for Answer.",
        "Kept tokens in red over evenly spaced sampled frames (a contact sheet, or one image per frame).",
        "What was kept and how long it took.",
    )

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "clip": ("FLEXSELECT_CLIP",),
                "model": ("FLEXSELECT_MODEL",),
                "question": ("STRING", {"multiline": True, "default": "What happens in the video?"}),
                "budget": ("INT", {"default": 0, "min": 0, "max": 1 << 24, "step": 1,
                                   "tooltip": "Visual tokens to keep (rounded up to whole frames). 0 = the model's default."}),
                "layer": ("INT", {"default": -1, "min": -1, "max": 1024, "step": 1,
                                  "tooltip": "Reference layer that scores tokens (0-based). -1 = the model's default."}),
                "set_frames": ("INT", {"default": 0, "min": 0, "max": 8192, "step": 1,
                                       "tooltip": "Frames per frame set scored together. 0 = the default (64)."}),
                "preview": (["contact sheet", "frames"], {"default": "contact sheet"}),
                "preview_frames": ("INT", {"default": 16, "min": 1, "max": 1024, "step": 1}),
            },
            "optional": {
                "ranker": ("FLEXSELECT_RANKER", {"tooltip": "Score with a Lite ranker instead of the reference layer."}),
            },
        }

    def select(self, clip, model, question, budget, layer, set_frames, preview, preview_frames, ranker=None):
        from flexselect.pipeline import SelectOptions
        from flexselect.show import even_subsample, render_heatmaps, selection_sheet

        if not isinstance(model, ModelHandle):
            raise FlexSelectError("the model input must come from Load Video-LLM (FlexSelect)")
        if not hasattr(clip, "frames") or len(clip.frames) == 0:
            raise FlexSelectError("the clip input must come from Load Video (FlexSelect) and hold frames")
        question = (question or "").strip()
        if not question:
            raise FlexSelectError("the question is empty: ask something about the video")
        progress = _StageBars()
        compat.throw_if_interrupted()
        pipe = _model_cache.with_ranker(model, ranker) if ranker is not None else _model_cache.get(model)
        t0 = time.perf_counter()
        visual = _model_cache.visual(clip, model)
        cached = visual is not None
        if visual is None:
            visual, _ = pipe.encode(clip, progress=progress)
            _model_cache.put_visual(clip, model, visual)
        t1 = time.perf_counter()
        prompt = pipe.backend.prompt(question)
        options = SelectOptions(budget=budget or None, layer=None if layer < 0 else layer,
                                set_frames=set_frames or None)
        selection = pipe.select(visual, prompt, options, progress=progress)
        per_frame = selection.kept_per_frame(visual)
        n = len(clip.frames)
        picked = even_subsample(n, preview_frames)
        if preview == "frames":
            heat = render_heatmaps(clip.frames, visual, selection, frames=picked)
        else:
            heat = selection_sheet(clip.frames, visual, selection, max_frames=preview_frames,
                                   timestamps=clip.timestamps)[None]
        kept = int(len(selection.kept))
        timing = {"encode_s": 0.0 if cached else t1 - t0, "select_s": selection.seconds, "encode_cached": cached}
        info = (f"kept {kept} of {visual.num_tokens} visual tokens ({100 * kept / visual.num_tokens:.1f}%) from "
                f"{visual.num_frames} frame units x {visual.tokens_per_frame} tokens, {len(selection.sets)} frame "
                f"set(s), selector {selection.selector}"
                + (f", layer {selection.layer}" if selection.layer is not None else "")
                + f"; encode {timing['encode_s']:.2f} s{' (cached)' if cached else ''}, "
                  f"select {selection.seconds:.2f} s")
        result = SelectionResult(model_key=model.key, question=question, visual=visual, prompt=prompt,
                                 selection=selection, kept_per_frame=per_frame, timing=timing)
        return (result, _to_image(heat), info)


# =====================================================================================================================
# Answer (FlexSelect)
# =====================================================================================================================
class FlexSelectAnswer:
    """Runs the Video-LLM once on the kept tokens and the question; the answer shows on the node."""

    DESCRIPTION = "Generates the answer from the kept visual tokens only (fast prefill on long videos)."
    CATEGORY = CATEGORY
    FUNCTION = "answer"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("answer",)
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "selection": ("FLEXSELECT_SELECTION",),
                "model": ("FLEXSELECT_MODEL",),
                "max_new_tokens": ("INT", {"default": 128, "min": 1, "max": 8192, "step": 1}),
                "temperature": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 2.0, "step": 0.05,
                                          "tooltip": "0 = greedy (deterministic)."}),
                "top_p": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**32 - 1,
                                 "tooltip": "Sampling seed (used when temperature > 0)."}),
            }
        }

    def answer(self, selection, model, max_new_tokens, temperature, top_p, seed):
        from flexselect.backends.base import GenerationConfig

        if not isinstance(selection, SelectionResult):
            raise FlexSelectError("the selection input must come from a FlexSelect node")
        if not isinstance(model, ModelHandle):
            raise FlexSelectError("the model input must come from Load Video-LLM (FlexSelect)")
        if selection.model_key != model.key:
            raise FlexSelectError(
                f"this selection was made with another model than {model.label}: connect the same "
                "Load Video-LLM node to FlexSelect and Answer"
            )
        compat.throw_if_interrupted()
        pipe = _model_cache.get(model)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        progress = _StageBars()  # one step per generated token; Cancel stops the answer between tokens
        generation = pipe.backend.generate(selection.visual, selection.kept, selection.prompt, config,
                                           lambda done, total: progress("answer", done, total))
        text = generation.text
        return {"ui": {"text": [text]}, "result": (text,)}


NODE_CLASS_MAPPINGS = {
    "FlexSelectLoadVideo": FlexSelectLoadVideo,
    "FlexSelectLoadModel": FlexSelectLoadModel,
    "FlexSelectLoadRanker": FlexSelectLoadRanker,
    "FlexSelect": FlexSelect,
    "FlexSelectAnswer": FlexSelectAnswer,
    "FlexSelectFreeModels": FlexSelectFreeModels,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "FlexSelectLoadVideo": "Load Video (FlexSelect)",
    "FlexSelectLoadModel": "Load Video-LLM (FlexSelect)",
    "FlexSelectLoadRanker": "Load Lite Ranker (FlexSelect)",
    "FlexSelect": "FlexSelect",
    "FlexSelectAnswer": "Answer (FlexSelect)",
    "FlexSelectFreeModels": "Free Models (FlexSelect)",
}
