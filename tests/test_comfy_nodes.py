"""The ComfyUI node pack without ComfyUI: the V1 node contract, the example workflow run through the node functions
on a generated video and the tiny random model, cancel between frames and frame sets, the memory check before any
decoding, clear errors, and no input ever changed (ComfyUI caches outputs and shares them between nodes)."""

from __future__ import annotations

import copy
import inspect
import io
import json
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import comfy_nodes  # noqa: E402
from comfy_nodes import comfy_compat as compat  # noqa: E402
from comfy_nodes import nodes as N  # noqa: E402
from flexselect.errors import FlexSelectError  # noqa: E402

WORKFLOWS = ROOT / "comfy_nodes" / "example_workflows"
CORE_IDS = {"LoadVideo", "GetVideoComponents", "CreateVideo", "SaveVideo", "LoadImage", "PreviewImage", "SaveImage",
            "CheckpointLoaderSimple", "KSampler", "VAEDecode", "CLIPTextEncode", "UpscaleModelLoader"}
LINK_TYPES = {"FLEXSELECT_CLIP", "FLEXSELECT_MODEL", "FLEXSELECT_RANKER", "FLEXSELECT_SELECTION", "VIDEO", "IMAGE"}
VIDEO_NAME = "needle.mp4"
FRAMES = 16


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture(scope="module")
def comfy_env(tmp_path_factory, tiny_model_dir):
    """A stand-in ComfyUI tree: an input folder with a generated video, the tiny model's parent as models/LLM."""
    from flexselect.video import write_test_video

    root = tmp_path_factory.mktemp("comfy")
    saved = (compat._fallback_root, dict(compat._fallback_folders))
    compat._fallback_root = root
    compat._fallback_folders.clear()
    compat.add_model_folder(compat.LLM_FOLDER, Path(tiny_model_dir).parent)
    write_test_video(Path(compat.input_directory()) / VIDEO_NAME, num_frames=48, fps=8.0, width=168, height=112,
                     needle_frames=(20, 21))
    yield SimpleNamespace(root=root, model_name=Path(tiny_model_dir).name)
    N._model_cache.free()
    compat._fallback_root = saved[0]
    compat._fallback_folders.clear()
    compat._fallback_folders.update(saved[1])


def api_workflow(env, **overrides) -> dict:
    wf = json.loads((WORKFLOWS / "flexselect_qa_api.json").read_text())
    wf["1"]["inputs"].update(file=VIDEO_NAME, frames=FRAMES, max_side=112, preview_frames=6)
    wf["2"]["inputs"].update(model=env.model_name, device="cpu", dtype="float32")
    wf["3"]["inputs"].update(budget=24, preview_frames=8)  # 8 units x 12 tokens (3x4 grid): 25% kept, 2 sets
    wf["3"]["inputs"].update(set_frames=4)
    wf["4"]["inputs"].update(max_new_tokens=6)
    for node_id, inputs in overrides.items():
        wf[node_id]["inputs"].update(inputs)
    return wf


def run_workflow(wf: dict) -> dict:
    """Run an API-format workflow through the node functions in dependency order, as ComfyUI would."""
    outputs: dict[str, tuple] = {}
    ui: dict[str, dict] = {}
    pending = dict(wf)
    while pending:
        ready = [k for k, node in pending.items()
                 if all(not isinstance(v, list) or v[0] in outputs for v in node["inputs"].values())]
        assert ready, f"cycle or dangling link among {list(pending)}"
        for node_id in sorted(ready, key=int):
            node = pending.pop(node_id)
            args = {k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
            if node["class_type"] == "PreviewImage":  # core node: only check what it would be given
                images = args["images"]
                assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[-1] == 3
                assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
                outputs[node_id] = ()
                continue
            cls = N.NODE_CLASS_MAPPINGS[node["class_type"]]
            with torch.inference_mode():  # ComfyUI runs nodes in inference mode
                out = getattr(cls(), cls.FUNCTION)(**args)
            if isinstance(out, dict):
                ui[node_id] = out["ui"]
                out = out["result"]
            assert isinstance(out, tuple) and len(out) == len(cls.RETURN_TYPES)
            outputs[node_id] = out
    return {"outputs": outputs, "ui": ui}


# -- contract ---------------------------------------------------------------------------------------------------------
def test_node_contract():
    mappings, names = comfy_nodes.NODE_CLASS_MAPPINGS, comfy_nodes.NODE_DISPLAY_NAME_MAPPINGS
    assert set(mappings) == set(names)
    assert {"FlexSelectLoadVideo", "FlexSelect", "FlexSelectAnswer"} <= set(mappings)
    assert not set(mappings) & CORE_IDS
    assert len(set(names.values())) == len(names)
    for node_id, cls in mappings.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        for section, inputs in spec.items():
            for name, s in inputs.items():
                assert isinstance(s, tuple) and 1 <= len(s) <= 2, (node_id, name)
                kind = s[0]
                assert isinstance(kind, list) and kind and all(isinstance(o, str) for o in kind) or \
                    kind in {"INT", "FLOAT", "STRING", "BOOLEAN"} | LINK_TYPES, (node_id, name, kind)
                opts = s[1] if len(s) == 2 else {}
                assert isinstance(opts, dict)
                if kind in ("INT", "FLOAT") and "default" in opts:
                    assert opts["min"] <= opts["default"] <= opts["max"], (node_id, name)
                assert name in params, f"{node_id}.{cls.FUNCTION} does not take {name}"
                if section == "optional":
                    assert params[name].default is None, (node_id, name)
        assert isinstance(cls.RETURN_TYPES, tuple) and cls.RETURN_TYPES
        assert len(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)) == len(cls.RETURN_TYPES)
        if hasattr(cls, "OUTPUT_TOOLTIPS"):
            assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES)
        assert callable(getattr(cls, cls.FUNCTION))
        assert cls.CATEGORY == "FlexSelect"
        assert not hasattr(cls, "define_schema")  # V1 only: both 0.3.x and newer load it
    assert mappings["FlexSelectAnswer"].OUTPUT_NODE is True
    load_video = mappings["FlexSelectLoadVideo"].INPUT_TYPES()
    assert load_video["required"]["file"][1].get("video_upload") is True
    assert load_video["optional"]["video"][0] == "VIDEO"


def test_ui_workflow_matches_api_workflow():
    api = json.loads((WORKFLOWS / "flexselect_qa_api.json").read_text())
    ui = json.loads((WORKFLOWS / "flexselect_qa.json").read_text())
    assert {str(n["id"]): n["type"] for n in ui["nodes"]} == {k: v["class_type"] for k, v in api.items()}
    for node in ui["nodes"]:
        api_inputs = api[str(node["id"])]["inputs"]
        if node["type"] not in N.NODE_CLASS_MAPPINGS:
            continue
        spec = N.NODE_CLASS_MAPPINGS[node["type"]].INPUT_TYPES()
        expected = []
        for name, s in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                expected.append(api_inputs[name])
                if s[1].get("video_upload"):
                    expected.append("image")  # the upload button's serialized value
                if name == "seed":
                    expected.append("fixed")  # control_after_generate
        assert node["widgets_values"] == expected, node["type"]
    for link_id, src, slot, dst, dst_slot, kind in ui["links"]:
        src_node = next(n for n in ui["nodes"] if n["id"] == src)
        dst_node = next(n for n in ui["nodes"] if n["id"] == dst)
        assert src_node["outputs"][slot]["type"] == kind and link_id in src_node["outputs"][slot]["links"]
        assert dst_node["inputs"][dst_slot]["link"] == link_id


