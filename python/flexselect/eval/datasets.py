"""Loaders for the four benchmarks' published local annotation formats, all turned into one `Item` shape.

`data_root` is the folder the user downloaded a benchmark into:

- videomme: `videomme/test-00000-of-00001.parquet` (the Hugging Face dataset; needs pyarrow or pandas) or the same
  records as JSON / JSONL (a list of rows with videoID, question_id, duration, domain, task_type, question,
  options ["A. ...", ...], answer "A"); videos `data/<videoID>.mp4` (the unzipped chunks) or `videos/<videoID>.mp4`.
- mlvu: `json/<n>_<task>.json` (the dev set) with {video, question, candidates, answer (text), question_type};
  videos `video/<n>_<task>/<video>`. `data_root` may also be the folder holding `MLVU/`. Only the multiple-choice
  tasks are loaded (the generation tasks have no candidates).
- longvideobench: `lvb_val.json` with {id, video_path, question, candidates, correct_choice, duration_group,
  question_category}; videos `videos/<video_path>`.
- lvbench: `video_info.meta.jsonl`, one video a line {key, qa: [{uid, question "... (A) ... (B) ...", answer "A",
  question_type [...]}]}; videos `videos/<key>.mp4`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FlexSelectError

BENCHMARKS = ("videomme", "mlvu", "longvideobench", "lvbench")
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# An LVBench question can have several types; it counts towards each of them in the per-category breakdown.
CATEGORY_SEP = " | "
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass(frozen=True)
class Item:
    """One multiple-choice question about one video; `answer` is the correct option's letter."""

    benchmark: str
    item_id: str
    video: Path
    question: str
    options: list[str]
    answer: str
    category: str
    duration_group: str | None = None


def load_benchmark(benchmark: str, data_root: Path, skip_missing_videos: bool = False) -> list[Item]:
    """All items of `benchmark` under `data_root`, in annotation order.

    A missing video is an error naming it (and how many others are missing) unless `skip_missing_videos`, which
    drops those items: partial downloads are common, but a silently smaller test set would skew the table.
    """
    loaders: dict[str, Callable[[Path], list[Item]]] = {
        "videomme": _load_videomme,
        "mlvu": _load_mlvu,
        "longvideobench": _load_longvideobench,
        "lvbench": _load_lvbench,
    }
    if benchmark not in loaders:
        raise FlexSelectError(f"unknown benchmark {benchmark!r}; choose one of {', '.join(BENCHMARKS)}")
    root = Path(data_root)
    if not root.is_dir():
        raise FlexSelectError(f"{benchmark} data folder {root} does not exist")
    items = loaders[benchmark](root)
    seen: set[str] = set()
    for item in items:
        if item.item_id in seen:
            raise FlexSelectError(f"{benchmark}: question id {item.item_id!r} appears twice in the annotations")
        seen.add(item.item_id)
    present = [item for item in items if item.video.is_file()]
    if len(present) < len(items) and not skip_missing_videos:
        first = next(item for item in items if not item.video.is_file())
        raise FlexSelectError(
            f"{benchmark}: video {first.video} not found ({len(items) - len(present)} of "
            f"{len(items)} questions have no video); download them or skip those questions"
        )
    return present


# ---- VideoMME ------------------------------------------------------------------------------------------------


def _load_videomme(root: Path) -> list[Item]:
    rows = _read_table_dir(root, [root / "videomme", root], "videomme/test-00000-of-00001.parquet")
    items = []
    for i, row in enumerate(rows):
        where = f"VideoMME row {i}"
        vid = str(_field(row, "videoID", where))
        options = [re.sub(r"^\s*\(?[A-Z][.):]\s*", "", str(o)) for o in _field(row, "options", where)]
        items.append(
            Item(
                benchmark="videomme",
                item_id=str(_field(row, "question_id", where)),
                video=_find_video(root, vid, ["data", "videos", "video", "."]),
                question=str(_field(row, "question", where)).strip(),
                options=options,
                answer=_check_letter(_field(row, "answer", where), len(options), where),
                category=str(row.get("task_type") or ""),
                duration_group=_opt_str(row.get("duration")),
            )
        )
    return items


