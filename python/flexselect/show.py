"""Show what the model will look at: the kept visual tokens as a red heatmap over the sampled frames.

A visual token covers one cell of the frame's token grid (Qwen2.5-VL: 28 x 28 pixels of the resized frame, and a
temporal unit of 2 sampled frames). `render_heatmaps` upsamples each unit's kept-token mask to the frame's pixels and
blends it: kept cells tinted red, dropped cells dimmed. `contact_sheet` tiles frames into one image with labels.
`write_animation` plays every sampled frame with its overlay as a GIF or MP4. Used by the ComfyUI nodes' preview and
the CLI's `flexselect show`. numpy and Pillow (PyAV for MP4); inputs are never changed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import FlexSelectError, check_positive

RED = np.array([255.0, 32.0, 32.0])


def _kept_indices(selection) -> np.ndarray:
    kept = getattr(selection, "kept", selection)
    if hasattr(kept, "detach"):  # torch tensor, without importing torch here
        kept = kept.detach().cpu().numpy()
    return np.asarray(kept, dtype=np.int64).reshape(-1)


def kept_mask(visual, selection) -> np.ndarray:
    """bool [units, rows, cols]: True where a visual token is kept."""
    rows, cols = visual.grid
    units = visual.num_frames
    kept = _kept_indices(selection)
    per_frame = visual.tokens_per_frame
    total = units * per_frame
    if kept.size and (kept.min() < 0 or kept.max() >= total):
        raise FlexSelectError(
            f"the selection keeps token {int(kept.max())} but the video has only {total} visual tokens: "
            "the selection belongs to other visual tokens"
        )
    mask = np.zeros(total, dtype=bool)
    mask[kept] = True
    # Families that wrap each frame's grid in delimiter tokens (InternVL's <img> ... </img>) have one before it.
    lead = getattr(visual, "frame_delimiters", 0) // 2
    return mask.reshape(units, per_frame)[:, lead : lead + rows * cols].reshape(units, rows, cols)


def frame_units(num_frames: int, num_units: int) -> np.ndarray:
    """Temporal unit of each sampled frame: frames are grouped evenly (Qwen2.5-VL: frames 2u and 2u+1 -> unit u)."""
    return (np.arange(num_frames) * num_units) // max(num_frames, 1)


def render_heatmaps(
    clip_frames: np.ndarray,
    visual,
    selection,
    frames: Sequence[int] | None = None,
    alpha: float = 0.45,
    dim: float = 0.45,
) -> np.ndarray:
    """Per-frame overlays, uint8 [N, H, W, 3]: kept tokens blended red, dropped tokens darkened.

    clip_frames: uint8 [N, H, W, 3], the frames the visual tokens were encoded from (any size: the token grid is
    stretched over the whole frame, as the model resized the whole frame). visual: `VisualTokens` (grid,
    num_frames). selection: a `Selection` (its `.kept`) or the kept global token indices. frames: render only these
    frame indices (default: all), e.g. an even subsample for a small preview.
    """
    clip_frames = np.asarray(clip_frames)
    if clip_frames.ndim != 4 or clip_frames.shape[-1] != 3:
        raise FlexSelectError(f"frames must be [N, H, W, 3], got shape {tuple(clip_frames.shape)}")
    n, h, w, _ = clip_frames.shape
    if n == 0:
        raise FlexSelectError("no frames to render")
    if n < visual.num_frames:
        raise FlexSelectError(
            f"{n} frames cannot cover {visual.num_frames} temporal units: pass the clip the tokens were encoded from"
        )
    mask = kept_mask(visual, selection)
    units = frame_units(n, visual.num_frames)
    picked = np.arange(n) if frames is None else np.asarray(list(frames), dtype=np.int64)
    if picked.size and (picked.min() < 0 or picked.max() >= n):
        raise FlexSelectError(f"frame index out of range 0..{n - 1}")
    rows, cols = visual.grid
    row_of = np.minimum((np.arange(h) * rows) // h, rows - 1)
    col_of = np.minimum((np.arange(w) * cols) // w, cols - 1)
    out = np.empty((len(picked), h, w, 3), dtype=np.uint8)
    for k, i in enumerate(picked):
        cell = mask[units[i]][row_of[:, None], col_of[None, :]]  # [h, w] nearest-neighbour upsample
        img = clip_frames[i].astype(np.float32)
        tinted = img * (1.0 - alpha) + RED * alpha
        dimmed = img * dim
        out[k] = np.clip(np.where(cell[..., None], tinted, dimmed), 0, 255).round().astype(np.uint8)
    return out


def even_subsample(n: int, k: int) -> np.ndarray:
    """k (or n if fewer) frame indices spread evenly over 0..n-1, always including the first and last."""
    if k <= 0 or n <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= n:
        return np.arange(n)
    if k == 1:
        return np.array([0])
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def contact_sheet(
    images: np.ndarray,
    columns: int | None = None,
    labels: Sequence[str] | None = None,
    gap: int = 4,
    background: int = 24,
    max_width: int | None = 2048,
) -> np.ndarray:
    """Tile uint8 [N, H, W, 3] images into one uint8 [H', W', 3] sheet, each with an optional label in its corner.

    columns: default ~sqrt(N) (wider than tall). max_width: tiles are shrunk so the sheet is at most this wide.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.shape[0] == 0:
        raise FlexSelectError(f"contact_sheet needs images [N, H, W, 3] with N > 0, got {tuple(images.shape)}")
    if labels is not None and len(labels) != images.shape[0]:
        raise FlexSelectError(f"{len(labels)} labels for {images.shape[0]} images")
    from PIL import Image, ImageDraw

    n, h, w, _ = images.shape
    columns = max(1, min(n, columns or math.ceil(math.sqrt(n * 1.5))))
    rows = math.ceil(n / columns)
    scale = 1.0
    if max_width and columns * w + (columns + 1) * gap > max_width:
        scale = max(1, (max_width - (columns + 1) * gap) // columns) / w
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    sheet = Image.new("RGB", (columns * tw + (columns + 1) * gap, rows * th + (rows + 1) * gap), (background,) * 3)
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        tile = Image.fromarray(np.ascontiguousarray(images[i].astype(np.uint8)))
        if (tw, th) != (w, h):
            tile = tile.resize((tw, th), Image.BILINEAR)
        x = gap + (i % columns) * (tw + gap)
        y = gap + (i // columns) * (th + gap)
        sheet.paste(tile, (x, y))
        if labels is not None and labels[i]:
            _label(draw, x, y, labels[i])
    return np.asarray(sheet, dtype=np.uint8).copy()


def _label(draw, x: int, y: int, text: str) -> None:
    """White text on a black box at the tile's top-left corner."""
    box = draw.textbbox((x + 2, y + 1), text)
    draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=(0, 0, 0))
    draw.text((x + 2, y + 1), text, fill=(255, 255, 255))


def frame_labels(visual, selection, frames: Sequence[int], num_frames: int, timestamps=None) -> list[str]:
    """'12.5s 34/120' per frame: its time and how many of its unit's tokens are kept."""
    mask = kept_mask(visual, selection)
    units = frame_units(num_frames, visual.num_frames)
    per_unit = mask.reshape(visual.num_frames, -1).sum(axis=1)
    tpf = visual.tokens_per_frame
    labels = []
    for i in frames:
        u = units[i]
        t = timestamps[i] if timestamps is not None and len(timestamps) == num_frames else None
        if t is None and len(visual.timestamps) == visual.num_frames:
            t = visual.timestamps[u]
        when = f"{float(t):.1f}s " if t is not None else ""
        labels.append(f"{when}{int(per_unit[u])}/{tpf}")
    return labels


def selection_sheet(
    clip_frames: np.ndarray,
    visual,
    selection,
    max_frames: int = 16,
    timestamps=None,
    columns: int | None = None,
    max_width: int | None = 2048,
) -> np.ndarray:
    """One contact sheet of `max_frames` evenly spaced overlays, labelled with time and kept/total tokens."""
    n = len(clip_frames)
    picked = even_subsample(n, max_frames)
    overlays = render_heatmaps(clip_frames, visual, selection, frames=picked)
    labels = frame_labels(visual, selection, picked, n, timestamps)
    return contact_sheet(overlays, columns=columns, labels=labels, max_width=max_width)


def write_animation(
    path: str | os.PathLike,
    clip_frames: np.ndarray,
    visual,
    selection,
    fps: float = 4.0,
    timestamps=None,
    max_side: int = 480,
) -> Path:
    """Every sampled frame with its overlay and label, as a GIF (Pillow) or an MP4 (PyAV), one frame in memory at a
    time. Written under a temporary name and renamed, so a failed run never leaves a half-written file at `path`."""
    from PIL import Image, ImageDraw

    path = Path(path)
    kind = path.suffix.lower()
    if kind not in (".gif", ".mp4"):
        raise FlexSelectError(f"cannot write {path.name}: the animation is a .gif or an .mp4")
    check_positive("the animation's fps", fps)
    n = len(clip_frames)
    labels = frame_labels(visual, selection, range(n), n, timestamps)
    h, w = np.asarray(clip_frames[0]).shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(2, round(w * scale) // 2 * 2), max(2, round(h * scale) // 2 * 2))  # even sides for H.264

    def overlays():
        for i in range(n):
            img = Image.fromarray(render_heatmaps(clip_frames, visual, selection, frames=[i])[0])
            img = img.resize(size, Image.BILINEAR) if img.size != size else img
            _label(ImageDraw.Draw(img), 0, 0, labels[i])
            yield img

    if kind == ".mp4":
        from .video import write_video

        return write_video(path, (np.asarray(img) for img in overlays()), fps, size)
    partial = path.with_name(path.name + ".partial" + kind)
    try:
        frames = overlays()
        next(frames).save(partial, save_all=True, append_images=frames, duration=round(1000 / fps), loop=0)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path
