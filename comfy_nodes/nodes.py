"""FlexSelect as ComfyUI V3 nodes (`comfy_api.latest`: ComfyUI 0.3.75 and newer).

    Load Video (FlexSelect) --clip--> FlexSelect --selection--> Answer (FlexSelect) --> STRING
    Load Video-LLM (FlexSelect) --model--^------------------------^
    Load Lite Ranker (FlexSelect) --ranker--> (optional input of FlexSelect)

Load Video takes a file from the input folder, a core VIDEO, or an IMAGE batch with its frame rate. Inputs are
checked at validation where they can be (a missing or corrupt video, an empty question), so a bad graph is refused
before anything runs; the rest are plain sentences at run time. Progress and Cancel follow each stage (decode,
encode, select, answer).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
from comfy_api.latest import ComfyExtension, io, ui

from flexselect.errors import FlexSelectError

from . import comfy_compat as compat
from . import video_input
from .caches import models
from .links import (
    ClipType,
    ClipValue,
    ModelHandle,
    ModelType,
    RankerHandle,
    RankerType,
    SelectionResult,
    SelectionType,
)
from .wording import for_nodes

CATEGORY = "FlexSelect"
NO_FILE = "(none: use the video or images input)"
NO_MODEL = "(no model in models/LLM)"
NO_RANKER = "(no ranker in models/flexselect)"
AUTO_MMPROJ = "auto (mmproj*.gguf beside the model)"
_ABSENT = object()  # an optional input that is not connected


class _StageBars:
    """The pipeline's (stage, done, total) progress -> one ComfyUI bar per stage; Cancel is honoured at each call."""

    def __init__(self) -> None:
        self.stage = None
        self.bar = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        compat.throw_if_interrupted()
        if stage != self.stage:
            self.stage, self.bar = stage, compat.progress_bar(total)
        self.bar.update_absolute(done, total)


def _output(kind, name: str, tooltip: str | None = None) -> io.Output:
    """An output whose name shows on the node (V3 shows an output's type unless it has a display name)."""
    return kind.Output(name, display_name=name, tooltip=tooltip)


