"""The ComfyUI node pack in this process, against ComfyUI 0.3.75's own `comfy_api`, `folder_paths` and model
management (tests/comfy_env.py): the V3 schemas, the shipped workflows generated from one definition, the example
run through the nodes on a generated video and the tiny random model, the three video inputs, cancel, the memory
check, validation, node wording, the ranker dropdown and path, model management, and no input ever changed
(ComfyUI caches outputs and shares them between nodes). tests/test_comfy_server.py runs a real server."""

from __future__ import annotations

import copy
import inspect
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tomllib
import torch

import comfy_workflow as W
from comfy_env import comfy_or_skip, import_comfyui
from helpers import save_tiny_ranker

ROOT = Path(__file__).resolve().parents[1]
CORE_IDS = {
    "LoadVideo",
    "GetVideoComponents",
    "CreateVideo",
    "SaveVideo",
    "LoadImage",
    "PreviewImage",
    "SaveImage",
    "CheckpointLoaderSimple",
    "KSampler",
    "VAEDecode",
    "CLIPTextEncode",
    "UpscaleModelLoader",
    "TextGenerate",
}
PREVIEW_IMAGE_INFO = {
    "input": {"required": {"images": ["IMAGE", {}]}},
    "input_order": {"required": ["images"]},
    "output": [],
    "output_name": [],
}
VIDEO_NAME = "needle.mp4"
FRAMES = 16


class Interrupted(Exception):
    """Stands in for comfy.model_management.InterruptProcessingException."""


@pytest.fixture(scope="module")
def pack(tmp_path_factory):
    """The pack imported inside ComfyUI's modules (imported once per process: node classes are module globals)."""
    comfy_or_skip(lambda: import_comfyui(tmp_path_factory.mktemp("stubs")))
    sys.path.insert(0, str(ROOT))
    import comfy.model_management as mm
    import comfy_nodes
    import folder_paths
    from comfy_nodes import caches, links, video_input, wording
    from comfy_nodes import comfy_compat as compat
    from comfy_nodes import nodes as N

    return SimpleNamespace(
        N=N,
        compat=compat,
        caches=caches,
        links=links,
        video_input=video_input,
        wording=wording,
        mm=mm,
        folder_paths=folder_paths,
        entry=comfy_nodes.comfy_entrypoint,
    )


@pytest.fixture(scope="module")
def env(pack, tmp_path_factory, tiny_model_dir):
    """ComfyUI's folders pointed at a temp tree: a generated video in input/, the tiny model in models/LLM."""
    from flexselect.video import write_test_video

    root = tmp_path_factory.mktemp("comfy")
    fp = pack.folder_paths
    saved_input = fp.get_input_directory()
    (root / "input").mkdir()
    fp.set_input_directory(str(root / "input"))
    fp.add_model_folder_path(pack.compat.LLM_FOLDER, str(Path(tiny_model_dir).parent))
    fp.add_model_folder_path(pack.compat.RANKER_FOLDER, str(root / "rankers"))
    write_test_video(root / "input" / VIDEO_NAME, num_frames=48, fps=8.0, width=168, height=112, needle_frames=(20, 21))
    yield SimpleNamespace(root=root, input=root / "input", model_name=Path(tiny_model_dir).name)
    pack.caches.models.free()
    fp.set_input_directory(saved_input)


def object_info(pack) -> dict:
    return {cls.define_schema().node_id: cls.GET_NODE_INFO_V1() for cls in pack.N.NODES} | {
        "PreviewImage": PREVIEW_IMAGE_INFO
    }


def example(pack, env, **overrides) -> dict:
    """The shipped API workflow, sized for the tiny model and the generated video."""
    wf = json.loads((ROOT / W.API_FILE).read_text())
    wf["1"]["inputs"].update(file=VIDEO_NAME, max_side=112, preview_frames=6)
    wf["2"]["inputs"].update(checkpoint=env.model_name, device="cpu", dtype="float32")
    wf["3"]["inputs"].update(budget=24, set_frames=4)  # 8 units x 12 tokens (3x4 grid): 25% kept, 2 sets
    wf["4"]["inputs"].update(max_new_tokens=6)
    for node_id, inputs in overrides.items():
        wf[node_id]["inputs"].update(inputs)
    return wf


