"""Video indexes: each frame set's question-independent scoring state, kept so follow-up questions are cheap.

An index belongs to one video's visual tokens (one model, one sampling) and one (reference layer, set size, prompt
prefix); it is never reused for anything else. The backend says how a set's state is built and scored
(`index_set`, `score_indexed`, `index_bytes`); this module decides where indexes live and when they are dropped:

* the size is known before anything is built (`index_bytes`), and an index that would exceed the memory limit is
  refused with a one-line notice: the question is then scored without one (same result, no saving);
* an index lives on the GPU when it fits beside the model, else in CPU memory (moved to the GPU one set at a time);
* whole videos are evicted least-recently-used to make room; an index never outlives its visual tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import FlexSelectError

log = logging.getLogger("flexselect")

GPU_RESERVE = 0.2  # share of free GPU memory an index leaves for the passes themselves
FORMAT_VERSION = 1


def default_limit_bytes() -> int:
    """Half of the memory the system has available now: room for the model's passes and everything else."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError):
        return 4 << 30


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


@dataclass(frozen=True)
class IndexKey:
    layer: int
    set_frames: int
    prefix: tuple[int, ...]  # the prompt before the video: part of every set's cached context


@dataclass
class VideoIndex:
    key: IndexKey
    sets: dict[tuple[int, ...], object] = field(default_factory=dict)  # frames -> the backend's set index
    device: str = "cpu"
    planned_bytes: int = 0
    manifest: dict = field(default_factory=dict)  # set when saved to / loaded from disk

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.sets.values())

    @property
    def build_s(self) -> float:
        return sum(s.build_s for s in self.sets.values())


class IndexStore:
    """Indexes of a model's recent videos, bounded by `limit_bytes` (whole videos evicted LRU)."""

    def __init__(self, limit_bytes: int | None = None) -> None:
        self.limit_bytes = default_limit_bytes() if limit_bytes is None else int(limit_bytes)
        self._videos: OrderedDict[int, tuple[weakref.ref, dict[IndexKey, VideoIndex]]] = OrderedDict()

    @property
    def nbytes(self) -> int:
        return sum(ix.planned_bytes for _, d in self._videos.values() for ix in d.values())

    def get(self, visual, key: IndexKey) -> VideoIndex | None:
        entry = self._videos.get(id(visual))
        if entry is None or entry[0]() is not visual:
            return None
        self._videos.move_to_end(id(visual))
        return entry[1].get(key)

    def reserve(
        self, visual, key: IndexKey, planned_bytes: int, gpu: torch.device | None
    ) -> tuple[VideoIndex | None, str | None]:
        """Room for a new index of `planned_bytes` (evicting older videos), or None and a one-line notice (also
        logged) saying why the question is scored without one."""
        notice = None
        if planned_bytes > self.limit_bytes:
            notice = (
                f"the index of this video would take {gib(planned_bytes)}, more than the index memory limit of "
                f"{gib(self.limit_bytes)} (--index-memory): scoring without an index"
            )
        else:
            while self._videos and self.nbytes + planned_bytes > self.limit_bytes:
                self._drop_oldest(keep=visual)
            if self.nbytes + planned_bytes > self.limit_bytes:
                notice = (
                    f"the index of this video would take {gib(planned_bytes)} and its other indexes fill the "
                    f"limit of {gib(self.limit_bytes)}: scoring without an index"
                )
        if notice:
            log.warning(notice)
            return None, notice
        index = VideoIndex(key, device=self.placement(planned_bytes, gpu), planned_bytes=planned_bytes)
        self._put(visual, index)
        return index, None

    def put(self, visual, index: VideoIndex) -> None:
        """Register a finished index (loaded from disk), evicting older videos to make room."""
        if index.planned_bytes > self.limit_bytes:
            raise FlexSelectError(
                f"the index takes {gib(index.planned_bytes)}, more than the index memory limit of "
                f"{gib(self.limit_bytes)}: raise --index-memory"
            )
        while self._videos and self.nbytes + index.planned_bytes > self.limit_bytes:
            self._drop_oldest(keep=None)
        self._put(visual, index)

    def discard(self, visual, key: IndexKey) -> None:
        entry = self._videos.get(id(visual))
        if entry is not None and entry[0]() is visual:
            entry[1].pop(key, None)
            if not entry[1]:
                del self._videos[id(visual)]

    def clear(self) -> int:
        n = sum(len(d) for _, d in self._videos.values())
        self._videos.clear()
        return n

    def _put(self, visual, index: VideoIndex) -> None:
        vid = id(visual)
        entry = self._videos.get(vid)
        if entry is None or entry[0]() is not visual:
            ref = weakref.ref(visual, lambda _r, vid=vid, store=weakref.ref(self): store() and store()._forget(vid, _r))
            entry = self._videos[vid] = (ref, {})
        entry[1][index.key] = index
        self._videos.move_to_end(vid)

    def _forget(self, vid: int, ref) -> None:
        entry = self._videos.get(vid)
        if entry is not None and entry[0] is ref:
            del self._videos[vid]

    def _drop_oldest(self, keep) -> None:
        for vid, (ref, _) in self._videos.items():
            if keep is None or ref() is not keep:
                del self._videos[vid]
                return
        # only `keep`'s own indexes are left: drop its least recently made one
        vid = next(iter(self._videos))
        indexes = self._videos[vid][1]
        indexes.pop(next(iter(indexes)))
        if not indexes:
            del self._videos[vid]

    def placement(self, planned_bytes: int, gpu: torch.device | None) -> str:
        if gpu is None or gpu.type != "cuda":
            return "cpu"
        free, _ = torch.cuda.mem_get_info(gpu)
        on_gpu = sum(ix.planned_bytes for _, d in self._videos.values() for ix in d.values() if ix.device != "cpu")
        return str(gpu) if planned_bytes + on_gpu <= free * (1 - GPU_RESERVE) else "cpu"


