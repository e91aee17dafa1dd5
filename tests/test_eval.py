"""Evaluation harness: the four benchmark formats, reading letters from replies, exact scores, resume and repair."""

import json
import re
import sys

import pytest

from flexselect.errors import FlexSelectError
from flexselect.eval import (
    BENCHMARKS,
    build_prompt,
    extract_letter,
    format_comparison,
    load_benchmark,
    make_mini_dataset,
    run_eval,
    summarize,
)
from flexselect.eval.synthetic import COLOURS, MLVU_TASKS, correct_index, n_options_for

LETTERS = "ABCDE"


def clip_index(item):
    return int(item.question.rsplit(" ", 1)[1].rstrip("?"))


@pytest.mark.parametrize("benchmark", BENCHMARKS)
def test_mini_dataset_parses(tmp_path, benchmark):
    n = 10
    items = load_benchmark(benchmark, make_mini_dataset(tmp_path, benchmark, n))
    assert len(items) == n and len({i.item_id for i in items}) == n
    assert sorted(clip_index(i) for i in items) == list(range(n))
    for item in items:
        i = clip_index(item)
        assert item.benchmark == benchmark and item.video.is_file()
        assert len(item.options) == n_options_for(benchmark, i)
        assert item.answer == LETTERS[correct_index(i, len(item.options))]
        assert item.options[LETTERS.index(item.answer)] == f"{COLOURS[i % len(COLOURS)]} ball"
        assert not any(o[:2] in ("A.", "(A") for o in item.options)  # letters stripped from the option text
        assert item.category


def test_format_specific_fields(tmp_path):
    vmme = load_benchmark("videomme", make_mini_dataset(tmp_path / "v", "videomme", 6))
    assert [i.item_id for i in vmme[:4]] == ["001-1", "001-2", "001-3", "002-1"]
    assert vmme[0].video == tmp_path / "v" / "data" / "vid00000.mp4" and vmme[3].duration_group == "medium"
    assert vmme[1].category == "Object Recognition"

    mlvu = load_benchmark("mlvu", make_mini_dataset(tmp_path / "m", "mlvu", 9))
    assert len(mlvu) == 9  # 9_summary.json (no candidates) is skipped
    assert {i.category for i in mlvu} == {t.split("_", 1)[1] for t in MLVU_TASKS}
    assert mlvu[0].video == tmp_path / "m" / "video" / "1_plotQA" / "clip_0.mp4"
    assert all(i.duration_group is None for i in mlvu)
    # The HF download nests everything in MLVU/: the parent folder works too.
    assert len(load_benchmark("mlvu", make_mini_dataset(tmp_path / "p" / "MLVU", "mlvu", 3).parent)) == 3

    lvb = load_benchmark("longvideobench", make_mini_dataset(tmp_path / "l", "longvideobench", 4))
    assert [i.duration_group for i in lvb] == ["15", "60", "600", "3600"] and lvb[1].options[4] == "green ball"

    lvbench = load_benchmark("lvbench", make_mini_dataset(tmp_path / "b", "lvbench", 4))
    assert lvbench[0].item_id == "lvbench0000/0" and lvbench[2].video.name == "lvbench0001.mp4"
    assert lvbench[3].category == "entity recognition | event understanding"
    assert lvbench[0].question == "What colour is the ball in clip 0?"