def _to_image(frames_uint8: np.ndarray):
    """uint8 [N, H, W, 3] -> ComfyUI IMAGE (float32 [N, H, W, 3] in 0..1), a new tensor."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(frames_uint8)).float().div_(255.0)


# -- model folders ---------------------------------------------------------------------------------------------------
def _inside(folder: str, name: str) -> Path | None:
    base = Path(folder).resolve()
    path = (base / name).resolve()
    try:
        path.relative_to(base)
    except ValueError:
        return None
    return path


def _is_mmproj(name: str) -> bool:
    return "mmproj" in Path(name).name.lower()


def _is_supported_checkpoint(folder: Path) -> bool:
    """A transformers checkpoint of a family the library supports (its own list: new families appear by themselves)."""
    from flexselect.backends import detect_family

    try:
        detect_family(folder)
    except FlexSelectError:
        return False
    return True


def model_choices() -> list[str]:
    """Supported checkpoint folders (up to two levels deep) and GGUF files in the LLM model folders."""
    found: set[str] = set()
    for folder in compat.model_folders(compat.LLM_FOLDER):
        root = Path(folder)
        if not root.is_dir():
            continue
        for cfg in list(root.glob("*/config.json")) + list(root.glob("*/*/config.json")):
            if _is_supported_checkpoint(cfg.parent):
                found.add(cfg.parent.relative_to(root).as_posix())
        for gguf in list(root.glob("*.gguf")) + list(root.glob("*/*.gguf")):
            if not _is_mmproj(gguf.name):
                found.add(gguf.relative_to(root).as_posix())
    return sorted(found) or [NO_MODEL]


def mmproj_choices() -> list[str]:
    found: set[str] = set()
    for folder in compat.model_folders(compat.LLM_FOLDER):
        root = Path(folder)
        if root.is_dir():
            for gguf in list(root.glob("*.gguf")) + list(root.glob("*/*.gguf")):
                if _is_mmproj(gguf.name):
                    found.add(gguf.relative_to(root).as_posix())
    return [AUTO_MMPROJ, *sorted(found)]


def ranker_choices() -> list[str]:
    """What `flexselect.lite.load_ranker` accepts: bundle folders (with manifest.json) and .onnx files."""
    from flexselect.lite.bundle import MANIFEST

    found: set[str] = set()
    for folder in compat.model_folders(compat.RANKER_FOLDER):
        root = Path(folder)
        if not root.is_dir():
            continue
        for manifest in list(root.glob(f"*/{MANIFEST}")) + list(root.glob(f"*/*/{MANIFEST}")):
            found.add(manifest.parent.relative_to(root).as_posix())
        for onnx in list(root.glob("*.onnx")) + list(root.glob("*/*.onnx")):
            if not (onnx.parent / MANIFEST).is_file():  # a bundle's own ONNX file is listed as its folder
                found.add(onnx.relative_to(root).as_posix())
    return sorted(found) or [NO_RANKER]


def resolve_model_file(folder_kind: str, name: str) -> Path:
    where = compat.model_folders(folder_kind)
    for folder in where:
        path = _inside(folder, name)
        if path is not None and path.exists():
            return path
    raise FlexSelectError(
        f"{name!r} was not found in the {folder_kind} model folders ({', '.join(where) or 'none registered'})"
    )


def _fingerprint(path: Path) -> str:
    """Changes when a checkpoint folder's or file's contents are replaced (names, sizes, modification times)."""
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    return ";".join(f"{p.name}:{st.st_size}:{st.st_mtime_ns}" for p in files for st in [p.stat()])


# =====================================================================================================================
# Load Video (FlexSelect)
# =====================================================================================================================
class FlexSelectLoadVideo(io.ComfyNode):
    """Samples frames (memory checked first): a clip for FlexSelect and a preview."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelectLoadVideo",
            display_name="Load Video (FlexSelect)",
            category=CATEGORY,
            description=(
                "Samples frames from a video while decoding it, resized on the fly, so hour-long videos fit "
                "in memory. The memory the clip needs is estimated first; a request over the limit is "
                "refused with the numbers. Takes a file, a core VIDEO, or an IMAGE batch with its frame "
                "rate."
            ),
            inputs=[
                io.Combo.Input(
                    "file",
                    options=[*compat.video_files(), NO_FILE],
                    upload=io.UploadType.video,
                    tooltip="A video in ComfyUI's input folder (unused when video or images is connected).",
                ),
                io.Int.Input(
                    "frames",
                    default=16,
                    min=1,
                    max=8192,
                    tooltip="Frames to sample evenly over [start, end]. With fps > 0: the most frames to take.",
                ),
                io.Float.Input(
                    "fps",
                    default=0.0,
                    min=0.0,
                    max=120.0,
                    step=0.1,
                    tooltip="Sample at this rate (at most `frames`). 0 = `frames` evenly.",
                ),
                io.Float.Input("start", default=0.0, min=0.0, max=1e7, step=0.1, tooltip="Start time in seconds."),
                io.Float.Input(
                    "end",
                    default=0.0,
                    min=0.0,
                    max=1e7,
                    step=0.1,
                    tooltip="End time in seconds; 0 = the end of the video.",
                ),
                io.Int.Input(
                    "max_side",
                    default=336,
                    min=28,
                    max=4096,
                    step=4,
                    tooltip="Frames are resized while decoding so the longer side is at most this.",
                ),
                io.Float.Input(
                    "memory_limit_gb",
                    default=0.0,
                    min=0.0,
                    max=4096.0,
                    step=0.5,
                    tooltip="Refuse clips that need more. 0 = half of the RAM available now.",
                ),
                io.Int.Input(
                    "preview_frames",
                    default=8,
                    min=1,
                    max=1024,
                    tooltip="How many of the sampled frames go to the preview IMAGE output.",
                ),
                io.Video.Input(
                    "video",
                    optional=True,
                    tooltip="A core VIDEO (e.g. from core Load Video): its file is read with the same "
                    "streaming sampler; its frames are never all decoded.",
                ),
                io.Image.Input(
                    "images",
                    optional=True,
                    tooltip="Frames already in memory (e.g. VideoHelperSuite's Load Video); set frame_rate.",
                ),
                io.Float.Input(
                    "frame_rate",
                    default=24.0,
                    min=0.01,
                    max=1000.0,
                    step=0.01,
                    optional=True,
                    tooltip="Frame rate of the images input (VideoHelperSuite's video_info, core Get Video "
                    "Components' fps).",
                ),
            ],
            outputs=[
                _output(ClipType, "clip", tooltip="The sampled frames (uint8) with their timestamps, for FlexSelect."),
                _output(io.Image, "preview", tooltip="An evenly spaced subsample of the sampled frames."),
                _output(io.String, "info", tooltip="What was sampled: frames, times, size, memory."),
            ],
        )

    @classmethod
    def validate_inputs(cls, file, video=_ABSENT, images=_ABSENT):
        # A linked input arrives here as None (its value is not known yet); an unconnected one not at all.
        if file == NO_FILE or video is not _ABSENT or images is not _ABSENT:
            return True
        try:
            video_input.probe_input_file(file)  # a missing or corrupt video is refused before the queue runs
        except FlexSelectError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, file, **_kwargs):
        if file == NO_FILE:
            return ""
        try:
            st = os.stat(compat.annotated_filepath(file))
        except OSError:
            return ""
        return f"{st.st_mtime_ns}:{st.st_size}"  # a re-uploaded file of the same name is sampled again

    @classmethod
    def execute(
        cls,
        file,
        frames,
        fps,
        start,
        end,
        max_side,
        memory_limit_gb,
        preview_frames,
        video=None,
        images=None,
        frame_rate=24.0,
    ) -> io.NodeOutput:
        from flexselect.show import even_subsample

        video_input.check_range(start, end)
        s = video_input.Sampling(frames, fps, start, end, max_side, memory_limit_gb, preview_frames)
        bar = None

        def on_frame(i: int, total: int) -> None:
            nonlocal bar
            compat.throw_if_interrupted()  # Cancel takes effect between decoded frames
            bar = bar or compat.progress_bar(total)
            bar.update_absolute(i, total)

        try:
            if images is not None:
                clip = video_input.clip_from_images(images, frame_rate, s)
            elif video is not None:
                clip = video_input.clip_from_video(video, s, on_frame)
            elif file == NO_FILE or not file:
                raise FlexSelectError("no video: pick a file (or upload one), or connect a video or images input")
            else:
                clip = video_input.clip_from_file(compat.annotated_filepath(file), s, on_frame)
        except FlexSelectError as e:
            raise for_nodes(e) from None
        n = len(clip.frames)
        if n == 0:
            raise FlexSelectError("no frames were sampled: check start and end against the video's length")
        preview = _to_image(clip.frames[even_subsample(n, preview_frames)])
        h, w = clip.frames.shape[1:3]
        ts = clip.timestamps
        info = (
            f"{n} frames {w}x{h} from {os.path.basename(str(clip.source)) or 'video'}, "
            f"{float(ts[0]):.2f}-{float(ts[-1]):.2f} s at {clip.sample_fps:.3g} fps, "
            f"{video_input.gib(clip.frames.nbytes)} in memory"
        )
        return io.NodeOutput(ClipValue(clip), preview, info)


