"""The shared hand-computed cases (tests/vectors.json) against the Python definitions; cpp/tests/test_unit.cpp checks
the C++ runtime against the same file."""

import json
import math
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flexselect.mrope import full_video_extent, layout_positions, time_interval, video_positions
from flexselect.selection import frame_sets, question_attention_scores, round_budget, split_budget, top_k
from flexselect.video import VideoInfo, sample_indices

VECTORS = json.loads((Path(__file__).parent / "vectors.json").read_text())


def cases(name):
    return pytest.mark.parametrize("case", VECTORS[name], ids=lambda c: c.get("_why", "")[:40] or None)


def number(x) -> float:
    return float(x)  # also "nan", "inf", "-inf"


@cases("frame_sets")
def test_frame_sets(case):
    assert frame_sets(case["num_frames"], case["set_frames"]) == case["sets"]


@cases("round_budget")
def test_round_budget(case):
    assert round_budget(case["budget"], case["tokens_per_frame"]) == case["rounded"]


@cases("split_budget")
def test_split_budget(case):
    assert split_budget(case["budget"], case["sizes"]) == case["shares"]


@cases("top_k")
def test_top_k(case):
    scores = torch.tensor([number(s) for s in case["scores"]])
    assert top_k(scores, case["k"]).tolist() == case["kept"]


@cases("scores")
def test_question_attention_scores(case):
    q = torch.tensor(case["q"]).transpose(0, 1)  # [rows][heads][d] -> [heads, rows, d]
    k = torch.tensor(case["k"]).transpose(0, 1)
    got = question_attention_scores(q, k, slice(case["vis_begin"], case["vis_end"]), case["aggregate"])
    torch.testing.assert_close(got, torch.tensor(case["expected"]), rtol=0, atol=case["tol"])


@cases("time_interval")
def test_time_interval(case):
    got = time_interval(case["tokens_per_second"], case["temporal_patch"], case["sample_fps"])
    assert math.isclose(got, case["interval"], abs_tol=1e-12)


@cases("video_positions")
def test_video_positions(case):
    offsets = video_positions(case["units"], (case["rows"], case["cols"]), case["interval"])
    per_unit = case["rows"] * case["cols"]
    assert offsets[0, ::per_unit].tolist() == case["unit_t"]
    grid = (case["rows"], case["cols"])
    visual = SimpleNamespace(num_frames=case["units"], grid=grid, time_interval=case["interval"])
    assert full_video_extent(visual) == case["extent"] == int(offsets.max())


@cases("layouts")
def test_layout_positions(case):
    grid = (case["rows"], case["cols"])
    offsets = video_positions(case["units"], grid, case["interval"])
    if case["kept"] is not None:
        offsets = offsets[:, case["kept"]]
    visual = SimpleNamespace(num_frames=case["extent_units"], grid=grid, time_interval=case["interval"])
    positions, next_position = layout_positions(case["prefix"], offsets, full_video_extent(visual), case["suffix"])
    assert positions.tolist() == [case["t"], case["y"], case["x"]]
    assert next_position == case["next"]


@cases("uniform_indices")
def test_uniform_indices(case):
    info = VideoInfo("v.mp4", case["num_frames"], fps=1.0, duration=float(case["num_frames"]), width=8, height=8)
    assert sample_indices(info, num_frames=case["n"]).tolist() == case["indices"]


@cases("vfr_sampling")
def test_vfr_sampling(case):
    """Frames picked by presentation time (the container's integer timestamps in its time base)."""
    unit = case["time_base"]
    pts = np.round(np.asarray(case["times"]) * unit).astype(np.int64)
    info = VideoInfo("v.mp4", len(pts), 10.0, case["end_s"], 8, 8, pts=pts, time_base=Fraction(1, unit))
    np.testing.assert_array_equal(info.frame_times, case["times"])
    got = sample_indices(
        info, num_frames=case.get("frames"), fps=case.get("fps"), start=case.get("start"), end=case.get("end")
    )
    assert got.tolist() == case["indices"]
