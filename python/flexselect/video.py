"""Video -> frames: probe a file, pick frames by presentation time, decode only those frames, resized while decoding.

decord is the chosen decoder on indexed containers (seeks and decodes just the sampled frames, resizing in the
decoder); PyAV streams through the others (MPEG-TS, raw streams, GIF) and is the fallback when decord is missing or
cannot read a file. Memory is one preallocated array of the sampled frames:
a 1-hour 1080p video never needs more than that. Videos are read as players show them, with the same rules as the
C++ runtime (cpp/src/video.cpp):
- time: `probe` reads every frame's presentation timestamp (a demux pass, no decoding); sampling picks the frame
  shown at the centres of n equal segments of the span (uniform; fps: n = round(span * fps)), so a variable frame
  rate video is sampled evenly in time, and clips carry the frames' true timestamps. A stream without timestamps
  (raw Annex-B .h264) is taken as evenly spaced at its frame rate. The clip's `sample_fps` is the requested rate
  when that many frames were taken, else the frames over the span's duration.
- rotation: the display matrix (phones' portrait videos) is applied, in quarter turns.
- damage: a packet that does not decode is skipped with a warning; the sampled frames that did decode are kept; no
  decodable sampled frame at all is an error.
- animated WebP is refused by name (FFmpeg decodes only still WebP); GIF, MPEG-TS and raw .h264 are read.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np

from .errors import FlexSelectError, check_positive

log = logging.getLogger("flexselect")

Decoder = Literal["auto", "decord", "pyav"]
DECORD_CHUNK = 32  # frames per get_batch call: bounds the decoder's own buffers
# Containers with an index decord seeks in reliably; on others (MPEG-TS, raw streams, GIF) decord opens the file
# but can return one frame for every index (seen on MPEG-TS), so PyAV streams through them.
DECORD_FORMATS = ("mov", "mp4", "matroska", "webm", "avi")
# Slack when comparing sampling times with frame times: far above double rounding (~1e-12 s over hours), far below
# any frame spacing, so a time on a frame boundary picks the same frame in Python and C++.
TIME_EPS = 1e-9


@dataclass(frozen=True)
class VideoInfo:
    path: str
    num_frames: int
    fps: float  # the stream's average rate
    duration: float  # end of the last frame, seconds from the first
    width: int  # as displayed (after the rotation)
    height: int
    # Presentation timestamps of the frames in the stream's time base, sorted; None: evenly spaced at `fps` (a stream
    # without timestamps, or frames in memory).
    pts: np.ndarray | None = field(default=None, repr=False, compare=False)
    time_base: Fraction = Fraction(0)
    rotation: int = 0  # degrees the display matrix turns the decoded picture counter-clockwise: 0, 90, 180 or 270
    container: str = ""  # FFmpeg's demuxer names ("mov,mp4,m4a,3gp,3g2,mj2", "mpegts")

    @property
    def frame_times(self) -> np.ndarray:
        """When each frame is shown, seconds from the first (integer product, one division: C++ gets the same)."""
        if self.pts is None:
            return np.arange(self.num_frames) / self.fps
        return ((self.pts - self.pts[0]) * self.time_base.numerator) / self.time_base.denominator


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


def probe(path: str | os.PathLike) -> VideoInfo:
    """Size, rotation and every frame's timestamp, from one demux pass (PyAV; no frame is decoded but the first)."""
    import av

    p = check_video_file(path)
    try:
        with av.open(str(p)) as container:
            if not container.streams.video:
                raise FlexSelectError(f"{p} has no video stream")
            stream = container.streams.video[0]
            if stream.codec_context.name == "webp":
                raise FlexSelectError(
                    f"{p} is a WebP image: animated WebP is not supported (FFmpeg decodes only still WebP images); "
                    "convert it to a video file (MP4, WebM or GIF) first"
                )
            rate = float(stream.average_rate or stream.guessed_rate or 25)
            # without timestamps, FFmpeg's guess (the codec's own rate: an H.264 stream's timing info) spaces frames
            untimed_rate = float(stream.guessed_rate or rate)
            pts, top, last_duration, rotation = [], None, 0, None
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                pts.append(packet.pts)
                if packet.pts is not None and (top is None or packet.pts >= top):
                    top, last_duration = packet.pts, packet.duration or 0
                if rotation is None and len(pts) <= 16:  # the display matrix comes with the first decoded frame
                    rotation = _rotation(packet)
            width, height, tb = stream.codec_context.width, stream.codec_context.height, stream.time_base
            container_format = container.format.name
            # where the stream ends, as its header says (packet durations differ between FFmpeg versions)
            known = stream.duration and stream.start_time is not None
            stream_end = stream.start_time + stream.duration if known else None
    except FlexSelectError:
        raise
    except Exception as e:
        raise _unreadable(p, e) from None
    if not pts or width <= 0 or height <= 0:
        raise FlexSelectError(f"{p} contains no decodable video frames")
    rotation = rotation or 0
    if rotation in (90, 270):
        width, height = height, width
    n = len(pts)
    ts = np.unique(np.asarray(pts, dtype=np.int64)) if None not in pts else ()
    if len(ts) < n:  # no timestamps (a raw Annex-B .h264 stream) or repeated ones: taken as evenly spaced
        return VideoInfo(
            str(p), n, untimed_rate, n / untimed_rate, width, height, rotation=rotation, container=container_format
        )
    info = VideoInfo(str(p), n, rate, 0.0, width, height, pts=ts, time_base=tb, rotation=rotation)
    times = info.frame_times
    # the end of the last frame: the stream's end, else its packet's duration, else the mean spacing, else one frame
    end = (stream_end - ts[0]) * tb.numerator / tb.denominator if stream_end is not None else 0.0
    if not end > times[-1]:
        end = times[-1] + last_duration * tb.numerator / tb.denominator
    if not end > times[-1]:
        end = times[-1] + (times[-1] / (n - 1) if n > 1 and times[-1] > 0 else 1.0 / rate)
    return VideoInfo(str(p), n, rate, float(end), width, height, ts, tb, rotation, container_format)