def run_workflow(pack, wf: dict) -> dict:
    """An API workflow through the nodes in dependency order, validated first, as ComfyUI runs it."""
    classes = {cls.define_schema().node_id: cls for cls in pack.N.NODES}
    outputs, ui = {}, {}
    pending = dict(wf)
    while pending:
        ready = [
            k
            for k, node in pending.items()
            if all(not isinstance(v, list) or v[0] in outputs for v in node["inputs"].values())
        ]
        assert ready, f"cycle or dangling link among {list(pending)}"
        for node_id in sorted(ready, key=int):
            node = pending.pop(node_id)
            known = (
                {i.id for i in classes[node["class_type"]].define_schema().inputs}
                if node["class_type"] in classes
                else set(node["inputs"])
            )  # ComfyUI passes a node only its own inputs ("video-preview" is not one)
            args = {
                k: (outputs[v[0]][v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items() if k in known
            }
            if node["class_type"] == "PreviewImage":  # core node: only check what it would be given
                images = args["images"]
                assert images.dtype == torch.float32 and images.ndim == 4 and images.shape[-1] == 3
                assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
                outputs[node_id] = ()
                continue
            cls = classes[node["class_type"]]
            validate = cls.__dict__.get("validate_inputs")
            if validate is not None:
                names = inspect.signature(cls.validate_inputs).parameters
                verdict = cls.validate_inputs(
                    **{k: (None if isinstance(v, list) else v) for k, v in node["inputs"].items() if k in names}
                )
                assert verdict is True, verdict
            with torch.inference_mode():  # ComfyUI runs nodes in inference mode
                out = cls.execute(**args)
            if out.ui is not None:
                ui[node_id] = out.ui.as_dict()
            assert len(out.args) == len(cls.define_schema().outputs)
            outputs[node_id] = out.args
    return {"outputs": outputs, "ui": ui}


def load_clip(pack, file=VIDEO_NAME, frames=8, fps=0.0, start=0.0, end=0.0, max_side=112, limit=0.0, preview=2, **kw):
    return pack.N.FlexSelectLoadVideo.execute(file, frames, fps, start, end, max_side, limit, preview, **kw)


def load_model(pack, env, dtype="float32"):
    return pack.N.FlexSelectLoadModel.execute(env.model_name, pack.N.AUTO_MMPROJ, "cpu", dtype, 32768)[0]


def select(
    pack,
    clip,
    model,
    question="What is red?",
    budget=8,
    layer=-1,
    set_frames=0,
    preview="contact sheet",
    preview_frames=4,
    ranker=None,
):
    return pack.N.FlexSelect.execute(
        clip, model, question, budget, layer, set_frames, preview, preview_frames, ranker=ranker
    )


# -- contract ---------------------------------------------------------------------------------------------------------
def test_v3_schemas(pack):
    import asyncio

    from comfy_api.latest import ComfyExtension, io

    extension = asyncio.run(pack.entry())
    assert isinstance(extension, ComfyExtension)
    nodes = asyncio.run(extension.get_node_list())
    assert nodes == pack.N.NODES and all(issubclass(cls, io.ComfyNode) for cls in nodes)
    schemas = {cls: cls.define_schema() for cls in nodes}
    ids = [s.node_id for s in schemas.values()]
    assert len(set(ids)) == len(ids) and not set(ids) & CORE_IDS
    assert len({s.display_name for s in schemas.values()}) == len(ids)
    for cls, schema in schemas.items():
        schema.validate()
        assert schema.category == "FlexSelect" and schema.description
        params = inspect.signature(cls.execute).parameters
        for inp in schema.inputs:
            assert inp.id in params, f"{schema.node_id}.execute does not take {inp.id}"
            if inp.optional:
                assert params[inp.id].default is not inspect.Parameter.empty, (schema.node_id, inp.id)
        info = cls.GET_NODE_INFO_V1()  # what /object_info serves
        assert info["name"] == schema.node_id
    info = object_info(pack)
    load_video = info["FlexSelectLoadVideo"]["input"]
    assert load_video["required"]["file"][1]["video_upload"] is True
    assert load_video["optional"]["video"][0] == "VIDEO" and load_video["optional"]["images"][0] == "IMAGE"
    assert info["FlexSelect"]["input"]["optional"]["ranker"][0] == "FLEXSELECT_RANKER"
    assert info["FlexSelectAnswer"]["output_node"] is True
    assert schemas[pack.N.FlexSelectFreeModels].not_idempotent is True  # acts on the cache: runs every time
    assert not any(s.not_idempotent for c, s in schemas.items() if c is not pack.N.FlexSelectFreeModels)


def test_short_reprs_for_history_errors(pack, env):
    """ComfyUI puts str() of every input of a failed node into the history: a few words, not the frame array."""
    clip, _, _ = load_clip(pack)
    model = load_model(pack, env)
    selection = select(pack, clip, model)[0]
    for value in (clip, model, selection):
        assert len(str(value)) < 160 and str(value).startswith("<FlexSelect"), str(value)


# -- the shipped workflows --------------------------------------------------------------------------------------------
def test_shipped_workflows_are_generated_from_one_definition(pack):
    info = object_info(pack)
    generated = {W.UI_FILE: W.ui_workflow(info), W.API_FILE: W.api_workflow(info)}
    if os.environ.get("FLEXSELECT_WRITE_WORKFLOWS") == "1":
        for rel, wf in generated.items():
            (ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
            (ROOT / rel).write_text(json.dumps(wf, indent=2) + "\n")
    for rel, wf in generated.items():
        assert json.loads((ROOT / rel).read_text()) == wf, f"{rel} is stale: regenerate it (see comfy_workflow.py)"
    ui = json.loads((ROOT / W.UI_FILE).read_text())
    assert W.prompt_from_ui(ui, info) == generated[W.API_FILE]  # what the frontend submits for the UI file
    # ComfyUI lists every JSON in example_workflows/ as a template: all of them must be UI workflows.
    for path in (ROOT / "example_workflows").glob("*.json"):
        wf = json.loads(path.read_text())
        assert "nodes" in wf and "links" in wf and isinstance(wf.get("version"), float), path.name


def test_the_old_widget_order_is_caught(pack):
    """The bug the frontend showed: the upload button's value second shifts every value after it."""
    info = object_info(pack)
    ui = W.ui_workflow(info)
    values = ui["nodes"][0]["widgets_values"]
    ui["nodes"][0]["widgets_values"] = [values[0], values[-1], *values[1:-1]]
    with pytest.raises(AssertionError, match="left over"):
        W.prompt_from_ui(ui, info)


# -- the example workflow ---------------------------------------------------------------------------------------------
def test_example_workflow_runs(pack, env):
    assert env.model_name in pack.N.model_choices()
    assert VIDEO_NAME in pack.N.FlexSelectLoadVideo.GET_NODE_INFO_V1()["input"]["required"]["file"][1]["options"]
    run = run_workflow(pack, example(pack, env))
    clip, preview, info = run["outputs"]["1"]
    # 168x112 scaled to a 112 longest side: 112x74.67 -> even sides (flexselect.video.output_size)
    assert clip.clip.frames.shape == (FRAMES, 74, 112, 3) and clip.clip.frames.dtype == np.uint8
    assert preview.shape == (6, 74, 112, 3) and preview.dtype == torch.float32
    assert f"{FRAMES} frames" in info
    selection, heatmap, sel_info = run["outputs"]["3"]
    assert heatmap.ndim == 4 and heatmap.shape[0] == 1 and heatmap.shape[-1] == 3  # one contact sheet
    assert len(selection.kept) == 24 and selection.kept_per_unit.sum() == 24
    assert len(selection.selection.sets) == 2 and "kept 24 of 96" in sel_info and "8 temporal units" in sel_info
    (answer,) = run["outputs"]["4"]
    assert isinstance(answer, str)
    assert run["ui"]["4"] == {"text": (answer,)}  # ui.PreviewText

    frames_mode = run_workflow(pack, example(pack, env, **{"3": {"preview": "frames"}}))
    heat = frames_mode["outputs"]["3"][1]
    assert heat.shape == (8, 74, 112, 3)
    assert bool(((heat[..., 0] - heat[..., 1]) > 0.3).any())  # the kept tokens are red


def test_a_follow_up_reuses_the_video_index_says_where_and_free_models_drops_it(pack, env):
    clip = load_clip(pack)[0]
    model = load_model(pack, env)
    select(pack, clip, model, "What is red?")
    follow_up = select(pack, clip, model, "When does it appear?")
    assert follow_up[2].startswith("kept 12 of 48 tokens")  # the evidence sentence of flexselect.evidence
    assert "video index reused for 1 set(s)" in follow_up[2]
    pipe = pack.N.models.get(model)
    assert pipe.indexes.nbytes > 0
    pack.N.models.free()
    assert pipe.indexes.nbytes == 0


@pytest.fixture(scope="module")
def qwen3_models(pack, env, tmp_path_factory):
    """Tiny Qwen3-VL and Qwen3.5 checkpoint folders and their GGUF + mmproj, in a second LLM model folder (one GGUF
    pair per subfolder, so the loader's automatic mmproj finds exactly one)."""
    from flexselect.tiny import build_tiny_qwen3_5, build_tiny_qwen3_vl
    from flexselect_export.gguf import export_gguf

    root = tmp_path_factory.mktemp("llm-qwen3")
    for family, build in (("qwen3_vl", build_tiny_qwen3_vl), ("qwen3_5", build_tiny_qwen3_5)):
        export_gguf(build(root / f"tiny-{family}"), root / f"gguf-{family}", "f16")
    pack.folder_paths.add_model_folder_path(pack.compat.LLM_FOLDER, str(root))
    return root


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
@pytest.mark.parametrize("source", ["folder", "gguf"])
def test_qwen3_vl_and_qwen3_5_load_select_and_answer(pack, env, qwen3_models, family, source):
    """The Load Video-LLM node lists and loads a Qwen3-VL / Qwen3.5 checkpoint folder and its GGUF; FlexSelect and
    Answer run on it."""
    name = f"tiny-{family}" if source == "folder" else f"gguf-{family}/model.gguf"
    assert name in pack.N.model_choices()
    model = pack.N.FlexSelectLoadModel.execute(name, pack.N.AUTO_MMPROJ, "cpu", "float32", 32768)[0]
    assert pack.N.models.get(model).backend.family == family
    clip = load_clip(pack)[0]
    selection, heatmap, info = select(pack, clip, model, "What is red?", budget=8)
    assert len(selection.kept) == 8 and selection.kept_per_unit.sum() == 8
    assert info.startswith("kept 8 of ") and heatmap.ndim == 4
    (answer,) = pack.N.FlexSelectAnswer.execute(selection, model, 4, 0.0, 1.0, 0).args
    assert isinstance(answer, str)
    pack.N.models.free()


def test_second_question_reuses_the_encoded_clip(pack, env):
    clip = load_clip(pack)[0]
    model = load_model(pack, env)
    first = select(pack, clip, model, "What is red?")[0]
    second = select(pack, clip, model, "When does it appear?")[0]
    assert not first.timing["encode_cached"] and second.timing["encode_cached"]
    assert second.visual is first.visual


# -- the three video inputs -------------------------------------------------------------------------------------------
def test_core_video_input_is_streamed_not_decoded_whole(pack, env, monkeypatch):
    import io as bytes_io

    from comfy_api.latest import InputImpl

    path = env.input / VIDEO_NAME
    by_file = load_clip(pack)[0]
    for source in (str(path), bytes_io.BytesIO(path.read_bytes())):
        video = InputImpl.VideoFromFile(source)
        monkeypatch.setattr(video, "get_components", lambda: pytest.fail("get_components() decodes every frame"))
        clip = load_clip(pack, pack.N.NO_FILE, video=video)[0]
        np.testing.assert_array_equal(clip.clip.frames, by_file.clip.frames)


def test_in_memory_video_and_image_batch(pack, env):
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    images = torch.rand(40, 60, 90, 3)
    before = images.clone()
    video = InputImpl.VideoFromComponents(Types.VideoComponents(images=images, audio=None, frame_rate=Fraction(10)))
    from_video, preview, _ = load_clip(pack, pack.N.NO_FILE, 8, 2.0, 1.0, 3.0, 45, 0.0, 3, video=video)
    from_images, _, info = load_clip(pack, pack.N.NO_FILE, 8, 2.0, 1.0, 3.0, 45, 0.0, 3, images=images, frame_rate=10.0)
    for clip in (from_video.clip, from_images.clip):
        assert clip.frames.shape == (5, 30, 44, 3) and clip.frames.dtype == np.uint8  # 2 s at 2 fps (+1), even sides
        assert clip.timestamps[0] >= 1.0 and clip.timestamps[-1] <= 3.0 and clip.sample_fps == pytest.approx(2.0)
    np.testing.assert_array_equal(from_video.clip.frames, from_images.clip.frames)
    assert preview.shape == (3, 30, 44, 3) and "IMAGE input" in info
    assert torch.equal(images, before)
    # The images input wins over the file widget: a graph from VideoHelperSuite runs whatever the widget says.
    model = load_model(pack, env)
    assert len(select(pack, from_images, model, budget=6)[0].kept) == 6


# -- cancel -----------------------------------------------------------------------------------------------------------
def interrupt_at(pack, monkeypatch, n: int) -> list:
    calls = []

    def check():
        calls.append(1)
        if len(calls) == n:
            raise Interrupted(f"interrupted at check {n}")

    monkeypatch.setattr(pack.compat, "throw_if_interrupted", check)
    return calls


def test_cancel_stops_decoding_at_the_next_frame(pack, env, monkeypatch):
    from flexselect import video as fv

    decoded = []
    real_load_clip = fv.load_clip

    def counting_load_clip(*args, on_frame=None, **kwargs):
        def spy(i, n):
            decoded.append(i)
            on_frame(i, n)

        return real_load_clip(*args, on_frame=spy, **kwargs)

    monkeypatch.setattr(fv, "load_clip", counting_load_clip)
    calls = interrupt_at(pack, monkeypatch, 3)
    with pytest.raises(Interrupted):
        load_clip(pack, frames=FRAMES)
    assert len(calls) == 3 and len(decoded) == 3  # nothing decoded after the interrupting frame's callback


def test_cancel_stops_selection_between_frame_sets(pack, env, monkeypatch):
    clip = load_clip(pack, frames=FRAMES)[0]
    model = load_model(pack, env)
    pipe = pack.caches.models.get(model)
    scored = []
    for name in ("score", "score_indexed"):  # scored plainly or through the video index the first pass builds
        real = getattr(pipe.backend, name)
        monkeypatch.setattr(pipe.backend, name, lambda *a, real=real, **k: scored.append(1) or real(*a, **k))
    pack.caches.models.put_visual(clip, model, pipe.encode(clip.clip)[0])  # encoded: only select-stage checks
    calls = interrupt_at(pack, monkeypatch, 3)  # 1: node start, 2: after set 1, 3: after set 2 of 4
    with pytest.raises(Interrupted):
        select(pack, clip, model, set_frames=2)
    assert len(calls) == 3 and len(scored) == 2  # sets 3 and 4 never scored


def test_cancel_stops_the_answer_between_tokens(pack, env, monkeypatch):
    from flexselect.backends import base

    clip = load_clip(pack, frames=FRAMES)[0]
    model = load_model(pack, env)
    selection = select(pack, clip, model, set_frames=2)[0]
    monkeypatch.setattr(pack.caches.models.get(model).backend, "eos_token_ids", set())  # never stops by itself
    sampled = []
    real_sample = base.sample  # the answer loop every backend shares (base.answer_tokens)
    monkeypatch.setattr(base, "sample", lambda *a: sampled.append(1) or real_sample(*a))
    calls = interrupt_at(pack, monkeypatch, 3)  # 1: node start, 2: after token 1, 3: after token 2
    with pytest.raises(Interrupted):
        pack.N.FlexSelectAnswer.execute(selection, model, 64, 0.0, 1.0, 0)
    assert len(calls) == 3 and len(sampled) == 2  # 62 of the 64 tokens never generated


# -- memory, validation and wording -----------------------------------------------------------------------------------
def test_huge_request_is_refused_before_decoding(pack, env, monkeypatch):
    from flexselect import video as fv
    from flexselect.errors import FlexSelectError

    def must_not_decode(*a, **k):
        raise AssertionError("load_clip was called although the request is over the memory limit")

    monkeypatch.setattr(fv, "load_clip", must_not_decode)
    with pytest.raises(FlexSelectError, match=r"refusing to load 48 frames .* MiB.*memory_limit_gb = 0\.0001"):
        load_clip(pack, frames=8192, max_side=4096, limit=0.0001, preview=16)
    # An hour of 4K at 60 fps, 8192 frames at full size asked for, default limit (half of the RAM available now).
    info = fv.VideoInfo(path="4k.mp4", num_frames=216000, fps=60.0, duration=3600.0, width=3840, height=2160)
    monkeypatch.setattr(fv, "probe", lambda path: info)
    monkeypatch.setattr(pack.compat, "available_ram_bytes", lambda: 16 * 2**30)
    with pytest.raises(
        FlexSelectError,
        match=r"refusing to load 8192 frames of 3840x2160 .* needs about "
        r"\d+\.\d\d GiB, over the limit of 8\.00 GiB \(50% of the 16\.00 GiB "
        r"of RAM available now",
    ):
        load_clip(pack, frames=8192, max_side=4096, preview=16)
    # The same video sampled sensibly (2 fps over a minute, 448 px) is accepted up to the decoder.
    with pytest.raises(AssertionError, match="load_clip was called"):
        load_clip(pack, frames=8192, fps=2.0, end=60.0, max_side=448, preview=16)


def test_validation_refuses_missing_and_corrupt_videos_and_empty_questions(pack, env):
    N = pack.N
    (env.input / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    assert N.FlexSelectLoadVideo.validate_inputs(VIDEO_NAME) is True
    assert "video not found in ComfyUI's input folder: missing.mp4" in N.FlexSelectLoadVideo.validate_inputs(
        "missing.mp4"
    )
    corrupt = N.FlexSelectLoadVideo.validate_inputs("corrupt.mp4")
    assert corrupt.startswith("corrupt.mp4: ") and "the file is damaged or incomplete" in corrupt, corrupt
    # A connected video or images input (None at validation time) replaces the file: its widget is not probed.
    assert N.FlexSelectLoadVideo.validate_inputs("missing.mp4", video=None) is True
    assert N.FlexSelectLoadVideo.validate_inputs("missing.mp4", images=None) is True
    assert N.FlexSelectLoadVideo.validate_inputs(N.NO_FILE) is True
    assert N.FlexSelect.validate_inputs("  \n ") == "the question is empty: ask something about the video"
    assert N.FlexSelect.validate_inputs("What?") is True


def test_run_errors_are_worded_for_the_node(pack, env):
    from flexselect.errors import FlexSelectError

    N = pack.N
    with pytest.raises(FlexSelectError, match="no video"):
        load_clip(pack, N.NO_FILE)
    with pytest.raises(FlexSelectError, match="must be after start"):
        load_clip(pack, start=3.0, end=2.0)
    with pytest.raises(FlexSelectError, match="no model"):
        N.FlexSelectLoadModel.execute(N.NO_MODEL, N.AUTO_MMPROJ, "cpu", "float32", 32768)
    with pytest.raises(FlexSelectError, match="not found in the LLM model folders"):
        N.FlexSelectLoadModel.execute("../../etc", N.AUTO_MMPROJ, "cpu", "float32", 32768)
    with pytest.raises(FlexSelectError, match="no ranker"):
        N.FlexSelectLoadRanker.execute(N.NO_RANKER)
    clip = load_clip(pack, frames=4)[0]
    model = load_model(pack, env)
    with pytest.raises(FlexSelectError) as too_big:
        select(pack, clip, model, "What?", budget=10_000)
    assert str(too_big.value) == (
        "the budget of 10000 tokens is larger than the clip's 24 visual tokens (2 temporal "
        "units x 12 tokens): lower budget, or sample more frames in Load Video"
    )
    with pytest.raises(FlexSelectError, match="reference layer 99 is out of range"):
        select(pack, clip, model, "What?", layer=99)
    selection = select(pack, clip, model, "What?")[0]
    other = load_model(pack, env, dtype="float64")
    with pytest.raises(FlexSelectError, match="another model"):
        N.FlexSelectAnswer.execute(selection, other, 4, 0.0, 1.0, 0)


WORDING_CASES = [  # (the library's CLI wording, what the node says instead)
    (
        (
            "the budget of 900 tokens is larger than the video's 96 visual tokens (8 frames x 12); use a smaller "
            "--budget or sample more frames"
        ),
        "(8 temporal units x 12 tokens); use a smaller `budget` or sample more frames",
    ),
    (
        (
            "the answer (prompt + --max-new-tokens) needs 9000 tokens but this model takes at most 8192: use a smaller "
            "--budget, fewer --frames or a smaller --set-frames"
        ),
        (
            "(prompt + `max_new_tokens`) needs 9000 tokens but this model takes at most 8192: use a smaller `budget`, "
            "fewer `frames` or a smaller `set_frames`"
        ),
    ),
    (
        "--device cuda was asked for but torch sees no CUDA GPU; use --device cpu",
        "device 'cuda' was picked but torch sees no CUDA GPU; pick device 'cpu'",
    ),
    (
        "selector 'lite' needs a ranker: pass --ranker PATH",
        "needs a ranker: connect a Load Lite Ranker (FlexSelect) node",
    ),
    (
        (
            "/m is not a transformers model folder (no config.json); pass the folder of a local checkpoint, e.g. "
            "--model /models/Qwen2.5-VL-7B-Instruct"
        ),
        "(no config.json); pick a checkpoint folder in models/LLM",
    ),
    ("x.gguf needs its vision projector: pass --mmproj mmproj.gguf\n", "needs its vision projector: pick its mmproj"),
]


@pytest.mark.parametrize("cli, node", WORDING_CASES)
def test_library_messages_lose_their_cli_flags(pack, cli, node):
    worded = pack.wording.node_wording(cli)
    assert node in worded and "--" not in worded and worded == worded.strip() and "\n" not in worded, worded


# -- rankers ----------------------------------------------------------------------------------------------------------
def test_ranker_dropdown_and_path(pack, env, tiny_backend):
    folder = env.root / "rankers"
    save_tiny_ranker(tiny_backend, folder / "tiny-ranker")
    (folder / "exported.onnx").write_bytes(b"")  # a bare ONNX ranker is listed (load_ranker takes .onnx files)
    for decoy in ("weights.pt", "model.pth", "pytorch_model.bin", "other.safetensors", "no-manifest/x.safetensors"):
        (folder / decoy).parent.mkdir(parents=True, exist_ok=True)
        (folder / decoy).write_bytes(b"")
    assert pack.N.ranker_choices() == ["exported.onnx", "tiny-ranker"]

    (ranker,) = pack.N.FlexSelectLoadRanker.execute("tiny-ranker")
    wf = example(pack, env)
    clip = run_workflow(pack, {"1": wf["1"]})["outputs"]["1"][0]
    model = load_model(pack, env)
    selection, _, info = select(pack, clip, model, budget=24, set_frames=4, ranker=ranker)
    assert selection.selection.selector == "lite" and "selector lite" in info and len(selection.kept) == 24
    (answer,) = pack.N.FlexSelectAnswer.execute(selection, model, 4, 0.0, 1.0, 0).args
    assert isinstance(answer, str)


# -- model management -------------------------------------------------------------------------------------------------
def test_models_are_handed_to_comfyui_model_management(pack, env):
    models = pack.caches.models
    models.free()
    model = load_model(pack, env)
    pipe = models.get(model)
    patcher = models.patcher(model)
    assert patcher is not None and patcher in pack.compat.loaded_models()
    assert patcher.model_size() == sum(p.numel() * p.element_size() for p in pipe.backend.model.parameters())
    pack.mm.unload_all_models()  # what ComfyUI does under memory pressure or on "unload models"
    assert patcher not in pack.compat.loaded_models()
    assert models.get(model) is pipe and patcher in pack.compat.loaded_models()  # loaded back before use
    out = pack.N.FlexSelectFreeModels.execute(after="an answer")
    assert out.args == ("an answer",) and out.ui.as_dict() == {"text": ("freed 1 FlexSelect model(s)",)}
    assert models.loaded() == [] and patcher not in pack.compat.loaded_models()
    assert models.get(model) is not pipe  # a handle ComfyUI cached still works: the model loads again


def test_inputs_are_never_mutated(pack, env):
    clip, _, _ = load_clip(pack)
    model = load_model(pack, env)
    clip_before = (clip.clip.frames.copy(), clip.clip.timestamps.copy())
    model_before = copy.deepcopy(model)
    with torch.inference_mode():
        selection = select(pack, clip, model, preview="frames")[0]
    sel_before = (
        selection.kept.clone(),
        selection.selection.scores.clone(),
        selection.visual.embeds.clone(),
        selection.prompt.prefix_ids.clone(),
        selection.prompt.suffix_ids.clone(),
        selection.kept_per_unit.copy(),
        selection.question,
    )
    with torch.inference_mode():
        out = pack.N.FlexSelectAnswer.execute(selection, model, 4, 0.7, 0.9, 3)
    assert isinstance(out.args[0], str)
    np.testing.assert_array_equal(clip.clip.frames, clip_before[0])
    np.testing.assert_array_equal(clip.clip.timestamps, clip_before[1])
    assert model == model_before
    assert torch.equal(selection.kept, sel_before[0])
    assert torch.equal(selection.selection.scores.nan_to_num(-1), sel_before[1].nan_to_num(-1))
    assert torch.equal(selection.visual.embeds, sel_before[2])
    assert torch.equal(selection.prompt.prefix_ids, sel_before[3])
    assert torch.equal(selection.prompt.suffix_ids, sel_before[4])
    np.testing.assert_array_equal(selection.kept_per_unit, sel_before[5])
    assert selection.question == sel_before[6]


# -- packaging --------------------------------------------------------------------------------------------------------
def _requirement_names(lines) -> dict[str, str]:
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            name = line.split(";")[0]
            for op in ("==", ">=", "<=", "~=", "<", ">", "!="):
                name = name.split(op)[0]
            out[name.strip().lower()] = line.replace(" ", "")
    return out


def test_pack_requirements_are_the_library_dependencies_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    library = _requirement_names(project["project"]["dependencies"])
    pack_reqs = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert "torch" in library and "torch" not in pack_reqs  # ComfyUI's own torch build is never replaced
    assert pack_reqs == {k: v for k, v in library.items() if k != "torch"}
    assert "==" not in pack_reqs["transformers"] and ">=5.23" in pack_reqs["transformers"]


def test_transformers_is_checked_at_model_load(pack, monkeypatch):
    import transformers
    from comfy_nodes.requirements_check import check_transformers

    from flexselect.errors import FlexSelectError

    check_transformers()  # the installed one
    for version in ("4.57.1", "6.0.0"):
        monkeypatch.setattr(transformers, "__version__", version)
        with pytest.raises(FlexSelectError, match=rf"needs transformers 5\.23 to 5\.x; this ComfyUI has {version}"):
            check_transformers()


def test_registry_metadata():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["Icon"].startswith("https://")
    assert project["project"]["urls"]["Repository"].startswith("https://github.com/")
    assert "comfyui" not in project["project"]["name"].lower()
    assert project["project"]["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert (ROOT / comfy["Icon"].split("/main/", 1)[1]).is_file()  # the icon the URL names is in the repository