def _read_table_dir(root: Path, dirs: list[Path], expected: str) -> list[dict[str, Any]]:
    """Rows of the first folder in `dirs` holding parquet shards, a JSONL or a JSON file (parquet preferred)."""
    for folder in dirs:
        if not folder.is_dir():
            continue
        for pattern, reader in (("*.parquet", _read_parquet), ("*.jsonl", _read_jsonl), ("*.json", _read_json_list)):
            files = sorted(folder.glob(pattern))
            if files:
                rows: list[dict[str, Any]] = []
                for f in files:
                    rows.extend(reader(f))
                return rows
    raise FlexSelectError(f"no annotation file found: expected {root / expected} (or the same rows as .json/.jsonl)")


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    # Optional readers only: the VideoMME parquet is the one place they are needed, and JSON works without them.
    try:
        import pyarrow.parquet as pq
    except ImportError:
        try:
            import pandas as pd
        except ImportError:
            raise FlexSelectError(
                f"reading {path} needs pyarrow (pip install pyarrow), or convert it to JSON records next to it"
            ) from None
        return [_plain(r) for r in pd.read_parquet(path).to_dict(orient="records")]
    return [_plain(r) for r in pq.read_table(path).to_pylist()]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    # pandas gives numpy arrays for list columns.
    return {k: (v.tolist() if hasattr(v, "tolist") and not isinstance(v, (str, bytes)) else v) for k, v in row.items()}


# ---- MLVU ------------------------------------------------------------------------------------------------------


def _load_mlvu(root: Path) -> list[Item]:
    if not (root / "json").is_dir() and (root / "MLVU" / "json").is_dir():
        root = root / "MLVU"
    files = sorted((root / "json").glob("*.json")) if (root / "json").is_dir() else []
    if not files:
        raise FlexSelectError(f"no annotation file found: expected {root / 'json' / '1_plotQA.json'} (MLVU dev)")
    items = []
    for path in files:
        task_dir = path.stem  # "1_plotQA": also the video folder's name
        for i, row in enumerate(_read_json_list(path)):
            where = f"{path} entry {i}"
            candidates = row.get("candidates")
            if not candidates:
                continue  # generation tasks (sub_scene, summary) are not multiple choice
            options = [str(c).strip() for c in candidates]
            answer = str(_field(row, "answer", where)).strip()
            if answer not in options:
                raise FlexSelectError(f"{where}: answer {answer!r} is not one of the candidates {options}")
            items.append(
                Item(
                    benchmark="mlvu",
                    item_id=f"{task_dir}/{i}",
                    video=_find_video(root, str(_field(row, "video", where)), [f"video/{task_dir}", "video", "."]),
                    question=str(_field(row, "question", where)).strip(),
                    options=options,
                    answer=LETTERS[options.index(answer)],
                    category=str(row.get("question_type") or re.sub(r"^\d+_", "", task_dir)),
                    duration_group=None,
                )
            )
    if not items:
        raise FlexSelectError(f"no multiple-choice question in {root / 'json'}")
    return items


# ---- LongVideoBench --------------------------------------------------------------------------------------------


