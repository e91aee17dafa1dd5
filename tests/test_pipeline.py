"""End to end through the public API and the CLI on the tiny random model and generated videos."""

import json
import os
import subprocess
import sys

import pytest
import torch

from flexselect import FlexSelect, FlexSelectError, Sampling, SelectOptions
from flexselect.backends.base import GenerationConfig
from flexselect.cli import main


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return FlexSelect.load(tiny_model_dir, device="cpu", dtype="float32")


def test_answer_keeps_exactly_the_budget_in_time_order_and_reuses_the_encoding(pipe, test_video, monkeypatch):
    sampling = Sampling(frames=32, max_side=112)
    first = pipe.answer(
        test_video,
        "Is there a red square?",
        sampling=sampling,
        generation=GenerationConfig(max_new_tokens=4),
        options=SelectOptions(budget=24, set_frames=4),
    )
    assert isinstance(first.text, str)
    assert first.stats["kept_tokens"] == 24 == len(first.selection.kept)
    assert torch.all(first.selection.kept[1:] > first.selection.kept[:-1])  # strictly increasing: time order
    assert first.stats["frame_sets"] == 4 and first.stats["frames"] == 32
    assert first.selection.kept_per_frame(first.visual).sum() == 24

    calls = []
    monkeypatch.setattr(pipe.backend, "encode", lambda *a, **k: calls.append(1))
    second = pipe.answer(
        test_video,
        "What moves?",
        sampling=sampling,
        generation=GenerationConfig(max_new_tokens=2),
        options=SelectOptions(budget=24, set_frames=4),
    )
    assert calls == [] and second.stats["video_cached"] and second.visual is first.visual


def test_selector_none_keeps_every_token(pipe, test_video):
    result = pipe.answer(
        test_video,
        "Describe it.",
        sampling=Sampling(frames=8, max_side=112),
        generation=GenerationConfig(max_new_tokens=1),
        options=SelectOptions(selector="none"),
    )
    assert result.stats["kept_tokens"] == result.stats["visual_tokens"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"layer": -1}, "reference layer must be a whole number >= 0"),
        ({"budget": 0}, "budget must be a positive whole number"),
        ({"set_frames": 2.5}, "set_frames must be a positive whole number"),
        ({"selector": "magic"}, "selector must be"),
        ({"aggregate": "median"}, "aggregate must be"),
    ],
)
def test_bad_select_options_are_refused_when_made(kwargs, message):
    with pytest.raises(FlexSelectError, match=message):
        SelectOptions(**kwargs)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"question": ""}, "question is empty"),
        ({"question": "   "}, "question is empty"),
        ({"options": SelectOptions(budget=10_000)}, "larger than the video"),
        ({"options": SelectOptions(layer=4)}, "out of range"),
    ],
)
def test_bad_input_is_a_clear_error(pipe, test_video, kwargs, message):
    args = {"question": "What?", "sampling": Sampling(frames=8, max_side=112), **kwargs}
    with pytest.raises(FlexSelectError, match=message):
        pipe.answer(test_video, args.pop("question"), **args)


def test_context_overflow_is_refused_before_the_pass(pipe, test_video, monkeypatch):
    config = pipe.backend.text_model.config
    sampling = Sampling(frames=16, max_side=112)  # 8 units x 12 tokens
    monkeypatch.setattr(config, "max_position_embeddings", 90)
    generation = GenerationConfig(max_new_tokens=8)
    with pytest.raises(
        FlexSelectError,
        match=r"scoring pass of a frame set needs \d+ tokens \(\d+ of prompt and "
        r"question, 96 visual\) but this model takes at most 90: keep fewer",
    ):
        pipe.answer(
            test_video,
            "What?",
            sampling=sampling,
            options=SelectOptions(budget=24, set_frames=8),
            generation=generation,
        )
    with pytest.raises(
        FlexSelectError, match=r"answer needs \d+ tokens \(\d+ of prompt and question, 96 visual, 8 new"
    ):
        pipe.answer(
            test_video, "What?", sampling=sampling, options=SelectOptions(selector="none"), generation=generation
        )
    with pytest.raises(FlexSelectError, match="no room is left for the video.*generate fewer tokens"):
        pipe.answer(test_video, "What?", sampling=sampling)  # 128 new tokens alone exceed the 90


