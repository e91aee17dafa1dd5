"""Where a clip comes from: a file in ComfyUI's input folder, a core VIDEO, or an IMAGE batch with its frame rate.

Files and file-backed VIDEOs are sampled while decoding and resized on the fly (the memory they need is estimated
before anything is decoded); a file-backed VIDEO's `get_components()`, which decodes every frame at full size as
float32, is never called. Frames that are already in memory (an IMAGE batch, a VideoFromComponents) are sampled
and resized the same way.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from comfy_api.latest import InputImpl

from flexselect import video as fv
from flexselect.errors import FlexSelectError

from . import comfy_compat as compat

DEFAULT_RAM_FRACTION = 0.5  # a clip may take at most this share of the RAM available when it is loaded


@dataclass(frozen=True)
class Sampling:
    """The sampling widgets of Load Video (FlexSelect)."""

    frames: int
    fps: float  # 0 = `frames` evenly over [start, end]
    start: float
    end: float  # 0 = the end of the video
    max_side: int
    memory_limit_gb: float  # 0 = DEFAULT_RAM_FRACTION of the RAM available now
    preview_frames: int


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def check_range(start: float, end: float) -> None:
    if end and end <= start:
        raise FlexSelectError(f"end ({end:g} s) must be after start ({start:g} s), or 0 for the end of the video")


def probe_input_file(name: str) -> fv.VideoInfo:
    """The video behind a file widget value, probed (cheap: no frame is decoded). Validation calls this, so a
    missing or corrupt file is reported before the queue runs anything."""
    path = compat.annotated_filepath(name)
    if not os.path.isfile(path):
        raise FlexSelectError(f"video not found in ComfyUI's input folder: {name}")
    try:
        return fv.probe(path)
    except FlexSelectError as e:
        raise FlexSelectError(f"{name}: {e}") from None


def planned_frames(info: fv.VideoInfo, s: Sampling) -> int:
    """How many frames a load will sample (an upper bound when the fps grid is used)."""
    duration = float(info.duration or 0.0)
    lo = max(0.0, s.start)
    hi = min(s.end, duration) if s.end > 0 and duration > 0 else (s.end if s.end > 0 else duration)
    if s.fps > 0:
        span = max(hi - lo, 0.0)
        n = min(s.frames, max(1, math.ceil(span * s.fps)) if span > 0 else info.num_frames or s.frames)
    else:
        n = s.frames
    return min(n, info.num_frames) if info.num_frames > 0 else n


def check_memory(need: int, n: int, width: int, height: int, s: Sampling) -> None:
    if s.memory_limit_gb > 0:
        limit, why = int(s.memory_limit_gb * 2**30), f"memory_limit_gb = {s.memory_limit_gb:g}"
    else:
        avail = compat.available_ram_bytes()
        limit = int(avail * DEFAULT_RAM_FRACTION)
        why = f"{DEFAULT_RAM_FRACTION:.0%} of the {gib(avail)} of RAM available now (set memory_limit_gb to change)"
    if need > limit:
        raise FlexSelectError(
            f"refusing to load {n} frames of {width}x{height} (longer side resized to at most {s.max_side}): that "
            f"needs about {gib(need)}, over the limit of {gib(limit)} ({why}). Sample fewer frames, lower max_side "
            "or fps, or set start/end to a shorter range."
        )


def clip_from_file(path: str, s: Sampling, on_frame: Callable[[int, int], None]) -> fv.Clip:
    """Sample a video file while decoding, after checking the memory it will take."""
    info = fv.probe(path)
    n = planned_frames(info, s)
    need = fv.estimate_clip_bytes(info, n, s.max_side)
    need += min(s.preview_frames, n) * need // max(n, 1) * 4  # the float32 preview batch
    check_memory(need, n, info.width, info.height, s)
    return fv.load_clip(
        path,
        num_frames=None if s.fps > 0 else s.frames,
        fps=s.fps if s.fps > 0 else None,
        start=s.start if s.start > 0 else None,
        end=s.end if s.end > 0 else None,
        max_frames=s.frames,
        max_side=s.max_side,
        on_frame=on_frame,
    )


def clip_from_video(video, s: Sampling, on_frame: Callable[[int, int], None]) -> fv.Clip:
    """A clip from a core VIDEO: its file or stream is sampled while decoding; in-memory frames are subsampled."""
    if isinstance(video, InputImpl.VideoFromComponents):  # the frames are already decoded, in memory
        components = video.get_components()
        rate = float(components.frame_rate) if components.frame_rate else 0.0
        return clip_from_images(components.images, rate, s, "VIDEO input")
    src = video.get_stream_source()  # a VideoFromFile's path or stream; other VIDEOs encode themselves into one
    if isinstance(src, (str, os.PathLike)):
        return clip_from_file(os.fspath(src), s, on_frame)
    if not hasattr(src, "read"):
        raise FlexSelectError(f"cannot read this VIDEO input (its source is a {type(src).__name__})")
    # An in-memory container (BytesIO): spilled to a temp file so it is streamed like any other file.
    tmp_dir = tempfile.mkdtemp(prefix="flexselect-video-")
    try:
        path = os.path.join(tmp_dir, "video")
        src.seek(0)
        with open(path, "wb") as f:
            shutil.copyfileobj(src, f, 1 << 20)
        src.seek(0)  # the VIDEO is shared with other nodes: leave its stream as it was
        return clip_from_file(path, s, on_frame)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def clip_from_images(images, frame_rate: float, s: Sampling, source: str = "IMAGE input") -> fv.Clip:
    """A clip from frames in memory (float [N, H, W, 3] in 0..1, e.g. VideoHelperSuite's Load Video): the sampled
    frames are resized and turned to uint8; the batch itself is never changed."""
    import torch
    import torch.nn.functional as F

    total = int(images.shape[0]) if images is not None and images.ndim == 4 else 0
    if total == 0:
        raise FlexSelectError(f"the {source} holds no frames")
    if frame_rate <= 0:
        raise FlexSelectError(f"the {source} needs its frame rate: set frame_rate (e.g. 24)")
    times = np.arange(total) / frame_rate
    lo, hi = max(s.start, 0.0), (s.end if s.end > 0 else float("inf"))
    window = np.nonzero((times >= lo) & (times <= hi))[0]
    if window.size == 0:
        raise FlexSelectError(f"no frames between {lo:g} s and {hi:g} s in the {source} ({total / frame_rate:.2f} s)")
    if s.fps > 0:
        want = min(s.frames, max(1, math.ceil((times[window[-1]] - times[window[0]] + 1 / frame_rate) * s.fps)))
    else:
        want = min(s.frames, window.size)
    picked = window[np.unique(np.round(np.linspace(0, window.size - 1, want)).astype(np.int64))]
    x = images[torch.from_numpy(picked).to(images.device)].permute(0, 3, 1, 2).float()
    w, h = fv.output_size(int(x.shape[3]), int(x.shape[2]), s.max_side)  # the size a file would be decoded at
    if (h, w) != tuple(x.shape[2:]):
        x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    u8 = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    info = fv.VideoInfo(
        path=source, num_frames=total, fps=frame_rate, duration=total / frame_rate, width=int(w), height=int(h)
    )
    return fv.Clip(frames=u8, timestamps=times[picked].astype(np.float64), source=source, info=info)