def _rotation(packet) -> int | None:
    """The display matrix's rotation in quarter turns (counter-clockwise degrees), once a frame decodes."""
    try:
        for frame in packet.decode():
            return round(float(frame.rotation or 0) / 90) % 4 * 90
    except Exception:  # damage is for decoding to report; a later frame tells the rotation
        pass
    return None


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
    times = info.frame_times
    # the span: from the frame shown at t0 to the end of the last frame shown before t1
    first = max(0, int(np.searchsorted(times, t0 + TIME_EPS, side="right")) - 1)
    stop = max(first + 1, int(np.searchsorted(times, t1 - TIME_EPS, side="left")))
    lo, hi = float(times[first]), float(times[stop]) if stop < len(times) else info.duration
    if num_frames is not None:
        n = num_frames
    elif fps is not None:
        n = max(1, round((t1 - t0) * fps))
    else:
        n = stop - first
    requested = n
    n = min(n, stop - first, max_frames or n)
    # the frames shown at the centres of n equal segments of the span (a long-shown frame is taken once)
    at = lo + (2 * np.arange(n) + 1) * (hi - lo) / (2 * n)
    idx = np.clip(np.searchsorted(times, at + TIME_EPS, side="right") - 1, first, stop - 1)
    met_fps = fps if num_frames is None and fps is not None and n == requested else None
    return np.unique(idx), hi - lo, met_fps


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
    info = probe(path)
    indices, span_s, met_fps = _plan(info, num_frames, fps, start, end, max_frames)
    times = info.frame_times

    def clip(frames: np.ndarray, kept: np.ndarray) -> Clip:
        rate = met_fps if met_fps is not None and len(kept) == len(indices) else len(kept) / span_s
        return Clip(frames, times[kept], info.path, info, sample_fps=rate)

    w, h = output_size(info.width, info.height, max_side)
    indexed = any(name in DECORD_FORMATS for name in info.container.split(","))
    decord = _decord() if decoder == "decord" or (decoder == "auto" and indexed) else None
    if decord is not None:
        try:
            return clip(_decode_decord(decord, info, indices, w, h, on_frame), indices)
        except _DecordFailed as e:
            if decoder == "decord":
                raise _unreadable(Path(info.path), e.__cause__ or e) from None
            log.info("decord failed on %s (%s); decoding with PyAV", info.path, e.__cause__ or e)
    return clip(*_decode_pyav(info, indices, w, h, on_frame))


class _DecordFailed(Exception):
    """A decord error, kept apart from exceptions of `on_frame` (e.g. ComfyUI's cancel), which propagate as they are."""


def _decode_decord(decord, info: VideoInfo, indices: np.ndarray, w: int, h: int, on_frame) -> np.ndarray:
    """decord seeks to each sampled frame; it applies the display rotation itself (w, h are the displayed size)."""
    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    try:
        vr = decord.VideoReader(info.path, ctx=decord.cpu(0), width=w, height=h)
    except Exception as e:  # decord's errors are untyped
        raise _DecordFailed from e
    if len(vr) != info.num_frames:  # decord counts frames otherwise than the timeline: indices would not match
        raise _DecordFailed(f"decord sees {len(vr)} frames, the demuxer {info.num_frames}")
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
    """Stream through the file, keeping only the wanted frames (converted, resized and rotated one at a time).

    Frames are matched by timestamp where the stream has them, so a packet that fails to decode (skipped, with a
    warning) shifts no later frame; a stream without timestamps is counted."""
    import av

    out = np.empty((len(indices), h, w, 3), dtype=np.uint8)
    keys = info.pts[indices] if info.pts is not None else indices
    wanted = {int(k): i for i, k in enumerate(keys)}
    last = int(keys[-1])
    got = np.zeros(len(indices), dtype=bool)
    dw, dh = (h, w) if info.rotation in (90, 270) else (w, h)  # the decoded picture, before it is turned
    bad, n, done = 0, -1, False
    try:
        with av.open(info.path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.FFmpegError:
                    bad += 1
                    continue
                for frame in frames:
                    n += 1
                    key = n if info.pts is None else frame.pts
                    if key is None:
                        continue
                    i = wanted.get(key)
                    if i is not None and not got[i]:
                        img = frame.to_ndarray(format="rgb24", width=dw, height=dh)
                        out[i] = np.rot90(img, info.rotation // 90) if info.rotation else img
                        got[i] = True
                        if on_frame:
                            on_frame(int(got.sum()), len(indices))
                    done = done or key >= last
                if done:
                    break
    except av.FFmpegError as e:  # the container itself breaks off: what decoded before is kept
        if not got.any():
            raise _unreadable(Path(info.path), e) from None
        log.warning("%s is damaged after frame %d; using the frames decoded before it", info.path, n)
    if bad:
        log.warning("%s: %d damaged packet(s) could not be decoded and were skipped", info.path, bad)
    if not got.any():
        raise FlexSelectError(f"{info.path}: none of the sampled frames could be decoded (the file is damaged)")
    if not got.all():
        log.warning("%s: only %d of %d sampled frames could be decoded", info.path, got.sum(), len(indices))
        return out[got], indices[got]
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