def _load_longvideobench(root: Path) -> list[Item]:
    path = root / "lvb_val.json"
    if not path.is_file():
        raise FlexSelectError(f"no annotation file found: expected {path} (LongVideoBench validation set)")
    items = []
    for i, row in enumerate(_read_json_list(path)):
        where = f"{path} entry {i}"
        options = [str(c) for c in _field(row, "candidates", where)]
        choice = _field(row, "correct_choice", where)
        if not isinstance(choice, int) or not 0 <= choice < len(options):
            raise FlexSelectError(
                f"{where}: correct_choice {choice!r} is not an index into its {len(options)} "
                "candidates (the test set has no answers; use lvb_val.json)"
            )
        items.append(
            Item(
                benchmark="longvideobench",
                item_id=str(_field(row, "id", where)),
                video=_find_video(root, str(_field(row, "video_path", where)), ["videos", "."]),
                question=str(_field(row, "question", where)).strip(),
                options=options,
                answer=LETTERS[choice],
                category=str(row.get("question_category") or ""),
                duration_group=_opt_str(row.get("duration_group")),
            )
        )
    return items


# ---- LVBench ---------------------------------------------------------------------------------------------------


def _load_lvbench(root: Path) -> list[Item]:
    path = root / "video_info.meta.jsonl"
    if not path.is_file():
        raise FlexSelectError(f"no annotation file found: expected {path} (LVBench)")
    items = []
    for line_no, video in enumerate(_read_jsonl(path), 1):
        key = str(_field(video, "key", f"{path} line {line_no}"))
        for qa in _field(video, "qa", f"{path} line {line_no}"):
            where = f"{path} line {line_no} ({key})"
            uid = str(_field(qa, "uid", where))
            question, options = _split_inline_options(str(_field(qa, "question", where)), f"{where} uid {uid}")
            types = qa.get("question_type") or []
            items.append(
                Item(
                    benchmark="lvbench",
                    item_id=f"{key}/{uid}",
                    video=_find_video(root, key, ["videos", "video", "."]),
                    question=question,
                    options=options,
                    answer=_check_letter(_field(qa, "answer", where), len(options), where),
                    category=CATEGORY_SEP.join([types] if isinstance(types, str) else types),
                    duration_group=None,
                )
            )
    return items


def _split_inline_options(text: str, where: str) -> tuple[str, list[str]]:
    """ "Q?\n(A) x\n(B) y" -> ("Q?", ["x", "y"]); letters are found in order, so a later option may quote "(A)"."""
    starts = []
    pos = 0
    for letter in LETTERS:
        m = re.compile(rf"\({letter}\)").search(text, pos)
        if m is None:
            break
        starts.append(m)
        pos = m.end()
    if len(starts) < 2:
        raise FlexSelectError(f"{where}: no '(A) ... (B) ...' options in question {text!r}")
    ends = [m.start() for m in starts[1:]] + [len(text)]
    return text[: starts[0].start()].strip(), [text[m.end() : end].strip() for m, end in zip(starts, ends)]


# ---- shared helpers --------------------------------------------------------------------------------------------


def _find_video(root: Path, name: str, subdirs: list[str]) -> Path:
    """The first existing `root/<subdir>/<name>[ext]`, else the first subdir's path (then reported as missing)."""
    names = [name] if Path(name).suffix else [name + ext for ext in VIDEO_EXTS]
    for sub in subdirs:
        for n in names:
            if (root / sub / n).is_file():
                return root / sub / n
    return root / subdirs[0] / names[0]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise FlexSelectError(f"{path} is not valid JSON: {e}") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise FlexSelectError(f"{path} line {n} is not valid JSON: {e}") from None
    return rows


def _read_json_list(path: Path) -> list[dict[str, Any]]:
    data = _read_json(path)
    if not isinstance(data, list):
        raise FlexSelectError(f"{path} should hold a JSON list of questions")
    return data


def _field(row: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(row, dict) or key not in row or row[key] is None:
        raise FlexSelectError(f"{where}: missing field {key!r}")
    return row[key]


def _check_letter(value: Any, n_options: int, where: str) -> str:
    letter = str(value).strip().strip("()").upper()
    if len(letter) != 1 or letter not in LETTERS[:n_options]:
        raise FlexSelectError(f"{where}: answer {value!r} is not a letter among its {n_options} options")
    return letter


def _opt_str(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)
