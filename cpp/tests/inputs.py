"""flexselect-cli against the Python paths on every kind of input (issue 17). Run by CTest:

    python cpp/tests/inputs.py --cli build/bin/flexselect-cli --fixture build/fixture

1. Videos as players show them (tests/video_fixtures.py: variable frame rate, rotated, MPEG-TS, raw .h264, GIF, a
   16x16 video, a damaged MPEG-TS): the CLI's sampled timestamps, frame size and visual tokens equal the Python
   loader's; where neither resizes, the kept tokens and greedy answer equal the Python llama.cpp backend's (same
   pixels in, same tokens out). Animated WebP: one line naming the format, exit 2.
2. A fixed-seed fuzz of the model loaders: 24 mutated GGUFs (model and mmproj) and 8 mutated ONNX rankers, each
   either runs or exits 2 with one line; never a crash, a hang (timeout) or a sanitizer report.
3. NaN weights (scoring layer, output norm, ONNX ranker) are named in one line; Ctrl-C exits 130 with one line;
   -c 64 is a clear error.
Exit status 0 = pass, 1 = fail.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import video_fixtures  # noqa: E402

FRAMES, BUDGET, SET_FRAMES, LAYER, MAX_NEW = 8, 4, 2, 3, 4
QUESTION = "What is in the top-left corner?"
FAILURES: list[str] = []


def check(cond: bool, what: str) -> None:
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        FAILURES.append(what)


def cli_run(cli: str, model: Path, mmproj: Path, video: Path, *extra: str, timeout: int = 120):
    cmd = [cli, "-m", str(model), "--mmproj", str(mmproj), "--video", str(video), "-p", QUESTION, "--json"]
    cmd += ["--frames", str(FRAMES), "--budget", str(BUDGET), "--set-frames", str(SET_FRAMES), "--layer", str(LAYER)]
    cmd += ["--max-new-tokens", str(MAX_NEW), "-t", "2", *extra]
    return subprocess.run(cmd, capture_output=True, timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess) -> str | None:
    """The one `flexselect-cli: error:` line of a clean exit 2, else None."""
    lines = [ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("flexselect-cli: error: ")]
    clean = not any("runtime error" in ln or "Sanitizer" in ln for ln in lines)
    return errors[0] if r.returncode == 2 and len(errors) == 1 and clean else None


def videos(cli: str, fx: Path, tmp: Path) -> None:
    from flexselect.backends.base import GenerationConfig
    from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
    from flexselect.video import load_clip

    files = video_fixtures.write_all(tmp)
    files["damaged"] = video_fixtures.write_damaged(tmp, files["mpeg-ts"])
    pipe = FlexSelect.load(gguf=fx / "model.gguf", mmproj=fx / "mmproj.gguf", n_gpu_layers=0)
    for name, path in files.items():
        r = cli_run(cli, fx / "model.gguf", fx / "mmproj.gguf", path)
        if r.returncode != 0:
            check(False, f"{name}: the CLI reads it ({r.stderr.decode(errors='replace').strip()[-300:]})")
            continue
        out = json.loads(r.stdout)
        s = out["stats"]
        clip = load_clip(path, num_frames=FRAMES)
        units, (h, w) = -(-len(clip.frames) // 2), clip.frames.shape[1:3]
        side = lambda v: max(28, round(v / 28) * 28)  # noqa: E731 (the frame size both feed the vision tower)
        check(
            np.allclose(s["timestamps"], clip.timestamps, atol=1e-6, rtol=0),
            f"{name}: same sampled timestamps {s['timestamps']}",
        )
        check(s["frame_size"] == [side(h), side(w)], f"{name}: same displayed frame size {s['frame_size']}")
        check(
            s["visual_tokens"] == units * (side(h) // 28) * (side(w) // 28),
            f"{name}: same visual tokens ({s['visual_tokens']}: one per 28x28 block, never upscaled by mtmd)",
        )
        check(abs(s["sample_fps"] - clip.sample_fps) < 1e-4 * clip.sample_fps, f"{name}: same sample_fps")
        if (h, w) != (side(h), side(w)):  # resized: the two runtimes' filters differ, pixels cannot be equal
            continue
        a = pipe.answer(
            path,
            QUESTION,
            sampling=Sampling(frames=FRAMES),
            options=SelectOptions(budget=BUDGET, layer=LAYER, set_frames=SET_FRAMES),
            generation=GenerationConfig(max_new_tokens=MAX_NEW),
        )
        check(
            a.selection.kept.tolist() == out["kept_token_indices"]
            and list(a.generation.token_ids) == out["answer_token_ids"],
            f"{name}: same kept tokens and answer as the Python llama.cpp backend (same frames)",
        )
    webp = video_fixtures.write_animated_webp(tmp)
    line = one_error_line(cli_run(cli, fx / "model.gguf", fx / "mmproj.gguf", webp))
    check(line is not None and "animated WebP is not supported" in line, f"animated WebP: named in one line ({line})")


def mutate(data: bytes, rng: np.random.Generator, i: int) -> bytes:
    """Truncation, flipped bytes past the magic, or both (the magic kept, so the parsers get a real try)."""
    b = np.frombuffer(data, dtype=np.uint8).copy()
    if i % 3 != 1:
        at = rng.integers(8, min(len(b), 1 << 16), size=int(rng.integers(1, 32)))  # headers and metadata live early
        b[at] ^= rng.integers(1, 256, size=len(at), dtype=np.uint8)
    if i % 3 != 0:
        b = b[: int(rng.integers(8, len(b)))]
    return b.tobytes()


def fuzz_loaders(cli: str, fx: Path, tmp: Path) -> None:
    rng = np.random.default_rng(17)
    model, mmproj = fx / "model.gguf", fx / "mmproj.gguf"
    video = fx / "clip.mp4"
    outcomes = {"ran": 0, "refused": 0}
    cases = [("model", i) for i in range(12)] + [("mmproj", i) for i in range(12)]
    if has_onnxruntime(cli):  # a CLI without ONNX Runtime refuses --ranker before reading it (integration.py checks)
        cases += [("ranker", i) for i in range(8)]
    for what, i in cases:
        source = {"model": model, "mmproj": mmproj}[what] if what != "ranker" else ranker_of(fx)
        bad = tmp / f"fuzz-{what}-{i}{source.suffix}"
        bad.write_bytes(mutate(source.read_bytes(), rng, i))
        m, p = (bad, mmproj) if what == "model" else (model, bad) if what == "mmproj" else (model, mmproj)
        extra = ["--ranker", str(bad)] if what == "ranker" else []
        try:
            r = cli_run(cli, m, p, video, *extra, "--frames", "4", timeout=120)
        except subprocess.TimeoutExpired:
            check(False, f"fuzzed {what} #{i}: no hang")
            continue
        line = one_error_line(r)
        ok = r.returncode == 0 or line is not None
        outcomes["ran" if r.returncode == 0 else "refused"] += 1
        if not ok:
            check(False, f"fuzzed {what} #{i}: exit {r.returncode}: {r.stderr.decode(errors='replace')[-400:]!r}")
        bad.unlink()
    check(outcomes["refused"] > 0, f"fuzzed loaders: {outcomes} (each ran or exited 2 with one line)")


def nan_weights_and_stops(cli: str, fx: Path, tmp: Path) -> None:
    """NaN weights are named, not answered from; Ctrl-C exits 130 with one line; too small a context is an error."""
    from gguf import GGUFReader

    for tensor, needle in (("blk.0.attn_q.weight", "attention scores"), ("output_norm.weight", "next-token logits")):
        bad = tmp / f"nan-{tensor}.gguf"
        bad.write_bytes((fx / "model.gguf").read_bytes())
        reader = GGUFReader(str(bad), "r+")
        next(t for t in reader.tensors if t.name == tensor).data[...] = np.nan
        del reader
        line = one_error_line(cli_run(cli, bad, fx / "mmproj.gguf", fx / "clip.mp4"))
        check(line is not None and f"{needle} are not finite (NaN" in line, f"NaN in {tensor}: {line}")
    if has_onnxruntime(cli):
        import onnx
        from onnx import numpy_helper

        model = onnx.load(str(ranker_of(fx)))
        w = next(t for t in model.graph.initializer if t.name == "w")
        w.CopyFrom(numpy_helper.from_array(np.full_like(numpy_helper.to_array(w), np.nan), "w"))
        onnx.save(model, str(tmp / "nan-ranker.onnx"))
        ranker = ["--ranker", str(tmp / "nan-ranker.onnx")]
        line = one_error_line(cli_run(cli, fx / "model.gguf", fx / "mmproj.gguf", fx / "clip.mp4", *ranker))
        check(line is not None and "ranker's scores are not finite" in line, f"NaN ranker: {line}")
    small = ["-c", "64", "--frames", "48", "--set-frames", "16"]  # a 601-token scoring pass
    line = one_error_line(cli_run(cli, fx / "model.gguf", fx / "mmproj.gguf", fx / "clip.mp4", *small))
    check(line is not None and "--ctx-size" in line, f"-c 64: a clear error ({line})")
    cmd = [cli, "-m", str(fx / "model.gguf"), "--mmproj", str(fx / "mmproj.gguf"), "--video", str(fx / "clip.mp4")]
    proc = subprocess.Popen([*cmd, "--frames", "4", "-t", "2"], stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(2.0)  # loading, decoding or waiting for a question on standard input: each stops at its next step
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = err.decode(errors="replace").strip().splitlines()
    check(proc.returncode == 130 and lines[-1:] == ["flexselect-cli: interrupted"], f"Ctrl-C: exit 130 ({lines[-2:]})")


def ranker_of(fx: Path) -> Path:
    """The fixture's tiny ONNX ranker (integration.py builds it; built here when this test runs first)."""
    from integration import make_rankers

    ranker = fx / "ranker.onnx"
    return ranker if ranker.exists() else make_rankers(fx, n_embd=64)[0]


def has_onnxruntime(cli: str) -> bool:
    return "ONNX Runtime: yes" in subprocess.run([cli, "--help"], capture_output=True, text=True).stdout


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cli", required=True)
    ap.add_argument("--fixture", required=True, type=Path)
    ap.add_argument("--skip-python", action="store_true", help="only the fuzz (for the sanitizer build)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="flexselect-inputs-") as tmp:
        if not args.skip_python:
            videos(args.cli, args.fixture, Path(tmp))
        fuzz_loaders(args.cli, args.fixture, Path(tmp))
        nan_weights_and_stops(args.cli, args.fixture, Path(tmp))
    if FAILURES:
        print(f"{len(FAILURES)} check(s) failed")
        return 1
    print("inputs: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
