"""Every bad input a user can give (issue 17): one `FlexSelectError` line, exit 2, no traceback, nothing written.

The CLI table runs each case through `flexselect.cli.main` and checks the exit status, that stderr is exactly one
line naming the problem, and that the case's folder holds no new file. The API table checks the same values raise a
`FlexSelectError` at construction. Then videos as players show them (tests/video_fixtures.py; cpp/tests/inputs.py
holds the C++ CLI to the same), NaN weights, and fixed-seed fuzzes of the video, GGUF and ONNX loaders.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import video_fixtures
from flexselect import cli
from flexselect.backends.base import GenerationConfig
from flexselect.errors import FlexSelectError
from flexselect.pipeline import FlexSelect, Sampling, SelectOptions
from flexselect.video import load_clip

NAN, INF = float("nan"), float("inf")
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")  # an internal exception's name leaking out
LONG_QUESTION = "What happens in the video after the red square appears? " * 2000  # ~114k characters


@pytest.fixture(scope="module")
def readonly_dir(tmp_path_factory) -> Path:
    """A folder nobody may write into. As root a chmod'ed folder stays writable, so root gets /sys (read-only)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = tmp_path_factory.mktemp("readonly")
    folder.chmod(0o555)
    return folder


@pytest.fixture(scope="module")
def animated_webp(tmp_path_factory) -> Path:
    return video_fixtures.write_animated_webp(tmp_path_factory.mktemp("webp"))


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Copies of the tiny checkpoint as an interrupted download leaves them: no weights, truncated weights."""
    root = tmp_path_factory.mktemp("broken-models")
    no_weights = Path(shutil.copytree(tiny_model_dir, root / "no-weights"))
    (no_weights / "model.safetensors").unlink()
    truncated = Path(shutil.copytree(tiny_model_dir, root / "truncated"))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"no-weights": no_weights, "truncated": truncated}


# (id, argv builder, words the one stderr line must contain). The builder gets a namespace of paths.
ANSWER = ["answer", "{video}", "What is shown?", "--model", "{model}", "--device", "cpu", "--frames", "8"]
SHOW = ["show", "{video}", "Where is the red square?", "--model", "{model}", "--device", "cpu", "--frames", "8"]
CLI_CASES = [
    ("fps-nan", ["answer", "{video}", "What?", "--model", "{model}", "--fps", "nan"], "fps must be a number > 0"),
    ("fps-inf", ["answer", "{video}", "What?", "--model", "{model}", "--fps", "inf"], "fps must be a number > 0"),
    ("start-nan", [*ANSWER, "--start", "nan"], "start must be a number >= 0"),
    ("start-negative", [*ANSWER, "--start", "-5"], "start must be a number >= 0"),
    ("end-before-start", [*ANSWER, "--start", "3", "--end", "1"], "must be after start"),
    ("frames-zero", [*ANSWER[:-1], "0"], "frames must be a whole number > 0"),
    ("max-frames-zero", [*ANSWER, "--max-frames", "0"], "max_frames must be a whole number > 0"),
    ("max-side-tiny", [*ANSWER, "--max-side", "0"], "max_side must be a whole number > 0"),
    ("budget-zero", [*ANSWER, "--budget", "0"], "budget must be a positive whole number"),
    ("set-frames-zero", [*ANSWER, "--set-frames", "0"], "set_frames must be a positive whole number"),
    ("layer-negative", [*ANSWER, "--layer", "-1"], "reference layer must be a whole number >= 0"),
    ("max-new-tokens-zero", [*ANSWER, "--max-new-tokens", "0"], "max_new_tokens must be a whole number > 0"),
    ("temperature-nan", [*ANSWER, "--temperature", "nan"], "temperature must be a number >= 0"),
    ("temperature-negative", [*ANSWER, "--temperature", "-1"], "temperature must be a number >= 0"),
    ("top-p-above-one", [*ANSWER, "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("top-p-zero", [*ANSWER, "--top-p", "0"], "top_p must be a number > 0"),
    ("device-tpu", [*ANSWER[:-4], "--device", "tpu:7"], "unknown device 'tpu:7'"),
    ("dtype-unknown", [*ANSWER, "--dtype", "float8"], "unknown dtype 'float8'"),
    ("n-ctx-zero", [*ANSWER, "--n-ctx", "0"], "n_ctx must be a whole number > 0"),
    ("model-no-weights", ["answer", "{video}", "What?", "--model", "{no_weights}"], "model.safetensors is missing"),
    ("model-truncated", ["answer", "{video}", "What?", "--model", "{truncated}"], "model.safetensors is truncated"),
    ("video-directory", ["answer", "{tmp}", "What?", "--model", "{model}"], "is a directory, not a video"),
    ("video-missing", ["answer", "{tmp}/missing.mp4", "What?", "--model", "{model}"], "video not found"),
    ("video-text", ["answer", "{text}", "What?", "--model", "{model}"], "cannot read"),
    ("video-animated-webp", ["answer", "{webp}", "What?", "--model", "{model}"], "animated WebP is not supported"),
    ("question-empty", ["answer", "{video}", "  ", "--model", "{model}"], "the question is empty"),
    (
        "question-100k",
        ["answer", "{video}", LONG_QUESTION, "--model", "{model}", "--device", "cpu"],
        "tokens; shorten the question",
    ),
    ("budget-over-video", [*ANSWER[:-1], "4", "--budget", "100000"], "larger than the video's"),
    ("show-out-missing-dir", [*SHOW, "-o", "{tmp}/no/dir/x.png"], "does not exist"),
    ("show-out-readonly", [*SHOW, "-o", "{readonly}/x.png"], "not writable"),
    ("show-out-directory", [*SHOW, "-o", "{tmp}"], "is a directory"),
    ("show-out-not-png", [*SHOW, "-o", "{tmp}/x.jpg"], "must end in .png"),
    ("show-animate-missing-dir", [*SHOW, "-o", "{tmp}/x.png", "--animate", "{tmp}/no/dir/a.gif"], "does not exist"),
    ("show-animate-readonly", [*SHOW, "-o", "{tmp}/x.png", "--animate", "{readonly}/a.gif"], "not writable"),
    ("show-animate-format", [*SHOW, "-o", "{tmp}/x.png", "--animate", "{tmp}/a.webm"], "must end in .gif or .mp4"),
    ("show-animate-fps-nan", [*SHOW, "--animate-fps", "nan"], "--animate-fps must be a number > 0"),
    ("show-video-directory", ["show", "{tmp}", "Q?", "--model", "{model}", "-o", "{tmp}/x.png"], "is a directory"),
    ("export-gguf-readonly", ["export", "gguf", "{model}", "{readonly}/out"], "not writable"),
    ("export-gguf-onto-file", ["export", "gguf", "{model}", "{text}"], "is a file, not a folder"),
    ("lite-export-readonly", ["lite-export", "{tmp}/bundle", "--out", "{readonly}/out"], "not writable"),
]


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(
    argv, expected, capsys, tmp_path, tiny_model_dir, test_video, broken_models, readonly_dir, animated_webp
):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    paths = {
        "video": test_video,
        "webp": animated_webp,
        "model": tiny_model_dir,
        "tmp": tmp_path,
        "text": text,
        "readonly": readonly_dir,
        "no_weights": broken_models["no-weights"],
        "truncated": broken_models["truncated"],
    }
    before = sorted(tmp_path.rglob("*"))
    code = cli.main([arg.format(**paths) for arg in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("flexselect: error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err and not EXCEPTION_NAME.search(lines[0]), err
    assert sorted(tmp_path.rglob("*")) == before  # nothing written, not even an empty folder
    assert not out


def test_cli_process_exit_status(test_video):
    """The real command: the exit status a shell sees, and a clean stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "flexselect", "answer", str(test_video), "What?", "--model", "m", "--fps", "nan"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["flexselect: error: fps must be a number > 0, got nan"]


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys, tiny_model_dir, test_video):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(FlexSelect, "load", classmethod(interrupted))
    code = cli.main(["answer", str(test_video), "What?", "--model", str(tiny_model_dir)])
    assert code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["flexselect: interrupted"]


