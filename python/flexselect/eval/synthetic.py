"""Tiny stand-in datasets in each benchmark's published layout, for tests and for dry-running the harness.

Videos are empty placeholder files: they exist where the loaders look, but only a fake `answer_fn` can answer them.
Item i asks about clip i; its correct option is `COLOURS[i % len(COLOURS)]`, placed at index `correct_index(i, n)`
among `n` options, so a test can tell the right letter without reading the files back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import FlexSelectError
from .datasets import BENCHMARKS, LETTERS

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
VIDEOMME_TASKS = ("Counting Problem", "Object Recognition", "Temporal Reasoning")
VIDEOMME_DURATIONS = ("short", "medium", "long")
# The dev set's multiple-choice tasks, in file order; summary is a generation task (no candidates).
MLVU_TASKS = ("1_plotQA", "2_needle", "3_ego", "4_count", "5_order", "6_anomaly_reco", "7_topic_reasoning")
LVB_CATEGORIES = ("S2E", "E2O", "T3O")
LVB_DURATIONS = (15, 60, 600, 3600)
LVBENCH_TYPES = ("entity recognition", "event understanding", "key information retrieval")


def correct_index(i: int, n_options: int) -> int:
    return (3 * i + 1) % n_options


def n_options_for(benchmark: str, i: int) -> int:
    return 5 if benchmark == "longvideobench" and i % 2 else 4  # LongVideoBench mixes 4 and 5 candidates


def options_for(benchmark: str, i: int) -> list[str]:
    n = n_options_for(benchmark, i)
    right = COLOURS[i % len(COLOURS)]
    wrong = [c for c in COLOURS if c != right][: n - 1]
    k = correct_index(i, n)
    return [f"{c} ball" for c in wrong[:k] + [right] + wrong[k:]]


def make_mini_dataset(root: Path, benchmark: str, n_items: int) -> Path:
    """Write `n_items` questions of `benchmark` under `root` (annotations + placeholder videos); returns `root`."""
    writers = {"videomme": _videomme, "mlvu": _mlvu, "longvideobench": _longvideobench, "lvbench": _lvbench}
    if benchmark not in writers:
        raise FlexSelectError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    if n_items < 1:
        raise FlexSelectError(f"n_items must be >= 1, got {n_items}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    writers[benchmark](root, n_items)
    return root


def _question(i: int) -> str:
    return f"What colour is the ball in clip {i}?"


def _video(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1), encoding="utf-8")


def _videomme(root: Path, n: int) -> None:
    rows = []
    for i in range(n):
        video_idx = i // 3  # three questions per video, as in VideoMME
        video_id = f"vid{video_idx:05d}"
        options = options_for("videomme", i)
        rows.append(
            {
                "video_id": f"{video_idx + 1:03d}",
                "duration": VIDEOMME_DURATIONS[video_idx % 3],
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "url": f"https://www.youtube.com/watch?v={video_id}",
                "videoID": video_id,
                "question_id": f"{video_idx + 1:03d}-{i % 3 + 1}",
                "task_type": VIDEOMME_TASKS[i % 3],
                "question": _question(i),
                "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(options)],
                "answer": LETTERS[correct_index(i, len(options))],
            }
        )
        _video(root / "data" / f"{video_id}.mp4")
    _write_json(root / "videomme" / "test-00000-of-00001.json", rows)


def _mlvu(root: Path, n: int) -> None:
    tasks: dict[str, list[dict[str, Any]]] = {t: [] for t in MLVU_TASKS}
    for i in range(n):
        task = MLVU_TASKS[i % len(MLVU_TASKS)]
        options = options_for("mlvu", i)
        video = f"clip_{i}.mp4"
        tasks[task].append(
            {
                "video": video,
                "duration": 300 + i,
                "question": _question(i),
                "candidates": options,
                "answer": options[correct_index(i, len(options))],
                "question_type": task.split("_", 1)[1],
            }
        )
        _video(root / "video" / task / video)
    for task, entries in tasks.items():
        if entries:
            _write_json(root / "json" / f"{task}.json", entries)
    _write_json(
        root / "json" / "9_summary.json",
        [
            {
                "video": "clip_0.mp4",
                "duration": 300,
                "question": "Summarize the video.",
                "answer": "A ball rolls.",
                "question_type": "summary",
            }
        ],
    )


def _longvideobench(root: Path, n: int) -> None:
    rows = []
    for i in range(n):
        video_id = f"lvb{i:05d}"
        options = options_for("longvideobench", i)
        rows.append(
            {
                "video_id": video_id,
                "question": _question(i),
                "question_wo_referring_query": _question(i),
                "candidates": options,
                "correct_choice": correct_index(i, len(options)),
                "position": [0],
                "topic_category": "NP-News-Programs",
                "question_category": LVB_CATEGORIES[i % 3],
                "level": "L1-Perception",
                "id": f"{video_id}_0",
                "video_path": f"{video_id}.mp4",
                "subtitle_path": f"{video_id}_en.json",
                "duration_group": LVB_DURATIONS[i % 4],
                "starting_timestamp_for_subtitles": 0,
                "duration": float(LVB_DURATIONS[i % 4]),
            }
        )
        _video(root / "videos" / f"{video_id}.mp4")
    _write_json(root / "lvb_val.json", rows)


def _lvbench(root: Path, n: int) -> None:
    videos: list[dict[str, Any]] = []
    for i in range(n):
        if i % 2 == 0:  # two questions per video
            key = f"lvbench{i // 2:04d}"
            videos.append({"key": key, "type": "documentary", "video_info": {"duration_minutes": 70.0}, "qa": []})
            _video(root / "videos" / f"{key}.mp4")
        options = options_for("lvbench", i)
        text = _question(i) + "".join(f"\n({LETTERS[k]}) {o}" for k, o in enumerate(options))
        types = [LVBENCH_TYPES[i % 3]] + ([LVBENCH_TYPES[(i + 1) % 3]] if i % 4 == 3 else [])
        videos[-1]["qa"].append(
            {
                "uid": str(i),
                "question": text,
                "answer": LETTERS[correct_index(i, len(options))],
                "question_type": types,
                "time_reference": "00:10-00:20",
            }
        )
    (root / "video_info.meta.jsonl").write_text("".join(json.dumps(v) + "\n" for v in videos), encoding="utf-8")
