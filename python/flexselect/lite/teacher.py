"""Teacher data for FlexSelect-Lite (`flexselect lite-teacher`): the big model's reference-layer scores.

For each (video, question) pair of a JSONL file (`{"video": "rel/path.mp4", "question": "..."}` per line), the
video is sampled (64 frames by default, the paper's training setting), encoded once, and scored as ONE frame set
by the backend's reference layer (`Backend.score`). Each example stores what the ranker will read for that set,
built by the layout's own `build_inputs` (layouts.py) with the host's tokenizer, and the teacher's scores:
    <key>.input_ids, <key>.vision_features (bfloat16 by default: half the disk), <key>.visual_rows,
    <key>.position_ids, <key>.score_columns      the RankerInputs of the set
    <key>.scores  [S] float32                     the teacher scores, in score_columns order
in safetensors shards `shard-00000.safetensors`, ...; the shard's metadata lists its examples. `teacher.json`
records the host, the layout and the teacher settings, so data from different models or layers is never mixed.
The layout is the host family's authors' layout by default (vision features before the host's projector, so
the video is encoded with `encode_with_vision_features`), or `host_embeds` for rankers the C++ runtime can run.

Resumable: an example whose key (hash of video path and question) is in any shard is skipped. Shards are written
to a temporary name and renamed, so an interrupted run leaves only whole shards; at most one shard's worth of
examples is recomputed. Examples that fail (missing or unreadable video) are reported and left for the next run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..backends.base import resolve_reference_layer
from ..defaults import AGGREGATE, SET_FRAMES
from ..errors import FlexSelectError
from ..selection import frame_sets
from .bundle import write_atomic
from .host import HostInfo, host_info, host_tokenizer
from .layouts import INPUTS, build_inputs
from .ranker import default_layout

if TYPE_CHECKING:
    from ..backends.base import Backend

FORMAT = "flexselect-lite-teacher/2"
SETTINGS = "teacher.json"
TRAIN_FRAMES = 64  # sampled frames per example (the paper's "at most 64 frames, one set")


@dataclass
class TeacherSummary:
    written: int = 0
    skipped_done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (video, why)
    shards: int = 0


def example_key(video: str, question: str) -> str:
    return hashlib.sha1(f"{video}\0{question}".encode()).hexdigest()[:16]


def read_pairs(path: Path) -> list[dict]:
    """The (video, question) pairs of a JSONL file, each with its key; duplicates are kept once."""
    if not path.is_file():
        raise FlexSelectError(f"pairs file not found: {path}")
    pairs, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            video, question = row["video"], row["question"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise FlexSelectError(
                f'{path}:{n}: expected a JSON object {{"video": "rel/path.mp4", "question": "..."}}'
            ) from None
        if not isinstance(video, str) or not isinstance(question, str) or not question.strip():
            raise FlexSelectError(f"{path}:{n}: video and question must be non-empty strings")
        key = example_key(video, question.strip())
        if key not in seen:
            seen.add(key)
            pairs.append({"key": key, "video": video, "question": question.strip()})
    if not pairs:
        raise FlexSelectError(f"{path} has no (video, question) pairs")
    return pairs


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("shard-*.safetensors"))


def shard_examples(path: Path) -> list[dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        examples = json.loads(meta["examples"])
    except Exception as e:  # a shard is only ever renamed into place whole, so this is outside damage
        raise FlexSelectError(
            f"{path} is not a readable teacher shard ({e}); delete it and run lite-teacher again"
        ) from None
    return examples


def check_settings(folder: Path, settings: dict) -> None:
    """Write teacher.json, or check that the folder's data came from the same host and settings."""
    path = folder / SETTINGS
    if path.is_file():
        old = json.loads(path.read_text())
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
            raise FlexSelectError(
                f"{folder} holds teacher data made with other settings ({detail}); use a new output folder"
            )
    else:
        write_atomic(path, json.dumps(settings, indent=2).encode())