def test_show_leaves_no_png_when_the_animation_fails(monkeypatch, capsys, tmp_path, tiny_model_dir, test_video):
    import flexselect.show

    def failing(*args, **kwargs):
        raise FlexSelectError("the animation could not be written")

    monkeypatch.setattr(flexselect.show, "write_animation", failing)
    code = cli.main(
        [
            "show",
            str(test_video),
            "Where?",
            "--model",
            str(tiny_model_dir),
            "--device",
            "cpu",
            "--frames",
            "8",
            "--budget",
            "40",
            "-o",
            str(tmp_path / "x.png"),
            "--animate",
            str(tmp_path / "a.gif"),
        ]
    )
    assert code == 2
    assert "animation could not be written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_export_gguf_leaves_no_folders_when_the_conversion_fails(tmp_path, tiny_model_dir):
    from flexselect_export.gguf import export_gguf

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "convert_hf_to_gguf.py").write_text("import sys\nsys.exit('conversion failed')\n")
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(FlexSelectError, match="converter failed"):
        export_gguf(tiny_model_dir, out, llama_dir=llama)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]


def test_export_gguf_without_the_gguf_package_fails_first(monkeypatch, tmp_path, tiny_model_dir):
    from flexselect_export.gguf import export_gguf

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    with pytest.raises(FlexSelectError, match="gguf package is missing"):
        export_gguf(tiny_model_dir, tmp_path / "out", llama_dir=tmp_path / "never-used")
    assert list(tmp_path.iterdir()) == []


