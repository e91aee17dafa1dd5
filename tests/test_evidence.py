"""Evidence ranges: the shared hand-computed vectors (also read by the C++ unit tests), and the demo that shows them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexselect import demo
from flexselect.evidence import describe, evidence_ranges
from flexselect.video import load_clip

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())["evidence"]


@pytest.mark.parametrize("case", VECTORS, ids=[c["name"] for c in VECTORS])
def test_evidence_ranges_match_the_shared_vectors(case):
    got = evidence_ranges(case["kept_per_unit"], case["timestamps"], case["max_ranges"])
    assert [(r.start_s, r.end_s, r.tokens) for r in got] == [
        (e["start_s"], e["end_s"], e["tokens"]) for e in case["ranges"]
    ]
    assert [r.share for r in got] == pytest.approx([e["share"] for e in case["ranges"]], abs=1e-12)


def test_counts_and_timestamps_must_agree():
    with pytest.raises(ValueError, match="3 unit counts for 2 timestamps"):
        evidence_ranges([1, 2, 3], [0.0, 1.0])


def test_describe_says_where_in_plain_words():
    ranges = evidence_ranges([0, 0, 5, 6, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7])
    assert describe(ranges, 12, 96) == "kept 12 of 96 tokens; 92% of them from 2.0-4.0 s"
    assert describe([], 8, 8) == "kept 8 of 8 tokens, spread evenly over the video"


def run_demo(tmp_path, *args):
    env = {**os.environ, "FLEXSELECT_CACHE": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "flexselect", "answer", *args], capture_output=True, text=True, env=env, timeout=600
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    text, as_json = run_demo(tmp), run_demo(tmp, "--json")
    return tmp, text, as_json


def test_demo_finds_the_red_square_and_says_so(demo_run):
    _, text, _ = demo_run
    assert text.returncode == 0, text.stderr
    start, end = demo.needle_seconds()
    assert "FlexSelect found it." in text.stdout
    assert "answer (random weights, so not meaningful):" in text.stdout
    assert "\ufffd" not in text.stdout + text.stderr
    heatmap = Path(text.stdout.split("heatmap of the kept tokens: ")[1].splitlines()[0])
    assert heatmap.is_file() and heatmap.stat().st_size > 0


def test_demo_json_evidence_names_the_needle_first(demo_run):
    _, _, as_json = demo_run
    assert as_json.returncode == 0, as_json.stderr
    out = json.loads(as_json.stdout)
    start, end = out["red_square_seconds"]
    first = out["evidence"][0]
    assert first["start_s"] < end and first["end_s"] > start  # the top range is where the square is
    assert first["share"] >= 0.8
    # Recall of the needle's units: nearly every unit showing the square has kept tokens.
    kept_units = set(np.asarray(out["kept_token_indices"]) // out["stats"]["tokens_per_frame"])
    unit_starts = load_clip(out["video"], num_frames=out["stats"]["frames"]).timestamps[::2]
    needle_units = {u for u, t in enumerate(unit_starts) if start <= t < end}
    assert needle_units and len(needle_units & kept_units) / len(needle_units) >= 0.9