# =====================================================================================================================
# Loaders
# =====================================================================================================================
class FlexSelectLoadModel(io.ComfyNode):
    """A Video-LLM from models/LLM: a transformers checkpoint folder, or a GGUF file with its mmproj."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelectLoadModel",
            display_name="Load Video-LLM (FlexSelect)",
            category=CATEGORY,
            description=(
                "Picks a Video-LLM from models/LLM (a transformers checkpoint folder such as "
                "Qwen2.5-VL-7B-Instruct, or a .gguf with its mmproj). Loaded on first use, cached, handed to "
                "ComfyUI's model management, never downloaded."
            ),
            inputs=[
                io.Combo.Input(
                    "checkpoint", options=model_choices(), tooltip="Checkpoint folder or .gguf in models/LLM."
                ),
                io.Combo.Input("mmproj", options=mmproj_choices(), tooltip="GGUF only: the vision projector file."),
                io.Combo.Input("device", options=["auto", "cuda", "cpu", "mps"], default="auto"),
                io.Combo.Input("dtype", options=["auto", "bfloat16", "float16", "float32"], default="auto"),
                io.Int.Input(
                    "context", default=32768, min=2048, max=1048576, step=1024, tooltip="GGUF only: context length."
                ),
            ],
            outputs=[_output(ModelType, "model")],
        )

    @classmethod
    def fingerprint_inputs(cls, checkpoint, **_kwargs):
        try:
            return _fingerprint(resolve_model_file(compat.LLM_FOLDER, checkpoint))
        except (FlexSelectError, OSError):
            return ""

    @classmethod
    def execute(cls, checkpoint, mmproj, device, dtype, context) -> io.NodeOutput:
        if checkpoint == NO_MODEL:
            raise FlexSelectError("no model: put a checkpoint folder or a .gguf (+ mmproj) in ComfyUI's models/LLM")
        path = resolve_model_file(compat.LLM_FOLDER, checkpoint)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FlexSelectError(f"{path} is not a transformers checkpoint folder (no config.json)")
            args = (("model", str(path)), ("device", device), ("dtype", dtype))
        else:
            if mmproj == AUTO_MMPROJ:
                near = sorted(p for p in path.parent.glob("*.gguf") if _is_mmproj(p.name))
                if len(near) != 1:
                    raise FlexSelectError(
                        f"pick the mmproj for {path.name}: found {len(near)} mmproj*.gguf files "
                        f"beside it ({', '.join(p.name for p in near) or 'none'})"
                    )
                mm = near[0]
            else:
                mm = resolve_model_file(compat.LLM_FOLDER, mmproj)
            args = (
                ("gguf", str(path)),
                ("mmproj", str(mm)),
                ("n_ctx", context),
                ("n_gpu_layers", 0 if device == "cpu" else -1),
            )
        return io.NodeOutput(ModelHandle(key=(*args, _fingerprint(path)), label=checkpoint, load_args=args))


class FlexSelectLoadRanker(io.ComfyNode):
    """A FlexSelect-Lite ranker from models/flexselect: scores tokens without the big model's scoring passes."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelectLoadRanker",
            display_name="Load Lite Ranker (FlexSelect)",
            category=CATEGORY,
            description=(
                "A FlexSelect-Lite ranker from models/flexselect (a bundle folder from `flexselect "
                "lite-train`, or a .onnx file); connect it to FlexSelect's optional ranker input."
            ),
            inputs=[
                io.Combo.Input("ranker_name", options=ranker_choices(), tooltip="Lite ranker in models/flexselect.")
            ],
            outputs=[_output(RankerType, "ranker")],
        )

    @classmethod
    def execute(cls, ranker_name) -> io.NodeOutput:
        if ranker_name == NO_RANKER:
            raise FlexSelectError("no ranker: put a FlexSelect-Lite ranker in ComfyUI's models/flexselect")
        path = resolve_model_file(compat.RANKER_FOLDER, ranker_name)
        return io.NodeOutput(RankerHandle(path=str(path), label=ranker_name))