# -- the example workflow ---------------------------------------------------------------------------------------------
def test_example_workflow_runs(comfy_env):
    assert comfy_env.model_name in N.model_choices()
    assert VIDEO_NAME in N.FlexSelectLoadVideo.INPUT_TYPES()["required"]["file"][0]
    run = run_workflow(api_workflow(comfy_env))
    clip, preview, info = run["outputs"]["1"]
    # 168x112 scaled to a 112 longest side: 112x74.67 -> even sides (flexselect.video.output_size)
    assert clip.frames.shape == (FRAMES, 74, 112, 3) and clip.frames.dtype == np.uint8
    assert preview.shape == (6, 74, 112, 3) and preview.dtype == torch.float32
    assert f"{FRAMES} frames" in info
    selection, heatmap, sel_info = run["outputs"]["3"]
    assert heatmap.ndim == 4 and heatmap.shape[0] == 1 and heatmap.shape[-1] == 3  # one contact sheet
    assert len(selection.kept) == 24 and selection.kept_per_frame.sum() == 24
    assert len(selection.selection.sets) == 2 and "kept 24 of 96" in sel_info
    (answer,) = run["outputs"]["4"]
    assert isinstance(answer, str)
    assert run["ui"]["4"] == {"text": [answer]}

    frames_mode = run_workflow(api_workflow(comfy_env, **{"3": {"preview": "frames"}}))
    heat = frames_mode["outputs"]["3"][1]
    assert heat.shape == (8, 74, 112, 3)
    # The kept tokens are red: some pixel of the overlays is much redder than green.
    assert bool(((heat[..., 0] - heat[..., 1]) > 0.3).any())


def test_second_question_reuses_the_encoded_clip(comfy_env):
    loader = N.FlexSelectLoadVideo()
    clip = loader.load(VIDEO_NAME, 8, 0.0, 0.0, 0.0, 112, 0.0, 2)[0]
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    node = N.FlexSelect()
    first = node.select(clip, model, "What is red?", 8, -1, 0, "contact sheet", 4)[0]
    second = node.select(clip, model, "When does it appear?", 8, -1, 0, "contact sheet", 4)[0]
    assert not first.timing["encode_cached"] and second.timing["encode_cached"]
    assert second.visual is first.visual


# -- cancel -----------------------------------------------------------------------------------------------------------
def interrupt_at(monkeypatch, n: int) -> list:
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            raise Interrupted(f"interrupted at check {n}")

    monkeypatch.setattr(compat, "throw_if_interrupted", check)
    return calls


def test_cancel_stops_decoding_at_the_next_frame(comfy_env, monkeypatch):
    from flexselect import video as fv

    decoded = []
    real_load_clip = fv.load_clip

    def counting_load_clip(*args, on_frame=None, **kwargs):
        def spy(i, n):
            decoded.append(i)
            on_frame(i, n)
        return real_load_clip(*args, on_frame=spy, **kwargs)

    monkeypatch.setattr(fv, "load_clip", counting_load_clip)
    calls = interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        N.FlexSelectLoadVideo().load(VIDEO_NAME, FRAMES, 0.0, 0.0, 0.0, 112, 0.0, 4)
    assert len(calls) == 3 and len(decoded) == 3  # nothing decoded after the interrupting frame's callback


def test_cancel_stops_selection_between_frame_sets(comfy_env, monkeypatch):
    clip = N.FlexSelectLoadVideo().load(VIDEO_NAME, FRAMES, 0.0, 0.0, 0.0, 112, 0.0, 2)[0]
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    scored = []
    pipe = N._model_cache.get(model)
    real_score = pipe.backend.score

    def counting_score(*args, **kwargs):
        scored.append(1)
        return real_score(*args, **kwargs)

    monkeypatch.setattr(pipe.backend, "score", counting_score)
    N._model_cache.put_visual(clip, model, pipe.encode(clip)[0])  # encoded: only select-stage checks remain
    calls = interrupt_at(monkeypatch, 3)  # 1: node start, 2: after set 1, 3: after set 2 of 4
    with pytest.raises(Interrupted):
        N.FlexSelect().select(clip, model, "What is red?", 8, -1, 2, "contact sheet", 4)
    assert len(calls) == 3 and len(scored) == 2  # sets 3 and 4 never scored


def test_cancel_stops_the_answer_between_tokens(comfy_env, monkeypatch):
    from flexselect.backends.hf import shared as hf

    clip = N.FlexSelectLoadVideo().load(VIDEO_NAME, FRAMES, 0.0, 0.0, 0.0, 112, 0.0, 2)[0]
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    selection = N.FlexSelect().select(clip, model, "What is red?", 8, -1, 2, "contact sheet", 4)[0]
    monkeypatch.setattr(N._model_cache.get(model).backend, "eos_token_ids", set())  # never stops by itself
    sampled = []
    real_sample = hf.sample
    monkeypatch.setattr(hf, "sample", lambda *a: sampled.append(1) or real_sample(*a))
    calls = interrupt_at(monkeypatch, 3)  # 1: node start, 2: after token 1, 3: after token 2
    with pytest.raises(Interrupted):
        N.FlexSelectAnswer().answer(selection, model, 64, 0.0, 1.0, 0)
    assert len(calls) == 3 and len(sampled) == 2  # 62 of the 64 tokens never generated