def build_teacher_data(
    backend: Backend,
    pairs_file: str | os.PathLike,
    video_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    frames: int = TRAIN_FRAMES,
    max_side: int | None = None,
    layer: int | None = None,
    aggregate: str = AGGREGATE,
    shard_size: int = 64,
    store_dtype: torch.dtype = torch.bfloat16,
    limit: int | None = None,
    loader: Callable[[Path], Any] | None = None,
    show_progress: bool = True,
    layout: str | None = None,
) -> TeacherSummary:
    """Score every pending pair with the backend's reference layer and write shards (see module docstring).

    `loader(path) -> Clip` decodes a video (default: `flexselect.video.load_clip` with `frames` and `max_side`).
    """
    from safetensors.torch import save
    from tqdm import tqdm

    if loader is None:
        from ..video import load_clip

        side = max_side or backend.defaults.max_side

        def loader(path: Path):
            return load_clip(path, num_frames=frames, max_side=side)

    out, videos = Path(out_dir), Path(video_dir)
    out.mkdir(parents=True, exist_ok=True)
    layer = resolve_reference_layer(backend, layer)
    layout = layout or default_layout(backend.family)
    reads = "embeds" if layout == "host_embeds" else "vision_features"
    host = host_info(backend, reads)
    special = special_token_ids(backend) if layout == "internvl" else {}
    check_settings(
        out,
        {
            "format": FORMAT,
            "host": host.to_dict(),
            "layout": layout,
            "special_ids": special,
            "layer": layer,
            "aggregate": aggregate,
            "frames": frames,
            "set_frames": SET_FRAMES,
        },
    )
    encode = backend.encode if reads == "embeds" else backend.encode_with_vision_features
    done = {ex["key"] for shard in shard_files(out) for ex in shard_examples(shard)}
    pairs = read_pairs(Path(pairs_file))
    pending = [p for p in pairs if p["key"] not in done]
    summary = TeacherSummary(skipped_done=len(pairs) - len(pending))
    if limit is not None:
        pending = pending[:limit]
    tokenize = host_tokenizer(backend)
    next_index = max((int(p.stem.split("-")[1]) for p in shard_files(out)), default=-1) + 1
    tensors: dict[str, torch.Tensor] = {}
    examples: list[dict] = []

    def flush() -> None:
        nonlocal next_index, tensors, examples
        if not examples:
            return
        meta = {"format": FORMAT, "examples": json.dumps(examples)}
        write_atomic(out / f"shard-{next_index:05d}.safetensors", save(tensors, metadata=meta))
        next_index += 1
        summary.shards += 1
        tensors, examples = {}, []

    bar = tqdm(pending, desc="teacher", unit="ex", disable=not show_progress or None)
    try:
        for pair in bar:
            try:
                path = videos / pair["video"]
                if not path.is_file():
                    raise FlexSelectError(f"video not found: {path}")
                visual = encode(loader(path))
                units = frame_sets(visual.num_frames, SET_FRAMES)[0]  # one set, as the paper trained
                prompt = backend.prompt(pair["question"])
                scores = backend.score(visual, units, prompt, layer, aggregate)
                inputs = build_inputs(layout, visual, units, prompt, lambda ids: ids.long(), tokenize, special)
            except FlexSelectError as e:
                summary.failed.append((pair["video"], str(e)))
                bar.write(f"lite-teacher: skipped {pair['video']}: {e}")
                continue
            key = pair["key"]
            for name, tensor in zip(INPUTS, inputs.as_tuple()):
                tensor = tensor.to(store_dtype) if tensor.is_floating_point() else tensor
                tensors[f"{key}.{name}"] = tensor.cpu().clone()  # a layout may share one tensor between fields
            tensors[f"{key}.scores"] = scores.float().cpu().contiguous()
            examples.append({**pair, "units": len(units), "tokens_per_frame": visual.tokens_per_frame})
            summary.written += 1
            if len(examples) >= shard_size:
                flush()
    finally:
        flush()  # whatever finished is kept, even when interrupted
        bar.close()
    return summary


class TeacherData:
    """The examples of a teacher folder, read lazily one at a time (a shard is opened per access)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        settings_file = self.folder / SETTINGS
        if not settings_file.is_file():
            raise FlexSelectError(f"{self.folder} has no {SETTINGS}: make teacher data with flexselect lite-teacher")
        self.settings = json.loads(settings_file.read_text())
        if self.settings.get("format") != FORMAT:
            raise FlexSelectError(
                f"{self.folder} holds teacher data of format {self.settings.get('format')!r}; this "
                f"flexselect trains on {FORMAT!r}: run flexselect lite-teacher into a new folder"
            )
        self.host = HostInfo(**self.settings["host"])
        self.layout: str = self.settings["layout"]
        self.special_ids: dict[str, int] = self.settings.get("special_ids") or {}
        self.index: list[tuple[Path, dict]] = [(s, ex) for s in shard_files(self.folder) for ex in shard_examples(s)]
        if not self.index:
            raise FlexSelectError(f"{self.folder} has no teacher shards yet: run flexselect lite-teacher")

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        shard, ex = self.index[i]
        key = ex["key"]
        with safe_open(str(shard), "pt") as f:
            return {name: f.get_tensor(f"{key}.{name}") for name in (*INPUTS, "scores")}


def special_token_ids(backend: Backend) -> dict[str, int]:
    """The host's own ids of InternVL's frame delimiters (a trained InternVL ranker shares the host's tokenizer)."""
    ids = backend.tokenizer.convert_tokens_to_ids(["<img>", "</img>"])
    return {"<img>": ids[0], "</img>": ids[1]}