class FlexSelectFreeModels(io.ComfyNode):
    """Drops every cached FlexSelect model and encoded clip, then lets ComfyUI release the memory."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelectFreeModels",
            display_name="Free Models (FlexSelect)",
            category=CATEGORY,
            description=(
                "Frees the models FlexSelect loaded (they reload on next use). Connect anything to run it after."
            ),
            inputs=[
                io.String.Input(
                    "after", optional=True, force_input=True, tooltip="Run after this (e.g. an answer); passed through."
                )
            ],
            outputs=[_output(io.String, "passthrough")],
            is_output_node=True,
            not_idempotent=True,  # it acts on the model cache, not on its inputs: it runs every time
        )

    @classmethod
    def execute(cls, after=None) -> io.NodeOutput:
        n = models.free()
        message = f"freed {n} FlexSelect model(s)"
        return io.NodeOutput(after if after is not None else message, ui=ui.PreviewText(message))


# =====================================================================================================================
# FlexSelect
# =====================================================================================================================
class FlexSelect(io.ComfyNode):
    """Keeps the visual tokens the question needs (reference-layer scores, or a Lite ranker) and shows them."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelect",
            display_name="FlexSelect",
            category=CATEGORY,
            description=(
                "Encodes the clip's frames once (cached), scores every visual token against the question in "
                "frame sets, keeps the top `budget`. The heatmap shows the kept tokens in red."
            ),
            inputs=[
                ClipType.Input("clip"),
                ModelType.Input("model"),
                io.String.Input("question", multiline=True, default="What happens in the video?"),
                io.Int.Input(
                    "budget",
                    default=0,
                    min=0,
                    max=1 << 24,
                    tooltip="Visual tokens to keep (rounded up to whole temporal units). 0 = the model's default.",
                ),
                io.Int.Input(
                    "layer",
                    default=-1,
                    min=-1,
                    max=1024,
                    tooltip="Reference layer that scores tokens (0-based). -1 = the model's default.",
                ),
                io.Int.Input(
                    "set_frames",
                    default=0,
                    min=0,
                    max=8192,
                    tooltip="Temporal units per frame set scored together. 0 = the default (64).",
                ),
                io.Combo.Input("preview", options=["contact sheet", "frames"], default="contact sheet"),
                io.Int.Input("preview_frames", default=8, min=1, max=1024),
                RankerType.Input(
                    "ranker", optional=True, tooltip="Score with a Lite ranker instead of the reference layer."
                ),
            ],
            outputs=[
                _output(SelectionType, "selection", tooltip="Kept tokens, scores, per-unit counts; for Answer."),
                _output(io.Image, "heatmap", tooltip="Kept tokens in red over evenly spaced sampled frames."),
                _output(io.String, "info", tooltip="What was kept and how long it took."),
            ],
        )

    @classmethod
    def validate_inputs(cls, question):
        if not (question or "").strip():
            return "the question is empty: ask something about the video"
        return True

    @classmethod
    def execute(
        cls, clip, model, question, budget, layer, set_frames, preview, preview_frames, ranker=None
    ) -> io.NodeOutput:
        from flexselect.evidence import describe
        from flexselect.pipeline import SelectOptions
        from flexselect.show import even_subsample, render_heatmaps, selection_sheet

        question = question.strip()
        compat.throw_if_interrupted()
        progress = _StageBars()
        pipe = models.with_ranker(model, ranker) if ranker is not None else models.get(model)
        t0 = time.perf_counter()
        visual = models.visual(clip, model)
        cached = visual is not None
        try:
            if visual is None:
                visual, _ = pipe.encode(clip.clip, progress=progress)
                models.put_visual(clip, model, visual)
            t1 = time.perf_counter()
            if budget > visual.num_tokens:
                raise FlexSelectError(
                    f"the budget of {budget} tokens is larger than the clip's {visual.num_tokens} visual tokens "
                    f"({visual.num_frames} temporal units x {visual.tokens_per_frame} tokens): lower budget, or "
                    "sample more frames in Load Video"
                )
            prompt = pipe.backend.prompt(question)
            options = SelectOptions(
                budget=budget or None, layer=None if layer < 0 else layer, set_frames=set_frames or None
            )
            selection = pipe.select(visual, prompt, options, progress=progress)
        except FlexSelectError as e:
            raise for_nodes(e) from None
        frames = clip.clip.frames
        if preview == "frames":
            heat = render_heatmaps(frames, visual, selection, frames=even_subsample(len(frames), preview_frames))
        else:
            heat = selection_sheet(
                frames, visual, selection, max_frames=preview_frames, timestamps=clip.clip.timestamps
            )[None]
        kept = len(selection.kept)
        timing = {"encode_s": 0.0 if cached else t1 - t0, "select_s": selection.seconds, "encode_cached": cached}
        index = selection.index
        reuse = (
            f", video index reused for {index['reused_sets']} set(s), {index['saved_s']:.2f} s saved"
            if index.get("used") and index.get("reused_sets")
            else ""
        )
        info = (
            f"{describe(selection.evidence(visual), kept, visual.num_tokens)}\n"
            f"{100 * kept / visual.num_tokens:.1f}% kept from "
            f"{visual.num_frames} temporal units x {visual.tokens_per_frame} tokens, {len(selection.sets)} frame "
            f"set(s), selector {selection.selector}"
            + (f", layer {selection.layer}" if selection.layer is not None else "")
            + f"; encode {timing['encode_s']:.2f} s{' (cached)' if cached else ''}, "
            f"select {selection.seconds:.2f} s{reuse}"
        )
        result = SelectionResult(
            model_key=model.key,
            question=question,
            visual=visual,
            prompt=prompt,
            selection=selection,
            kept_per_unit=selection.kept_per_frame(visual),
            timing=timing,
        )
        return io.NodeOutput(result, _to_image(heat), info)


