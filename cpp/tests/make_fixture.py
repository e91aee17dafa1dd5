"""Build the integration-test fixture into a folder: a tiny random Qwen2.5-VL as model.gguf + mmproj.gguf, and a
short test video. Called from CTest (see cpp/tests/CMakeLists.txt); cached: a finished fixture is reused.

    python cpp/tests/make_fixture.py OUT_DIR LLAMA_CPP_DIR

The project's own pieces make it: flexselect.tiny.build_tiny_qwen2_5_vl, the GGUF export `flexselect_export.gguf`
(with the llama.cpp tree CMake fetched) and flexselect.video.write_test_video.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VIDEO = dict(num_frames=48, fps=8.0, width=168, height=112, needle_frames=(20, 21))  # 6 s, sides multiples of 28


def main() -> int:
    out, llama_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    done = out / "fixture.json"
    if done.is_file():
        print(done.read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    from flexselect.tiny import build_tiny_qwen2_5_vl
    from flexselect.video import write_test_video
    from flexselect_export.gguf import export_gguf

    model_dir = build_tiny_qwen2_5_vl(out / "tiny-qwen2_5_vl")
    export_gguf(model_dir, out, outtype="f32", llama_dir=llama_dir)  # f32: the same weights for every runtime
    write_test_video(out / "clip.mp4", **VIDEO)
    info = {"model_dir": str(model_dir), "gguf": "f32", "video": VIDEO}
    done.write_text(json.dumps(info, indent=1))
    print(done.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