API_CASES = [
    ("sampling-fps-inf", lambda: Sampling(fps=INF), "fps must be a number > 0"),
    ("sampling-start-nan", lambda: Sampling(start=NAN), "start must be a number >= 0"),
    ("sampling-frames-float", lambda: Sampling(frames=2.5), "frames must be a whole number"),
    ("sampling-frames-and-fps", lambda: Sampling(frames=8, fps=2.0), "either frames or fps"),
    ("sampling-end-negative", lambda: Sampling(end=-1.0), "end must be a number > 0"),
    ("select-magic", lambda: SelectOptions(selector="magic"), "selector must be"),
    ("select-aggregate", lambda: SelectOptions(aggregate="sum"), "aggregate must be"),
    ("select-budget-bool", lambda: SelectOptions(budget=True), "budget must be"),
    ("select-layer-float", lambda: SelectOptions(layer=1.5), "reference layer"),
    ("select-set-frames-zero", lambda: SelectOptions(set_frames=0), "set_frames must be"),
    ("generation-zero-tokens", lambda: GenerationConfig(max_new_tokens=0), "max_new_tokens"),
    ("generation-temperature-nan", lambda: GenerationConfig(temperature=NAN), "temperature"),
    ("generation-top-p", lambda: GenerationConfig(top_p=2.0), "top_p must be in (0, 1]"),
    ("generation-seed", lambda: GenerationConfig(seed="x"), "seed must be a whole number"),
    ("load-positions", lambda: FlexSelect.load("m", positions="diagonal"), "positions must be"),
    ("load-n-ctx", lambda: FlexSelect.load(gguf="m.gguf", mmproj="p.gguf", n_ctx=0), "n_ctx must be"),
    ("load-n-gpu-layers", lambda: FlexSelect.load(gguf="m.gguf", n_gpu_layers=-2), "n_gpu_layers"),
]


@pytest.mark.parametrize("make, expected", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_refuses_at_construction(make, expected):
    with pytest.raises(FlexSelectError) as e:
        make()
    assert expected in str(e.value)


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"fps": INF}, "fps must be"),
        ({"start": NAN}, "start must be"),
        ({"num_frames": 0}, "frames must be"),
        ({"end": NAN}, "end must be"),
        ({"max_frames": -1}, "max_frames must be"),
    ],
)
def test_video_loader_refuses_bad_values(test_video, kwargs, expected):
    with pytest.raises(FlexSelectError, match=expected):
        load_clip(test_video, **kwargs)


def test_api_device_and_model_folder(tiny_model_dir, broken_models, tmp_path):
    with pytest.raises(FlexSelectError, match="unknown device 'tpu:7'"):
        FlexSelect.load(tiny_model_dir, device="tpu:7")
    with pytest.raises(FlexSelectError, match="unknown dtype"):
        FlexSelect.load(tiny_model_dir, dtype="int3")
    for name, problem in (("no-weights", "missing"), ("truncated", "truncated")):
        with pytest.raises(FlexSelectError, match=f"model.safetensors is {problem}"):
            FlexSelect.load(broken_models[name])


