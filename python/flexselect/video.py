"""Video -> frames: probe a file, pick frame indices, decode only those frames, resized while decoding.

decord is the chosen decoder (seeks and decodes just the sampled frames, resizing in the decoder); PyAV is the
fallback when decord is missing or cannot read a file. Memory is one preallocated array of the sampled frames:
a 1-hour 1080p video never needs more than that. Sampling rules are shared with the C++ runtime (cpp/src/video.cpp):
uniform = centres of n equal segments of the span; fps = round(span * fps) frames taken the same way; the clip's
`sample_fps` is the requested rate when that many frames were taken, else the frames over the span's duration.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import FlexSelectError, check_positive

log = logging.getLogger("flexselect")

Decoder = Literal["auto", "decord", "pyav"]
DECORD_CHUNK = 32  # frames per get_batch call: bounds the decoder's own buffers


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int


@dataclass(frozen=True)
class Clip:
    frames: np.ndarray  # uint8 [N, H, W, 3] RGB
    timestamps: np.ndarray  # float64 [N] seconds from the start of the video
    source: str
    info: VideoInfo
    # Sampled frames per second, what M-RoPE's temporal spacing is computed from: the requested rate when one was
    # requested, else the sampled frames over the span they cover. 0: estimated from the timestamps.
    sample_fps: float = 0.0

    def __post_init__(self) -> None:
        if not self.sample_fps > 0:
            n = len(self.frames)
            step = (self.timestamps[-1] - self.timestamps[0]) / (n - 1) if n > 1 else 0.0
            object.__setattr__(self, "sample_fps", 1.0 / step if step > 0 else self.info.fps)

    @classmethod
    def from_frames(cls, frames: np.ndarray, fps: float, source: str = "frames") -> Clip:
        """In-memory frames (uint8 [N, H, W, 3]) sampled at `fps` from the start, as `load_clip` would return them."""
        frames = np.ascontiguousarray(frames, dtype=np.uint8)
        n, h, w = frames.shape[:3]
        info = VideoInfo(path=source, num_frames=n, fps=fps, duration=n / fps, width=w, height=h)
        return cls(frames, np.arange(n) / fps, source, info, sample_fps=fps)


def check_video_file(path: str | os.PathLike) -> Path:
    """The video path names a non-empty file (what the container holds is `probe`'s to check)."""
    p = Path(path)
    if p.is_dir():
        raise FlexSelectError(f"{p} is a directory, not a video; give the path of a video file")
    if not p.exists():
        raise FlexSelectError(f"video not found: {p}")
    if not p.is_file():
        raise FlexSelectError(f"{p} is not a regular file; give the path of a video file")
    if p.stat().st_size == 0:
        raise FlexSelectError(f"{p} is empty (0 bytes); re-copy or re-download the video")
    return p


def _decord():
    try:
        import decord
    except ImportError:
        return None
    decord.logging.set_level(decord.logging.QUIET)
    return decord


def probe(path: str | os.PathLike, decoder: Decoder = "auto") -> VideoInfo:
    p = check_video_file(path)
    decord = _decord() if decoder != "pyav" else None
    if decord is not None:
        try:
            vr = decord.VideoReader(str(p), ctx=decord.cpu(0))
            fps = float(vr.get_avg_fps()) or 25.0
            h, w = vr[0].shape[:2] if len(vr) else (0, 0)
            return _valid(VideoInfo(str(p), len(vr), fps, len(vr) / fps, w, h))
        except FlexSelectError:
            raise
        except Exception as e:  # decord's errors are untyped; fall back to PyAV, which may do better
            if decoder == "decord":
                raise _unreadable(p, e) from None
            log.info("decord cannot read %s (%s); trying PyAV", p, e)
    return _probe_pyav(p)


def _probe_pyav(p: Path) -> VideoInfo:
    import av

    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise FlexSelectError(f"{p} has no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 25)
            duration = (
                float(stream.duration * stream.time_base)
                if stream.duration
                else (container.duration / 1e6 if container.duration else 0.0)
            )
            frames = stream.frames or int(round(duration * fps))
            return _valid(
                VideoInfo(
                    str(p),
                    frames,
                    fps,
                    frames / fps if fps else duration,
                    stream.codec_context.width,
                    stream.codec_context.height,
                )
            )
    except FlexSelectError:
        raise
    except Exception as e:
        raise _unreadable(p, e) from None


def _valid(info: VideoInfo) -> VideoInfo:
    if info.num_frames <= 0 or info.width <= 0 or info.height <= 0:
        raise FlexSelectError(f"{info.path} contains no decodable video frames")
    return info


def _unreadable(p: Path, e: Exception) -> FlexSelectError:
    # FFmpeg's own reason is worth showing ("Invalid data found when processing input"); other exceptions are the
    # decoders' internals (an AttributeError for an unknown codec), which mean nothing to the user.
    reason = getattr(e, "strerror", None) if type(e).__module__.startswith("av") else None
    return FlexSelectError(
        f"cannot read {p} as a video{f' ({reason})' if reason else ''}: the file is damaged or "
        "incomplete, or its format or codec cannot be decoded here"
    )


def sample_indices(
    info: VideoInfo,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
) -> np.ndarray:
    """Sorted unique frame indices: uniform (`num_frames`), at `fps`, or every frame; capped by `max_frames`."""
    return _plan(info, num_frames, fps, start, end, max_frames)[0]


def _plan(info: VideoInfo, num_frames, fps, start, end, max_frames) -> tuple[np.ndarray, float, float | None]:
    """The sampled indices, the span they cover in seconds, and the rate to report if the request was met (the
    requested fps when exactly round(span * fps) frames are taken, else None)."""
    check_positive("the number of frames", num_frames, whole=True)
    check_positive("fps", fps)
    check_positive("start", start, allow_zero=True)
    check_positive("end", end)
    check_positive("max_frames", max_frames, whole=True)
    t0 = 0.0 if start is None else start
    t1 = info.duration if end is None else min(end, info.duration)
    if t0 < 0:
        raise FlexSelectError(f"start must not be negative, got {t0}")
    if t0 >= info.duration:
        raise FlexSelectError(f"start {t0:.2f}s is beyond the end of the video ({info.duration:.2f}s)")
    if t1 <= t0:
        raise FlexSelectError(f"end ({t1:.2f}s) must be after start ({t0:.2f}s)")
    first = min(info.num_frames - 1, int(math.floor(t0 * info.fps)))
    span = max(1, min(info.num_frames, int(math.ceil(t1 * info.fps))) - first)
    if num_frames is not None:
        n = num_frames
    elif fps is not None:
        n = max(1, round((t1 - t0) * fps))
    else:
        n = span
    requested = n
    n = min(n, span, max_frames or n)
    # centres of n equal segments: floor((2i + 1) * span / (2n)), in integers so C++ computes the same
    idx = first + (2 * np.arange(n, dtype=np.int64) + 1) * span // (2 * n)
    met_fps = fps if num_frames is None and fps is not None and n == requested else None
    return np.unique(idx), span / info.fps, met_fps


def output_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(width, height) with the aspect kept, the longest side at most `max_side`, never upscaled, even sides."""
    if max_side is not None and max_side < 28:
        raise FlexSelectError(f"max_side must be at least 28 pixels, got {max_side}")
    scale = min(1.0, (max_side or max(width, height)) / max(width, height))
    return max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2)


def estimate_clip_bytes(info: VideoInfo, n_frames: int, max_side: int | None) -> int:
    w, h = output_size(info.width, info.height, max_side)
    return n_frames * w * h * 3


def load_clip(
    path: str | os.PathLike,
    num_frames: int | None = None,
    fps: float | None = None,
    start: float | None = None,
    end: float | None = None,
    max_frames: int | None = None,
    max_side: int | None = None,
    on_frame: Callable[[int, int], None] | None = None,
    decoder: Decoder = "auto",
) -> Clip:
    """Decode only the sampled frames. `on_frame(i, n)` runs after each frame (progress; may raise to cancel)."""
    info = probe(path, decoder)
    indices, span_s, met_fps = _plan(info, num_frames, fps, start, end, max_frames)

    def clip(frames: np.ndarray, kept: np.ndarray) -> Clip:
        rate = met_fps if met_fps is not None and len(kept) == len(indices) else len(kept) / span_s
        return Clip(frames, kept / info.fps, info.path, info, sample_fps=rate)

    w, h = output_size(info.width, info.height, max_side)
    decord = _decord() if decoder != "pyav" else None
    if decord is not None:
        try:
            return clip(_decode_decord(decord, info, indices, w, h, on_frame), indices)
        except _DecordFailed as e:
            if decoder == "decord":
                raise _unreadable(Path(info.path), e.__cause__) from None
            log.info("decord failed on %s (%s); decoding with PyAV", info.path, e.__cause__)
    return clip(*_decode_pyav(info, indices, w, h, on_frame))


class _DecordFailed(Exception):
    """A decord error, kept apart from exceptions of `on_frame` (e.g. ComfyUI's cancel), which propagate as they are."""


def _decode_decord(decord, info: VideoInfo, indices: np.ndarray, w: int, h: int, on_frame) -> np.ndarray:
    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    try:
        vr = decord.VideoReader(info.path, ctx=decord.cpu(0), width=w, height=h)
    except Exception as e:  # decord's errors are untyped
        raise _DecordFailed from e
    for s in range(0, len(indices), DECORD_CHUNK):
        batch = indices[s : s + DECORD_CHUNK]
        try:
            out[s : s + len(batch)] = vr.get_batch(batch.tolist()).asnumpy()
        except Exception as e:
            raise _DecordFailed from e
        if on_frame:
            for i in range(s, s + len(batch)):
                on_frame(i + 1, len(indices))
    return out


def _decode_pyav(info: VideoInfo, indices: np.ndarray, w: int, h: int, on_frame) -> tuple[np.ndarray, np.ndarray]:
    """Stream through the file, keeping only the wanted frames (converted and resized one at a time)."""
    import av

    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    wanted = {int(f): i for i, f in enumerate(indices)}
    got = 0
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for n, frame in enumerate(container.decode(stream)):
                if n in wanted:
                    out[wanted[n]] = frame.to_ndarray(format="rgb24", width=w, height=h)
                    got += 1
                    if on_frame:
                        on_frame(got, len(indices))
                if got == len(indices) or n >= indices[-1]:
                    break
    except av.FFmpegError as e:
        if got == 0:
            raise _unreadable(Path(info.path), e) from None
        log.warning("%s is damaged after frame %d; using the %d frames decoded before it", info.path, n, got)
    if got == 0:
        raise FlexSelectError(f"{info.path} contains no decodable video frames")
    if got < len(indices):  # a truncated file: keep what decoded, in order
        kept = np.array(sorted(f for f in wanted if f <= n))[:got]
        log.warning("%s: only %d of %d sampled frames could be decoded", info.path, got, len(indices))
        return out[:got], kept
    return out, indices


def write_video(
    path: str | os.PathLike, frames: Iterable[np.ndarray], fps: float, size: tuple[int, int], crf: int | None = None
) -> Path:
    """Encode uint8 RGB frames of `size` (width, height; even sides) with H.264 where PyAV has it, else MPEG-4;
    `crf` sets H.264's quality (10: near-lossless). Written under a temporary name and renamed, so a failed run
    never leaves a half-written video at `path`."""
    import av

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial" + path.suffix)
    try:
        with av.open(str(partial), "w") as container:
            stream = container.add_stream(
                "libx264" if "libx264" in av.codecs_available else "mpeg4", rate=Fraction(fps).limit_denominator(1000)
            )
            stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
            if crf is not None and stream.codec_context.name == "libx264":
                stream.options = {"crf": str(crf)}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def write_test_video(
    path: str | os.PathLike,
    num_frames: int = 48,
    fps: float = 8.0,
    width: int = 160,
    height: int = 96,
    seed: int = 0,
    needle_frames=(),
) -> Path:
    """A synthetic video with distinct moving content per frame; `needle_frames` show a big red square."""
    rng = np.random.default_rng(seed)
    colors = rng.integers(40, 200, size=(8, 3))
    yy, xx = np.mgrid[0:height, 0:width]
    needles = set(needle_frames)

    def frames():
        for i in range(num_frames):
            img = np.empty((height, width, 3), dtype=np.uint8)
            img[:] = colors[i % len(colors)]
            band = ((xx + 4 * i) // 16 + yy // 16) % 2 == 0  # a checkerboard drifting right
            img[band] = 255 - img[band]
            img[:, :, 1] = (img[:, :, 1].astype(int) + 3 * i) % 256
            if i in needles:
                img[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = (230, 20, 20)
            yield img

    return write_video(path, frames(), fps, (width, height))