def test_videomme_jsonl_and_parquet_without_reader(tmp_path, monkeypatch):
    root = make_mini_dataset(tmp_path, "videomme", 3)
    rows = json.loads((root / "videomme" / "test-00000-of-00001.json").read_text())
    (root / "videomme" / "test-00000-of-00001.json").unlink()
    (root / "videomme" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_benchmark("videomme", root)) == 3
    (root / "videomme" / "test-00000-of-00001.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(FlexSelectError, match="pip install pyarrow"):
        load_benchmark("videomme", root)


@pytest.mark.parametrize(
    "benchmark, expected",
    [
        ("videomme", "videomme/test-00000-of-00001.parquet"),
        ("mlvu", "json/1_plotQA.json"),
        ("longvideobench", "lvb_val.json"),
        ("lvbench", "video_info.meta.jsonl"),
    ],
)
def test_missing_annotation_names_expected_path(tmp_path, benchmark, expected):
    with pytest.raises(FlexSelectError, match=re.escape(str(tmp_path / expected))):
        load_benchmark(benchmark, tmp_path)


def test_missing_video_and_bad_benchmark(tmp_path):
    root = make_mini_dataset(tmp_path, "longvideobench", 3)
    (root / "videos" / "lvb00001.mp4").unlink()
    with pytest.raises(FlexSelectError, match=r"lvb00001\.mp4 not found \(1 of 3"):
        load_benchmark("longvideobench", root)
    assert [i.item_id for i in load_benchmark("longvideobench", root, skip_missing_videos=True)] == [
        "lvb00000_0",
        "lvb00002_0",
    ]
    with pytest.raises(FlexSelectError, match="unknown benchmark"):
        load_benchmark("egoschema", root)


OPTIONS = ["red car", "blue car", "green bike", "a yellow bus"]


@pytest.mark.parametrize(
    "reply, expected",
    [
        ("B", "B"),
        ("(B)", "B"),
        ("B.", "B"),
        ("  C", "C"),
        ("b", "B"),
        ("(c)", "C"),
        ("The answer is B", "B"),
        ("Answer: (c)", "C"),
        ("answer is d.", "D"),
        ("The best option is C.", "C"),
        ("B) blue", "B"),
        ("D. a yellow bus", "D"),
        ("\n  A: red car", "A"),
        ("blue car", "B"),
        ("Green Bike.", "C"),
        ("I think it is the blue car.", "B"),
        ("I choose (D) here", "D"),
        ("The answer is a red car", "A"),
        ("B is correct", "B"),
        ("I don't know", None),
        ("A man opens the door", None),
        ("Both A and B", None),
        ("E", None),
        ("", None),
        ("red", None),
        ("The car", None),
    ],
)
def test_extract_letter(reply, expected):
    assert extract_letter(reply, 4, OPTIONS) == expected


def test_extract_letter_without_option_texts():
    assert extract_letter("blue car", 4) is None and extract_letter("Answer: B", 4) == "B"
    assert extract_letter("E", 5) == "E" and extract_letter("(E)", 4) is None


def test_prompt_layout():
    assert build_prompt("Which?", ["x", "y"]) == (
        "Which?\nA. x\nB. y\nAnswer with the option's letter from the given choices directly."
    )


class FakeModel:
    """Right on the items whose clip index is in `right`, a wrong letter otherwise; records what it was asked."""

    def __init__(self, items, right):
        self.by_video_prompt = {(i.video, build_prompt(i.question, i.options)): i for i in items}
        self.right, self.calls = set(right), []

    def __call__(self, video, prompt):
        item = self.by_video_prompt[(video, prompt)]
        self.calls.append(item.item_id)
        if clip_index(item) in self.right:
            return f"The answer is {item.answer}"
        wrong = next(c for c in LETTERS[: len(item.options)] if c != item.answer)
        return f"({wrong})"


def test_scores_are_exact(tmp_path):
    items = load_benchmark("mlvu", make_mini_dataset(tmp_path / "d", "mlvu", 15))
    out = tmp_path / "mlvu.jsonl"
    # clip i is in task i % 7: plotQA (clips 0, 7, 14) gets 2/3, needle (1, 8) 1/2, every other task 0/2.
    assert run_eval(items, FakeModel(items, right={0, 7, 1}), out, method="flexselect") == 15
    assert run_eval(items, FakeModel(items, right=range(15)), out, method="baseline") == 15
    s = summarize(out)
    assert s["benchmark"] == "mlvu" and list(s["methods"]) == ["baseline", "flexselect"]
    fs = s["methods"]["flexselect"]
    assert (fs["n"], fs["correct"], fs["no_answer"]) == (15, 3, 0)
    assert fs["accuracy"] == pytest.approx(3 / 15)
    assert fs["by_category"]["plotQA"] == {"n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert fs["by_category"]["needle"]["accuracy"] == 0.5 and fs["by_category"]["ego"]["accuracy"] == 0.0
    assert fs["m_avg"] == pytest.approx((2 / 3 + 0.5) / 7)  # mean of task accuracies, not of items
    assert s["methods"]["baseline"]["m_avg"] == 1.0
    table = format_comparison(s)
    rows = {
        cells[0]: cells[1:] for cells in ([c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines())
    }
    assert rows["mlvu"] == ["baseline", "flexselect"]
    assert rows["overall"] == ["100.0", "20.0"] and rows["M-Avg"] == ["100.0", "16.7"]
    assert rows["plotQA"] == ["100.0", "66.7"] and rows["items"] == ["15", "15"]
    assert "M-Avg" in format_comparison(s, markdown=False)

    line = json.loads(out.read_text().splitlines()[0])
    assert set(line) >= {"item_id", "method", "prompt", "reply", "pred", "correct", "category", "seconds"}


def test_duration_groups_and_multi_type_categories(tmp_path):
    items = load_benchmark("lvbench", make_mini_dataset(tmp_path / "b", "lvbench", 4))
    out = tmp_path / "lvbench.jsonl"
    run_eval(items, FakeModel(items, right={3}), out, method="lite")
    by_cat = summarize(out)["methods"]["lite"]["by_category"]
    # clip 3 is both "entity recognition" and "event understanding": it counts in each.
    assert by_cat["entity recognition"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert by_cat["event understanding"] == {"n": 2, "correct": 1, "accuracy": 0.5}
    assert "m_avg" not in summarize(out)["methods"]["lite"]

    items = load_benchmark("videomme", make_mini_dataset(tmp_path / "v", "videomme", 9))
    out = tmp_path / "videomme.jsonl"
    run_eval(items, FakeModel(items, right={0, 1, 2, 3}), out, method="flexselect")
    by_dur = summarize(out)["methods"]["flexselect"]["by_duration"]
    assert list(by_dur) == ["short", "medium", "long"]
    assert [d["accuracy"] for d in by_dur.values()] == [1.0, pytest.approx(1 / 3), 0.0]


def test_resume_after_limit(tmp_path):
    items = load_benchmark("longvideobench", make_mini_dataset(tmp_path / "d", "longvideobench", 8))
    out = tmp_path / "r.jsonl"
    first = FakeModel(items, right=range(8))
    assert run_eval(items, first, out, limit=3, method="flexselect") == 3
    assert first.calls == [i.item_id for i in items[:3]]
    assert summarize(out)["methods"]["flexselect"]["n"] == 3
    second = FakeModel(items, right=range(8))
    assert run_eval(items, second, out, method="flexselect") == 5
    assert second.calls == [i.item_id for i in items[3:]]
    assert run_eval(items, second, out, method="flexselect") == 0  # nothing left
    s = summarize(out)["methods"]["flexselect"]
    assert (s["n"], s["accuracy"]) == (8, 1.0)
    assert list(summarize(out)["methods"]["flexselect"]["by_duration"]) == ["15", "60", "600", "3600"]


def test_truncated_last_line_is_redone(tmp_path):
    items = load_benchmark("videomme", make_mini_dataset(tmp_path / "d", "videomme", 4))
    out = tmp_path / "t.jsonl"
    run_eval(items, FakeModel(items, right=range(4)), out, limit=3, method="baseline")
    text = out.read_text()
    out.write_text(text[: len(text) - 25])  # a crash in the middle of writing the third line
    assert summarize(out)["methods"]["baseline"]["n"] == 2  # read-only: the partial line is just ignored
    model = FakeModel(items, right=range(4))
    assert run_eval(items, model, out, method="baseline") == 2
    assert model.calls == [items[2].item_id, items[3].item_id]
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and all(json.loads(line)["correct"] for line in lines)


def test_common_only_and_bad_files(tmp_path):
    items = load_benchmark("videomme", make_mini_dataset(tmp_path / "d", "videomme", 4))
    out = tmp_path / "c.jsonl"
    run_eval(items, FakeModel(items, right=range(4)), out, method="baseline")
    run_eval(items, FakeModel(items, right=[]), out, limit=2, method="flexselect")
    s = summarize(out, common_only=True)["methods"]
    assert (s["baseline"]["n"], s["flexselect"]["n"]) == (2, 2)
    other = load_benchmark("lvbench", make_mini_dataset(tmp_path / "b", "lvbench", 2))
    with pytest.raises(FlexSelectError, match="mix benchmarks"):
        run_eval(other, FakeModel(other, right=[]), out, method="baseline")
    with out.open("a") as f:
        f.write("not json\n")
    with pytest.raises(FlexSelectError, match="line 7 is not valid JSON"):
        summarize(out)
    with pytest.raises(FlexSelectError, match="not found"):
        summarize(tmp_path / "none.jsonl")


# ---- `flexselect eval` end to end on the tiny model ------------------------------------------------------------


@pytest.fixture
def mini_videomme(tmp_path):
    """Four VideoMME questions over two real (generated) videos instead of placeholders."""
    from flexselect.video import write_test_video

    items = load_benchmark("videomme", make_mini_dataset(tmp_path / "data", "videomme", 4))
    for n, video in enumerate(sorted({i.video for i in items})):
        video.unlink()
        write_test_video(video, num_frames=16, fps=4.0, width=112, height=56, seed=n)
    return tmp_path / "data", items


def test_eval_cli_runs_compares_and_resumes(tmp_path, tiny_model_dir, mini_videomme, monkeypatch, capsys):
    from flexselect.cli import main
    from flexselect.pipeline import FlexSelect

    root, items = mini_videomme
    calls = []
    real_answer = FlexSelect.answer

    def spy(self, video, question, sampling, options, *args, **kwargs):
        result = real_answer(self, video, question, sampling, options, *args, **kwargs)
        calls.append((options.selector, sampling.frames, result.stats["kept_tokens"], question))
        return result

    monkeypatch.setattr(FlexSelect, "answer", spy)
    out = tmp_path / "results.jsonl"
    argv = [
        "eval",
        "videomme",
        str(root),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--frames",
        "8",
        "--budget",
        "16",
        "--max-new-tokens",
        "4",
        "--summary-json",
        str(tmp_path / "summary.json"),
    ]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| videomme\s+\|\s+baseline \|\s+flexselect \|", table)
    assert re.search(r"\| items\s+\|\s+4 \|\s+4 \|", table)

    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["item_id"], r["method"]) for r in records] == [
        (i.item_id, m) for i in items for m in ("baseline", "flexselect")
    ]
    assert all(
        r["pred"] in (None, *LETTERS[:4]) and r["prompt"] == build_prompt(i.question, i.options)
        for r, i in zip(records, [i for i in items for _ in range(2)])
    )
    # 8 frames of 2x4 tokens in pairs: FlexSelect keeps 16 of 32 tokens; the baseline samples the 4 frames whose
    # 16 tokens cost the same answer pass, and selects nothing.
    assert {c[:3] for c in calls} == {("none", 4, 16), ("reference", 8, 16)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["methods"]["flexselect"]["n"] == 4

    before = out.read_bytes()
    calls.clear()
    assert main(argv) == 0  # resumed: everything is answered already
    assert calls == [] and out.read_bytes() == before


def test_eval_cli_errors(tmp_path, tiny_model_dir, mini_videomme, capsys):
    from flexselect.cli import main

    root, _ = mini_videomme
    out = tmp_path / "r.jsonl"
    model = ["--model", str(tiny_model_dir), "--device", "cpu"]
    assert main(["eval", "videomme", str(root), "-o", str(out), "--methods", "lite", *model]) == 2
    assert "needs a ranker" in capsys.readouterr().err
    assert main(["eval", "mlvu", str(tmp_path / "nowhere"), "-o", str(out), *model]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["eval", "videomme", str(root), "-o", str(out), "--summary-only"]) == 2
    assert "run the evaluation first" in capsys.readouterr().err
    assert not out.exists()


def test_eval_cli_records_what_it_can_and_retries_the_rest(tmp_path, tiny_model_dir, mini_videomme, capsys):
    from flexselect.cli import main
    from flexselect.video import write_test_video

    root, items = mini_videomme
    broken = items[-1].video  # the second video: its questions fail, the first video's are answered
    good = broken.read_bytes()
    broken.write_bytes(good[: len(good) // 3])
    out = tmp_path / "r.jsonl"
    argv = [
        "eval",
        "videomme",
        str(root),
        "-o",
        str(out),
        "--model",
        str(tiny_model_dir),
        "--device",
        "cpu",
        "--methods",
        "flexselect",
        "--frames",
        "8",
        "--budget",
        "16",
        "--max-new-tokens",
        "2",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    bad = [i.item_id for i in items if i.video == broken]
    assert f"{len(bad)} answer(s) failed" in err and all(f"{b} (flexselect)" in err for b in bad)
    assert {json.loads(line)["item_id"] for line in out.read_text().splitlines()} == {
        i.item_id for i in items if i.video != broken
    }

    broken.unlink()
    write_test_video(broken, num_frames=16, fps=4.0, width=112, height=56, seed=1)
    assert main(argv) == 0  # only the failed ones are answered now
    assert [json.loads(line)["item_id"] for line in out.read_text().splitlines()][-len(bad) :] == bad

    assert main(argv[:-4] + ["--budget", "100000", "-o", str(tmp_path / "none.jsonl")]) == 2
    assert "no answer could be recorded" in capsys.readouterr().err and not (tmp_path / "none.jsonl").exists()