def test_api_directory_as_video(tiny_backend, tmp_path):
    with pytest.raises(FlexSelectError, match="is a directory, not a video"):
        FlexSelect(tiny_backend).encode(tmp_path, Sampling(frames=4))


def test_fuzzed_videos_decode_or_fail_cleanly(test_video, tmp_path):
    """36 mutated copies (truncations, byte flips, both): each decodes or raises FlexSelectError, nothing else."""
    rng = np.random.default_rng(17)
    data = np.frombuffer(test_video.read_bytes(), dtype=np.uint8)
    outcomes = {"decoded": 0, "refused": 0}
    for i in range(36):
        mutated = data.copy()
        if i % 3 != 1:  # flip bytes, never the first 8 (the container's signature), so the decoders get a real try
            at = rng.integers(8, len(mutated), size=int(rng.integers(1, 64)))
            mutated[at] ^= rng.integers(1, 256, size=len(at), dtype=np.uint8)
        if i % 3 != 0:
            mutated = mutated[: int(rng.integers(16, len(mutated)))]
        path = tmp_path / f"fuzz{i}.mp4"
        path.write_bytes(mutated.tobytes())
        try:
            clip = load_clip(path, num_frames=4, max_side=64)
        except FlexSelectError as e:
            assert "\n" not in str(e) and not EXCEPTION_NAME.search(str(e)), str(e)
            outcomes["refused"] += 1
        else:
            assert clip.frames.ndim == 4 and len(clip.frames) == len(clip.timestamps) >= 1
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0  # the mutations do break files: the test exercises the error paths


@pytest.fixture(scope="module")
def odd_videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("odd-videos")
    files = video_fixtures.write_all(folder)
    files["damaged"] = video_fixtures.write_damaged(folder, files["mpeg-ts"])
    return files


def _sequential_frames(path: Path) -> np.ndarray:
    """Every frame, decoded in order by PyAV (no seeking, no sampling): what the sampled frames must be taken from."""
    import av

    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_vfr_is_sampled_in_time_with_true_timestamps(odd_videos):
    """2 fps for 3 s then 25 fps for 2 s: 8 frames spread evenly over the 5 s (in index space 6 of 8 would fall in the
    fast last 2 s), each stamped with its presentation time and showing that frame's picture."""
    for decoder in ("decord", "pyav"):
        clip = load_clip(odd_videos["vfr"], num_frames=8, decoder=decoder)
        assert clip.timestamps.tolist() == [0.0, 0.5, 1.5, 2.0, 2.5, 3.48, 4.12, 4.76], decoder
        shown = np.asarray(video_fixtures.VFR) / 1000
        assert set(clip.timestamps) <= set(shown)
        frames = _sequential_frames(odd_videos["vfr"])
        for t, f in zip(clip.timestamps, clip.frames):
            assert np.array_equal(f, frames[list(shown).index(t)]), (decoder, t)


@pytest.mark.parametrize("name, turns", [("rotated-90", 1), ("rotated-270", 3)])
def test_rotation_is_applied_by_both_decoders(odd_videos, name, turns):
    coded = _sequential_frames(odd_videos[name])
    for decoder in ("decord", "pyav"):
        clip = load_clip(odd_videos[name], num_frames=4, decoder=decoder)
        assert clip.frames.shape[1:3] == (video_fixtures.W, video_fixtures.H), decoder  # portrait, as displayed
        idx = np.round(clip.timestamps * 8).astype(int)
        assert np.array_equal(clip.frames, np.rot90(coded[idx], turns, axes=(1, 2))), decoder


@pytest.mark.parametrize("name", ["mpeg-ts", "annex-b", "gif"])
def test_streams_without_an_index_decode_the_right_frames(odd_videos, name):
    """decord opens an MPEG-TS but returned one frame for every index: such files are streamed with PyAV."""
    clip = load_clip(odd_videos[name], num_frames=6)
    frames = _sequential_frames(odd_videos[name])
    idx = np.round(clip.timestamps * 8).astype(int)
    assert len(clip.frames) == 6 and len(set(idx.tolist())) == 6
    assert np.array_equal(clip.frames, frames[idx])