# -- memory and bad inputs --------------------------------------------------------------------------------------------
def test_huge_request_is_refused_before_decoding(comfy_env, monkeypatch):
    from flexselect import video as fv

    def must_not_decode(*a, **k):
        raise AssertionError("load_clip was called although the request is over the memory limit")

    monkeypatch.setattr(fv, "load_clip", must_not_decode)
    with pytest.raises(FlexSelectError, match=r"refusing to load 48 frames .* MiB.*memory_limit_gb = 0\.0001"):
        N.FlexSelectLoadVideo().load(VIDEO_NAME, 8192, 0.0, 0.0, 0.0, 4096, 0.0001, 16)
    # An hour of 4K at 60 fps, 8192 frames at full size asked for, default limit (half of the RAM available now).
    info = fv.VideoInfo(path="4k.mp4", num_frames=216000, fps=60.0, duration=3600.0, width=3840, height=2160)
    monkeypatch.setattr(fv, "probe", lambda path: info)
    monkeypatch.setattr(compat, "available_ram_bytes", lambda: 16 * 2**30)
    with pytest.raises(FlexSelectError, match=r"refusing to load 8192 frames of 3840x2160 .* needs about "
                                              r"\d+\.\d\d GiB, over the limit of 8\.00 GiB \(50% of the 16\.00 GiB "
                                              r"of RAM available now"):
        N.FlexSelectLoadVideo().load(VIDEO_NAME, 8192, 0.0, 0.0, 0.0, 4096, 0.0, 16)
    # The same video sampled sensibly (2 fps over a minute, 448 px) is accepted up to the decoder.
    with pytest.raises(AssertionError, match="load_clip was called"):
        N.FlexSelectLoadVideo().load(VIDEO_NAME, 8192, 2.0, 0.0, 60.0, 448, 0.0, 16)