def file_identity(path: str | os.PathLike) -> dict:
    """Size and a hash of the first and last MiB: the same file wherever it is copied, another file otherwise."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return {"name": path.name, "size": size, "sha256": h.hexdigest()}


# -- on disk ------------------------------------------------------------------------------------------------------
def write_index(path: str | os.PathLike, tensors: dict[str, torch.Tensor], manifest: dict) -> Path:
    """An index file: safetensors with the manifest in its metadata, written beside `path` and renamed into place
    (never a half-written file at `path`)."""
    from safetensors.torch import save_file

    path = Path(path)
    if not path.parent.is_dir():
        raise FlexSelectError(f"cannot write {path}: the folder {path.parent} does not exist")
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(
            {k: v.contiguous().cpu() for k, v in tensors.items()},
            str(partial),
            metadata={"flexselect_index": json.dumps({"format": FORMAT_VERSION, **manifest})},
        )
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def read_index(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FlexSelectError(f"index not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = (f.metadata() or {}).get("flexselect_index")
            if meta is None:
                raise FlexSelectError(f"{path} is a safetensors file but not a FlexSelect index")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FlexSelectError(
            f"{path} is not a readable FlexSelect index (truncated or damaged: {e}); rebuild it with `flexselect index`"
        ) from None
    manifest = json.loads(meta)
    if manifest.get("format") != FORMAT_VERSION:
        raise FlexSelectError(
            f"{path} is a FlexSelect index of format {manifest.get('format')}, this version reads "
            f"format {FORMAT_VERSION}: rebuild it with `flexselect index`"
        )
    return manifest, tensors


def difference(name: str, theirs, ours) -> str:
    """What differs between an index's manifest entry and this run's, briefly."""

    def short(v) -> str:
        text = json.dumps(v)
        return text if len(text) <= 24 else text[:21] + "..."

    if isinstance(theirs, dict) and isinstance(ours, dict):
        keys = [k for k in {**theirs, **ours} if theirs.get(k) != ours.get(k)]
        return ", ".join(difference(k, theirs.get(k), ours.get(k)) for k in keys)
    return f"{name} {short(theirs)} there, {short(ours)} here"


def visual_manifest(visual) -> dict:
    return {
        "class": type(visual).__name__,
        "num_frames": visual.num_frames,
        "grid": list(visual.grid),
        "timestamps": visual.timestamps.tolist(),
        "time_interval": visual.time_interval,
        "frame_size": list(visual.frame_size),
        "source": visual.source,
        "frames_per_unit": visual.frames_per_unit,
    }


def visual_from_manifest(m: dict, embeds: torch.Tensor):
    from .backends.base import VisualTokens

    kinds = {VisualTokens.__name__: VisualTokens}
    todo = [VisualTokens]
    while todo:  # the loaded backends' own kinds (InternVL's framed tokens), never an arbitrary import
        for sub in todo.pop().__subclasses__():
            kinds[sub.__name__] = sub
            todo.append(sub)
    cls = kinds.get(m["class"])
    if cls is None:
        raise FlexSelectError(f"the index holds {m['class']} visual tokens, which this model does not make")
    return cls(
        embeds=embeds,
        num_frames=m["num_frames"],
        grid=tuple(m["grid"]),
        timestamps=np.asarray(m["timestamps"]),
        time_interval=m["time_interval"],
        frame_size=tuple(m["frame_size"]),
        source=m["source"],
        frames_per_unit=m["frames_per_unit"],
    )
