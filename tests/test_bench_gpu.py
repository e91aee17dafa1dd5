"""The GPU benchmark's dry run: the same script a lent GPU runs, on CPU with tiny shapes, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_bench_dry_run(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), "--dry-run", "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((out / "gpu_bench.json").read_text())
    assert result["meta"]["dry_run"] is True
    assert set(result["families"]) == {"qwen2_5_vl", "qwen3_vl"}
    assert all(f["status"] == "ok" and f["params"] > 0 for f in result["families"].values()), result["families"]
    rows = {(r["family"], r["arm"], r["frames"]): r for r in result["rows"]}
    # every family x arm x frame count has one row: measured, or skipped/failed with the reason
    assert len(rows) == len(result["rows"]) == 2 * 4 * 2
    for family in result["families"]:
        for frames in (8, 16):
            base, fs, lite = (rows[(family, arm, frames)] for arm in ("baseline", "flexselect", "lite"))
            assert base["visual_tokens"] == frames // 2 * 220
            assert base["kept_tokens"] == base["visual_tokens"]  # the baseline keeps every token
            for arm in (fs, lite):
                assert arm["kept_tokens"] == arm["budget"] < base["visual_tokens"]
                assert arm["select_s"] > 0 and arm["speedup"] > 0 and arm["memory_ratio"] > 0
                assert abs(arm["select_s"] + arm["answer_s"] - arm["ttft_s"]) < 1e-6
            follow = rows[(family, "followup_indexed", frames)]
            assert follow["kept_tokens"] == follow["budget"] and follow["index_built_sets"] > 0
    png = (out / "gpu_bench.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "speed-up" in proc.stdout and "Qwen3-VL-8B" in proc.stdout  # the table
    assert (out / "gpu_bench.log").read_text().strip()


def test_gpu_bench_refuses_a_file_as_out(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/gpu/bench.py"), "--dry-run", "--out", str(target)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "give a folder" in proc.stderr
    assert target.read_text() == "x"
