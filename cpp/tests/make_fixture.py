"""Build the integration-test fixtures into a folder: tiny random Video-LLMs as model.gguf + mmproj.gguf, and short
test videos. Called from CTest (see cpp/tests/CMakeLists.txt); cached: a finished fixture is reused.

    python cpp/tests/make_fixture.py OUT_DIR LLAMA_CPP_DIR [FAMILY ...]

The Qwen2.5-VL fixture is written into OUT_DIR itself, every other family into OUT_DIR/<family> (default: all). The
project's own pieces make them: the tiny builders of `flexselect.tiny`, the GGUF export `flexselect_export.gguf`
(with the llama.cpp tree CMake fetched) and flexselect.video.write_test_video.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VIDEO = dict(num_frames=48, fps=8.0, width=168, height=112, needle_frames=(20, 21))  # 6 s, sides multiples of 28
# Qwen3-VL / Qwen3.5 take sides at multiples of 32 (patch 16 x merge 2): a frame of that size is never resampled
VIDEO_32 = dict(num_frames=48, fps=8.0, width=128, height=96, needle_frames=(20, 21))


def builders() -> dict:
    from flexselect import tiny

    return {
        "qwen2_5_vl": (tiny.build_tiny_qwen2_5_vl, VIDEO),
        "qwen3_vl": (tiny.build_tiny_qwen3_vl, VIDEO_32),
        "qwen3_vl_moe": (lambda d: tiny.build_tiny_qwen3_vl(d, moe=True), VIDEO_32),
        "qwen3_5": (tiny.build_tiny_qwen3_5, VIDEO_32),
        "qwen3_5_moe": (lambda d: tiny.build_tiny_qwen3_5(d, moe=True), VIDEO_32),
    }


def fixture_dir(root: Path, family: str) -> Path:
    return root if family == "qwen2_5_vl" else root / family


def build(root: Path, llama_dir: Path, family: str) -> None:
    out = fixture_dir(root, family)
    done = out / "fixture.json"
    if done.is_file():
        print(done.read_text())
        return
    out.mkdir(parents=True, exist_ok=True)
    from flexselect.video import write_test_video
    from flexselect_export.gguf import export_gguf

    make, video = builders()[family]
    model_dir = make(out / f"tiny-{family}")
    export_gguf(model_dir, out, outtype="f32", llama_dir=llama_dir)  # f32: the same weights for every runtime
    write_test_video(out / "clip.mp4", **video)
    info = {"family": family, "model_dir": str(model_dir), "gguf": "f32", "video": video}
    done.write_text(json.dumps(info, indent=1))
    print(done.read_text())


def main() -> int:
    root, llama_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    for family in sys.argv[3:] or builders():
        build(root, llama_dir, family)
    return 0


if __name__ == "__main__":
    sys.exit(main())