def test_bad_inputs_give_clear_errors(comfy_env):
    loader = N.FlexSelectLoadVideo()
    with pytest.raises(FlexSelectError, match="no video"):
        loader.load(N.NO_FILE, 8, 0.0, 0.0, 0.0, 112, 0.0, 2)
    with pytest.raises(FlexSelectError, match="video not found"):
        loader.load("missing.mp4", 8, 0.0, 0.0, 0.0, 112, 0.0, 2)
    with pytest.raises(FlexSelectError, match="must be after start"):
        loader.load(VIDEO_NAME, 8, 0.0, 3.0, 2.0, 112, 0.0, 2)
    with pytest.raises(FlexSelectError, match="no model"):
        N.FlexSelectLoadModel().load(N.NO_MODEL, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    with pytest.raises(FlexSelectError, match="not found in the LLM model folders"):
        N.FlexSelectLoadModel().load("../../etc", N.AUTO_MMPROJ, "cpu", "float32", 32768)
    with pytest.raises(FlexSelectError, match="no ranker"):
        N.FlexSelectLoadRanker().load(N.NO_RANKER)
    clip = loader.load(VIDEO_NAME, 4, 0.0, 0.0, 0.0, 112, 0.0, 2)[0]
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    with pytest.raises(FlexSelectError, match="question is empty"):
        N.FlexSelect().select(clip, model, "   ", 8, -1, 0, "contact sheet", 4)
    with pytest.raises(FlexSelectError, match="larger than the video's"):
        N.FlexSelect().select(clip, model, "What?", 10_000, -1, 0, "contact sheet", 4)
    with pytest.raises(FlexSelectError, match="out of range"):
        N.FlexSelect().select(clip, model, "What?", 8, 99, 0, "contact sheet", 4)
    selection = N.FlexSelect().select(clip, model, "What?", 8, -1, 0, "contact sheet", 4)[0]
    (other,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float64", 32768)
    with pytest.raises(FlexSelectError, match="another model"):
        N.FlexSelectAnswer().answer(selection, other, 4, 0.0, 1.0, 0)


# -- VIDEO input ------------------------------------------------------------------------------------------------------
class FileVideo:
    """Like core's VideoFromFile: a path or BytesIO source, and a get_components() that must never be called."""

    def __init__(self, source):
        self.source = source

    def get_stream_source(self):
        return self.source

    def get_components(self):
        raise AssertionError("get_components() decodes every frame as float32: never call it")


def test_core_video_input_is_streamed_not_decoded_whole(comfy_env):
    path = Path(compat.input_directory()) / VIDEO_NAME
    loader = N.FlexSelectLoadVideo()
    by_path = loader.load(N.NO_FILE, 8, 0.0, 0.0, 0.0, 112, 0.0, 2, video=FileVideo(str(path)))[0]
    by_bytes = loader.load(N.NO_FILE, 8, 0.0, 0.0, 0.0, 112, 0.0, 2,
                           video=FileVideo(io.BytesIO(path.read_bytes())))[0]
    by_file = loader.load(VIDEO_NAME, 8, 0.0, 0.0, 0.0, 112, 0.0, 2)[0]
    np.testing.assert_array_equal(by_path.frames, by_file.frames)
    np.testing.assert_array_equal(by_bytes.frames, by_file.frames)


def test_in_memory_video_components(comfy_env):
    images = torch.rand(40, 60, 90, 3)
    before = images.clone()
    video = SimpleNamespace(get_components=lambda: SimpleNamespace(images=images, frame_rate=Fraction(10)))
    clip, preview, _ = N.FlexSelectLoadVideo().load(N.NO_FILE, 8, 2.0, 1.0, 3.0, 45, 0.0, 3, video=video)
    assert clip.frames.shape == (5, 30, 45, 3) and clip.frames.dtype == np.uint8  # 2 s at 2 fps (+1)
    assert clip.timestamps[0] >= 1.0 and clip.timestamps[-1] <= 3.0 and clip.sample_fps == pytest.approx(2.0)
    assert preview.shape == (3, 30, 45, 3)
    assert torch.equal(images, before)


# -- sharing ----------------------------------------------------------------------------------------------------------
def test_inputs_are_never_mutated(comfy_env):
    clip, _, _ = N.FlexSelectLoadVideo().load(VIDEO_NAME, 8, 0.0, 0.0, 0.0, 112, 0.0, 2)
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    clip_before = (clip.frames.copy(), clip.timestamps.copy())
    model_before = copy.deepcopy(model)
    with torch.inference_mode():
        selection = N.FlexSelect().select(clip, model, "What is red?", 8, -1, 0, "frames", 4)[0]
    sel_before = (selection.kept.clone(), selection.scores.clone(), selection.visual.embeds.clone(),
                  selection.prompt.prefix_ids.clone(), selection.prompt.suffix_ids.clone(),
                  selection.kept_per_frame.copy(), selection.question)
    with torch.inference_mode():
        out = N.FlexSelectAnswer().answer(selection, model, 4, 0.7, 0.9, 3)
    assert isinstance(out["result"][0], str)
    np.testing.assert_array_equal(clip.frames, clip_before[0])
    np.testing.assert_array_equal(clip.timestamps, clip_before[1])
    assert model == model_before
    assert torch.equal(selection.kept, sel_before[0])
    assert torch.equal(selection.scores.nan_to_num(-1), sel_before[1].nan_to_num(-1))
    assert torch.equal(selection.visual.embeds, sel_before[2])
    assert torch.equal(selection.prompt.prefix_ids, sel_before[3])
    assert torch.equal(selection.prompt.suffix_ids, sel_before[4])
    np.testing.assert_array_equal(selection.kept_per_frame, sel_before[5])
    assert selection.question == sel_before[6]


def test_free_models_then_reload(comfy_env):
    (model,) = N.FlexSelectLoadModel().load(comfy_env.model_name, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    first = model.get()
    assert model.get() is first  # cached by path and options
    out = N.FlexSelectFreeModels().free(after="an answer")
    assert out["result"] == ("an answer",) and "freed" in out["ui"]["text"][0]
    assert N._model_cache.loaded() == []
    assert model.get() is not first  # a handle cached by ComfyUI still works: it reloads
    assert N.FlexSelectFreeModels.IS_CHANGED() != N.FlexSelectFreeModels.IS_CHANGED()  # NaN: always runs
