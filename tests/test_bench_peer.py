"""bench/peer_mtmd.py, the peer arm of bench/peer.py: llama.cpp's own video path on a tiny GGUF and a real video."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flexselect.video import write_test_video

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("ffmpeg") is None, reason="llama.cpp's video path needs the ffmpeg binary")


@pytest.fixture(scope="module")
def peer_inputs(tiny_model_dir, tmp_path_factory):
    from flexselect_export.gguf import export_gguf

    out = tmp_path_factory.mktemp("peer")
    model, mmproj = export_gguf(tiny_model_dir, out / "gguf", "f16")
    video = write_test_video(out / "clip.mp4", num_frames=16, fps=2.0, width=168, height=112)
    return model, mmproj, video


def run_peer(peer_inputs, *extra):
    model, mmproj, video = peer_inputs
    cmd = [sys.executable, str(ROOT / "bench/peer_mtmd.py"), str(model), str(mmproj), str(video), "What is shown?"]
    return subprocess.run(cmd + ["--fps", "2", "-n", "4", "-t", "1", *extra], capture_output=True, text=True)


def test_peer_prefills_every_frame(peer_inputs):
    proc = run_peer(peer_inputs, "--ctx", "2048")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 16 frames at 2 fps -> 8 merged pairs of 4 x 6 tokens, plus the prompt and llama.cpp's timestamps
    assert out["prompt_tokens"] > 8 * 24
    assert 0 < out["ttft_s"] <= out["total_s"]
    assert 1 <= len(out["answer_token_ids"]) <= 4


def test_peer_context_overflow_is_one_line(peer_inputs):
    proc = run_peer(peer_inputs, "--ctx", "128")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].startswith("context overflow: the prompt is ")


def test_mtmd_cli_times_read_off_its_output():
    """bench/peer.py times llama-mtmd-cli by when its output arrives: loaded (stderr warning) -> prompt evaluated
    (a newline on stdout) -> first answer token."""
    sys.path.insert(0, str(ROOT / "bench"))
    from peer import mtmd_cli_times

    err = [(0.5, b"load_tensors: ...\n"), (2.0, b"WARN: This is an experimental CLI for testing\n")]
    out = [(9.0, b"\n"), (9.25, b"The"), (9.5, b" cat")]
    assert mtmd_cli_times({"err": err, "out": out}) == (7.25, 7.5)
    # the newline and the first token in one read; an answer that ended at once counts the prefill
    assert mtmd_cli_times({"err": err, "out": [(9.0, b"\nThe")]}) == (7.0, 7.0)
    assert mtmd_cli_times({"err": err, "out": [(9.0, b"\n")]}) == (7.0, 7.0)
    assert mtmd_cli_times({"err": err[:1], "out": out}) is None  # never got past loading
