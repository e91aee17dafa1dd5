"""Shared fixtures: one tiny random Qwen2.5-VL checkpoint and one generated video per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from flexselect.tiny import build_tiny_qwen2_5_vl

    return build_tiny_qwen2_5_vl(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl")


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend

    return Qwen25VLBackend.load(tiny_model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def test_video(tmp_path_factory):
    from flexselect.video import write_test_video

    return write_test_video(
        tmp_path_factory.mktemp("videos") / "clip.mp4",
        num_frames=48,
        fps=8.0,
        width=168,
        height=112,
        needle_frames=(20, 21),
    )


def pytest_terminal_summary(terminalreporter):
    """Every skipped test is listed at the end with its reason, in red: a skip checks nothing and must be seen."""
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    terminalreporter.section(f"{len(skipped)} test(s) SKIPPED: these checks did not run", sep="!", red=True, bold=True)
    for report in skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        terminalreporter.line(f"SKIPPED {report.nodeid}: {reason}", red=True, bold=True)
