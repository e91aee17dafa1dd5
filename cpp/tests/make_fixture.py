"""Build the integration-test fixture into a folder: a tiny random Qwen2.5-VL as model.gguf + mmproj.gguf, and a
short test video. Called from CTest (see cpp/tests/CMakeLists.txt); cached: a finished fixture is reused.

    python cpp/tests/make_fixture.py OUT_DIR LLAMA_CPP_DIR

Uses the project's own pieces where they exist: flexselect.tiny.build_tiny_qwen2_5_vl, the GGUF export
`flexselect_export.gguf` and flexselect.video.write_test_video. Where one is not there yet, it falls back to the
vendored llama.cpp converter (with its own gguf-py) and a PyAV writer, so the C++ side can be tested on its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VIDEO = dict(num_frames=48, fps=8.0, width=168, height=112, needle_frames=(20, 21))  # 6 s, sides multiples of 28


def build_gguf(model_dir: Path, out: Path, llama_dir: Path) -> str:
    try:
        from flexselect_export.gguf import export_gguf  # the project's export (another engineer's module)
    except ImportError:
        export_gguf = None
    if export_gguf is not None:
        export_gguf(model_dir, out, outtype="f32", llama_dir=llama_dir)  # f32: the same weights for every runtime
        return "flexselect_export.gguf (f32)"
    # The tiny tokenizer is Qwen2's pre-tokenizer trained on a few sentences: its hash is unknown to the converter,
    # so tell the converter what it is.
    runner = (
        "import sys, runpy; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; "
        "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'qwen2'; "
        "script = sys.argv[1] + '/convert_hf_to_gguf.py'; sys.argv = [script] + sys.argv[2:]; "
        "runpy.run_path(script, run_name='__main__')"
    )
    env = dict(os.environ)
    convert = [sys.executable, "-c", runner, str(llama_dir), str(model_dir), "--outtype", "f32"]
    subprocess.run([*convert, "--outfile", str(out / "model.gguf")], check=True, env=env, capture_output=True)
    subprocess.run([*convert, "--mmproj", "--outfile", str(out / "mmproj.gguf")], check=True, env=env,
                   capture_output=True)
    return "vendored convert_hf_to_gguf.py (f32)"


def write_video(path: Path) -> str:
    try:
        from flexselect.video import write_test_video
    except ImportError:
        write_test_video = None
    if write_test_video is not None:
        write_test_video(path, **VIDEO)
        return "flexselect.video.write_test_video"
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as out:
        s = out.add_stream("libx264" if "libx264" in av.codecs_available else "mpeg4", rate=int(VIDEO["fps"]))
        s.width, s.height, s.pix_fmt = VIDEO["width"], VIDEO["height"], "yuv420p"
        for i in range(VIDEO["num_frames"]):
            img = np.zeros((VIDEO["height"], VIDEO["width"], 3), np.uint8)
            img[:] = (i * 5 % 255, 80, 160)
            y = (i * 3) % (VIDEO["height"] - 20)
            img[y:y + 20, 20:60] = 255  # a moving block
            if i in VIDEO["needle_frames"]:
                img[30:80, 60:120] = rng.integers(0, 255, (50, 60, 3), dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    return "PyAV fallback writer"


def main() -> int:
    out, llama_dir = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
    done = out / "fixture.json"
    if done.is_file():
        print(done.read_text())
        return 0
    out.mkdir(parents=True, exist_ok=True)
    from flexselect.tiny import build_tiny_qwen2_5_vl

    model_dir = build_tiny_qwen2_5_vl(out / "tiny-qwen2_5_vl")
    info = {"model_dir": str(model_dir), "gguf": build_gguf(model_dir, out, llama_dir),
            "video": write_video(out / "clip.mp4")}
    for name in ("model.gguf", "mmproj.gguf", "clip.mp4"):
        if not (out / name).is_file():
            raise SystemExit(f"fixture: {name} was not produced")
    done.write_text(json.dumps(info, indent=1))
    print(done.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