def test_tiny_video_gives_one_token_per_unit(odd_videos, tiny_backend):
    """16x16 frames are scaled up to one 28x28 merge block, never further (the C++ runtime does the same)."""
    clip = load_clip(odd_videos["tiny"], num_frames=8)
    visual = tiny_backend.encode(clip)
    assert visual.grid == (1, 1) and visual.num_frames == 4


def test_damaged_packets_are_skipped_with_a_warning(tmp_path, test_video, caplog):
    """The policy on both paths: a packet that does not decode is skipped with a warning, the rest is used."""
    import av

    data = bytearray(test_video.read_bytes())
    with av.open(str(test_video)) as c:  # garbage over one mid-file packet's payload (the container intact)
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size > 64 and p.pos is not None]
    pos, size = packets[len(packets) // 2]
    data[pos : pos + size] = bytes(size)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="flexselect"):
        clip = load_clip(broken, num_frames=48, decoder="pyav")
    assert len(clip.frames) >= 40  # the rest of the file is used
    assert "damaged packet(s) could not be decoded and were skipped" in caplog.text


def test_nan_weights_are_named(tiny_model_dir, test_video):
    """NaN in the scoring layers (scores) or only in the final norm (logits): one FlexSelectError, not an answer."""
    import torch

    from flexselect.backends.hf.qwen2_5_vl import Qwen25VLBackend

    for param, what in (("layers.0.self_attn.q_proj.weight", "attention scores"), ("norm.weight", "logits")):
        backend = Qwen25VLBackend.load(tiny_model_dir, device="cpu", dtype="float32")
        with torch.no_grad():
            backend.model.model.language_model.get_parameter(param).fill_(float("nan"))
        with pytest.raises(FlexSelectError, match=f"{what} are not finite"):
            FlexSelect(backend).answer(
                test_video, "What?", Sampling(frames=8), SelectOptions(budget=24, layer=1), GenerationConfig(2)
            )


LOADER_FUZZ = """
import json, sys
from pathlib import Path
from flexselect.errors import FlexSelectError
from flexselect.lite.onnx_ranker import OnnxRanker
from flexselect.pipeline import FlexSelect
mmproj = sys.argv[1]
for path in sys.argv[2:]:
    try:
        if path.endswith(".onnx"):
            OnnxRanker.load(path)
        else:
            FlexSelect.load(gguf=path, mmproj=mmproj, n_gpu_layers=0, n_ctx=512)
        out = "loaded"
    except FlexSelectError as e:
        out = "refused" if "\\n" not in str(e) else "multi-line: " + str(e)
    except Exception as e:
        out = f"{type(e).__name__}: {e}"
    print(json.dumps([path, out]), flush=True)
"""


def test_fuzzed_gguf_and_onnx_loaders_fail_cleanly(tiny_model_dir, tmp_path):
    """16 mutated GGUFs and 8 mutated ONNX rankers through the Python loaders, in a child process so a crash in
    llama.cpp would show as one: each loads or raises FlexSelectError, nothing else, no hang."""
    from flexselect_export.gguf import export_gguf

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cpp" / "tests"))
    from inputs import mutate
    from integration import make_rankers

    model, mmproj = export_gguf(tiny_model_dir, tmp_path / "gguf", "f32")
    ranker = make_rankers(tmp_path, n_embd=64)[0]
    rng = np.random.default_rng(17)
    paths = []
    for i in range(24):
        source = model if i < 16 else ranker
        path = tmp_path / f"fuzz{i}{source.suffix}"
        path.write_bytes(mutate(source.read_bytes(), rng, i))
        paths.append(str(path))
    proc = subprocess.run(
        [sys.executable, "-c", LOADER_FUZZ, str(mmproj), *paths], capture_output=True, text=True, timeout=300
    )
    results = dict(json.loads(line) for line in proc.stdout.splitlines())
    assert proc.returncode == 0 and len(results) == len(paths), proc.stderr[-2000:]
    assert all(r in ("loaded", "refused") for r in results.values()), results
    assert sum(r == "refused" for r in results.values()) > 0
