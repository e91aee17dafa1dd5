"""Run a method over a benchmark's items into a resumable JSONL results file, then score it.

One results file holds one benchmark and any number of methods (baseline, flexselect, lite, ...): each line is one
answered item of one method, written and flushed as soon as it is answered, so a crash loses at most the item in
flight and the next run picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import FlexSelectError
from .datasets import CATEGORY_SEP, Item
from .prompt import extract_letter, item_prompt

log = logging.getLogger("flexselect")

AnswerFn = Callable[[Path, str], str]  # (video path, full prompt text) -> the model's raw reply
PREFERRED_ORDER = ("baseline", "flexselect", "lite")
DURATION_ORDER = ("short", "medium", "long")


def run_eval(
    items: Sequence[Item], answer_fn: AnswerFn, out_path: Path, limit: int | None = None, method: str = "flexselect"
) -> int:
    """Answer the first `limit` items (all when None) with `answer_fn`, appending one line per item to `out_path`.

    Items this method already has in the file are skipped; a last line cut short by a crash is dropped and its item
    answered again. Returns how many items were answered in this call.
    """
    out_path = Path(out_path)
    if not method:
        raise FlexSelectError("the method name must not be empty")
    if limit is not None and limit < 0:
        raise FlexSelectError(f"limit must be >= 0, got {limit}")
    todo = list(items)[:limit] if limit is not None else list(items)
    records = _load_records(out_path, repair=True)
    benchmarks = {r["benchmark"] for r in records} | {i.benchmark for i in todo}
    if len(benchmarks) > 1:
        raise FlexSelectError(f"{out_path} would mix benchmarks {sorted(benchmarks)}; use one results file each")
    done = {r["item_id"] for r in records if r["method"] == method}
    pending = [i for i in todo if i.item_id not in done]
    log.info(
        "%s on %d items: %d already in %s, %d to answer",
        method,
        len(todo),
        len(todo) - len(pending),
        out_path,
        len(pending),
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for n, item in enumerate(pending, 1):
        prompt = item_prompt(item)
        start = time.perf_counter()
        reply = answer_fn(item.video, prompt)
        seconds = time.perf_counter() - start
        if not isinstance(reply, str):
            raise FlexSelectError(f"answer_fn returned {type(reply).__name__} for {item.item_id}, not text")
        pred = extract_letter(reply, len(item.options), item.options)
        record = {
            "benchmark": item.benchmark,
            "item_id": item.item_id,
            "method": method,
            "prompt": prompt,
            "reply": reply,
            "pred": pred,
            "answer": item.answer,
            "correct": pred == item.answer,
            "category": item.category,
            "duration_group": item.duration_group,
            "seconds": round(seconds, 3),
        }
        with out_path.open("a", encoding="utf-8") as f:  # opened per answer: no file until there is one
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
        log.info(
            "[%d/%d] %s %s: %s (answer %s), %.1f s", n, len(pending), method, item.item_id, pred, item.answer, seconds
        )
    return len(pending)


def _load_records(path: Path, repair: bool) -> list[dict[str, Any]]:
    """The file's complete lines. A trailing line without newline is a write cut short: ignored, and with `repair`
    truncated away so the next append starts on a fresh line. A bad complete line means the file was edited."""
    if not path.exists():
        return []
    data = path.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        log.warning("%s: ignoring a partly written last line (%d bytes)", path, len(data) - cut)
        if repair:
            with path.open("r+b") as f:
                f.truncate(cut)
    records = []
    for n, line in enumerate(data[:cut].decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FlexSelectError(f"{path} line {n} is not valid JSON ({e}); fix or remove that line") from None
        if not isinstance(record, dict) or not {"benchmark", "item_id", "method", "correct"} <= record.keys():
            raise FlexSelectError(f"{path} line {n} is not a flexselect eval result")
        records.append(record)
    return records


def summarize(out_path: Path, common_only: bool = False) -> dict[str, Any]:
    """Scores per method: overall, per category, per duration group, and for MLVU the M-Avg (mean of per-task
    accuracies, the paper's MLVU number). Accuracies are fractions in [0, 1]; a reply naming no option is wrong.

    `common_only` scores every method on only the items all of them answered, for a like-for-like table while
    some runs are unfinished.
    """
    out_path = Path(out_path)
    if not out_path.is_file():
        raise FlexSelectError(f"results file {out_path} not found; run the evaluation first")
    records = _load_records(out_path, repair=False)
    if not records:
        raise FlexSelectError(f"{out_path} holds no results yet")
    by_method: dict[str, dict[str, dict[str, Any]]] = {}
    for r in records:
        by_method.setdefault(r["method"], {})[r["item_id"]] = r  # a re-answered item counts once
    if common_only:
        common = set.intersection(*(set(m) for m in by_method.values()))
        by_method = {name: {k: v for k, v in m.items() if k in common} for name, m in by_method.items()}
    benchmark = records[0]["benchmark"]
    methods = {name: _score(list(by_method[name].values()), benchmark) for name in _method_order(by_method)}
    return {"benchmark": benchmark, "methods": methods}


def _score(records: list[dict[str, Any]], benchmark: str) -> dict[str, Any]:
    categories: dict[str, list[bool]] = {}
    durations: dict[str, list[bool]] = {}
    for r in records:
        for cat in r["category"].split(CATEGORY_SEP) if r.get("category") else []:
            categories.setdefault(cat, []).append(r["correct"])
        if r.get("duration_group") is not None:
            durations.setdefault(str(r["duration_group"]), []).append(r["correct"])
    by_category = {c: _acc(v) for c, v in sorted(categories.items())}
    summary = {
        "n": len(records),
        "correct": sum(r["correct"] for r in records),
        "accuracy": _acc([r["correct"] for r in records])["accuracy"],
        "no_answer": sum(r.get("pred") is None for r in records),
        "mean_seconds": sum(r.get("seconds", 0.0) for r in records) / len(records) if records else None,
        "by_category": by_category,
        "by_duration": {d: _acc(durations[d]) for d in sorted(durations, key=_duration_key)},
    }
    if benchmark == "mlvu":
        accs = [c["accuracy"] for c in by_category.values()]
        summary["m_avg"] = sum(accs) / len(accs) if accs else None
    return summary


def _acc(values: list[bool]) -> dict[str, Any]:
    return {"n": len(values), "correct": sum(values), "accuracy": sum(values) / len(values) if values else None}


def _duration_key(d: str) -> tuple[int, float, str]:
    # VideoMME's short/medium/long, LongVideoBench's 15/60/600/3600 seconds, anything else alphabetically.
    if d in DURATION_ORDER:
        return 0, DURATION_ORDER.index(d), d
    try:
        return 1, float(d), d
    except ValueError:
        return 2, 0.0, d


def _method_order(methods: dict[str, Any]) -> list[str]:
    return [m for m in PREFERRED_ORDER if m in methods] + [m for m in methods if m not in PREFERRED_ORDER]


def format_comparison(summary: dict[str, Any], markdown: bool = True) -> str:
    """The methods side by side (one column each, accuracies in %): headline rows, then durations, categories."""
    methods = summary["methods"]
    names = list(methods)
    rows: list[tuple[str, list[str]]] = [
        ("items", [str(methods[m]["n"]) for m in names]),
        ("overall", [_pct(methods[m]["accuracy"]) for m in names]),
    ]
    if summary["benchmark"] == "mlvu":
        rows.append(("M-Avg", [_pct(methods[m].get("m_avg")) for m in names]))
    rows.append(("no option named", [str(methods[m]["no_answer"]) for m in names]))
    for key, label in (("by_duration", "duration"), ("by_category", "")):
        groups = list(dict.fromkeys(g for m in names for g in methods[m][key]))
        groups.sort(key=_duration_key if key == "by_duration" else str)
        for g in groups:
            cells = [_pct(methods[m][key][g]["accuracy"]) if g in methods[m][key] else "-" for m in names]
            rows.append((f"{label} {g}".strip(), cells))
    header = [summary["benchmark"]] + names
    table = [header] + [[label] + cells for label, cells in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    rule = (
        ("|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|")
        if markdown
        else "  ".join("-" * w for w in widths)
    )
    return "\n".join([line(header), rule] + [line(r) for r in table[1:]])


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"