def test_one_call_form_keeps_only_the_most_recent_models_loaded(monkeypatch, test_video):
    from flexselect import pipeline

    loads = []

    class Loaded:
        def __init__(self, model):
            self.model = model

        def answer(self, video, question, **options):
            return self.model

    monkeypatch.setattr(pipeline, "_LOADED", type(pipeline._LOADED)())
    monkeypatch.setattr(
        pipeline.FlexSelect, "load", classmethod(lambda cls, model, **kw: loads.append(model) or Loaded(model))
    )
    for model in ["a", "b", "a", "c", "a", "b"]:
        assert pipeline.answer(test_video, "What?", model) == model
    assert loads == ["a", "b", "c", "b"]  # "a" stayed loaded (used last before "c"); "b" was dropped for "c"
    assert len(pipeline._LOADED) == pipeline.KEEP_LOADED


def test_bad_files_are_clear_errors(pipe, tmp_path, test_video):
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video")
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(test_video.read_bytes()[:2000])
    for path in (tmp_path / "missing.mp4", text, truncated):
        with pytest.raises(FlexSelectError):
            pipe.answer(path, "What?", sampling=Sampling(frames=8))


def test_model_folder_errors(tmp_path):
    with pytest.raises(FlexSelectError, match="config.json"):
        FlexSelect.load(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(FlexSelectError, match="supported"):
        FlexSelect.load(tmp_path)
    with pytest.raises(FlexSelectError, match="--mmproj"):
        FlexSelect.load(gguf=tmp_path / "model.gguf")


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_json_output(capsys, tiny_model_dir, test_video):
    code, out, _ = run_cli(
        capsys,
        "answer",
        str(test_video),
        "Where is the red square?",
        "--model",
        str(tiny_model_dir),
        "--frames",
        "16",
        "--budget",
        "48",
        "--set-frames",
        "4",
        "--max-new-tokens",
        "3",
        "--device",
        "cpu",
        "--json",
    )
    assert code == 0
    result = json.loads(out)
    assert result["stats"]["kept_tokens"] == 48 == len(result["kept_token_indices"])
    assert result["demo"] is False and set(result["stats"]["seconds"]) >= {"decode", "encode", "select", "total"}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["missing.mp4", "What?", "--model", "{model}"], "not found"),
        (["{video}", "", "--model", "{model}"], "question is empty"),
        (["{video}", "What?", "--model", "{model}", "--frames", "0"], "frame"),
        (["{video}", "What?", "--model", "{model}", "--frames", "8", "--layer", "9"], "out of range"),
        (["{video}", "What?"], "no model given"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(capsys, tiny_model_dir, test_video, argv, message):
    argv = [a.format(model=tiny_model_dir, video=test_video) for a in argv]
    code, out, err = run_cli(capsys, "answer", *argv, "--device", "cpu")
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("flexselect: error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


# Importable only through extras (gguf, lite, plot, test) or not installed at all by `pip install -e .`.
NOT_IN_A_BASE_INSTALL = (
    "llama_cpp",
    "gguf",
    "onnxruntime",
    "onnx",
    "onnxscript",
    "matplotlib",
    "scipy",
    "pytest",
    "google",
)


def test_cli_demo_runs_offline_on_a_base_install(tmp_path):
    """The README's first command: the demo works with none of the extras' packages importable."""
    script = (
        "import sys\n"
        f"for name in {NOT_IN_A_BASE_INSTALL!r}: sys.modules[name] = None  # import fails, find_spec says absent\n"
        "from flexselect.cli import main\n"
        "sys.exit(main(['answer', '--json', '--max-new-tokens', '2']))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "FLEXSELECT_CACHE": str(tmp_path)},
    )
    assert done.returncode == 0 and "DEMO" in done.stderr, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert result["demo"] is True and result["stats"]["kept_tokens"] < result["stats"]["visual_tokens"]