# =====================================================================================================================
# Answer (FlexSelect)
# =====================================================================================================================
class FlexSelectAnswer(io.ComfyNode):
    """Runs the Video-LLM once on the kept tokens and the question; the answer shows on the node."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FlexSelectAnswer",
            display_name="Answer (FlexSelect)",
            category=CATEGORY,
            description="Generates the answer from the kept visual tokens only (fast prefill on long videos).",
            inputs=[
                SelectionType.Input("selection"),
                ModelType.Input("model", tooltip="The same Load Video-LLM node as FlexSelect's."),
                io.Int.Input("max_new_tokens", default=128, min=1, max=8192),
                io.Float.Input(
                    "temperature", default=0.0, min=0.0, max=2.0, step=0.05, tooltip="0 = greedy (deterministic)."
                ),
                io.Float.Input("top_p", default=1.0, min=0.01, max=1.0, step=0.01),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=2**32 - 1,
                    control_after_generate=True,
                    tooltip="Sampling seed (used when temperature > 0).",
                ),
            ],
            outputs=[_output(io.String, "answer")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, selection, model, max_new_tokens, temperature, top_p, seed) -> io.NodeOutput:
        from flexselect.backends.base import GenerationConfig

        if selection.model_key != model.key:
            raise FlexSelectError(
                f"this selection was made with another model than {model.label}: connect the same "
                "Load Video-LLM node to FlexSelect and Answer"
            )
        compat.throw_if_interrupted()
        pipe = models.get(model)
        config = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        progress = _StageBars()  # one step per generated token; Cancel stops the answer between tokens
        try:
            generation = pipe.backend.generate(
                selection.visual,
                selection.kept,
                selection.prompt,
                config,
                lambda done, total: progress("answer", done, total),
            )
        except FlexSelectError as e:
            raise for_nodes(e) from None
        return io.NodeOutput(generation.text, ui=ui.PreviewText(generation.text))


NODES: list[type[io.ComfyNode]] = [
    FlexSelectLoadVideo,
    FlexSelectLoadModel,
    FlexSelectLoadRanker,
    FlexSelect,
    FlexSelectAnswer,
    FlexSelectFreeModels,
]


class FlexSelectExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES
