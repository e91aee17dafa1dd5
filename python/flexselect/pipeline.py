"""The FlexSelect pipeline: video -> frames -> visual tokens -> frame sets -> scores -> kept tokens -> answer.

`FlexSelect` loads a model once and answers many questions; a video's visual tokens are cached, so a second
question about the same video skips decoding and the vision tower. Who produces the scores is the only thing that
differs between the reference-layer selector, a Lite ranker and no selection at all.
"""

from __future__ import annotations

import logging
import os
import resource
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from .backends.base import (
    Backend,
    Generation,
    GenerationConfig,
    Prompt,
    VisualTokens,
    attention_layers,
    resolve_reference_layer,
)
from .defaults import AGGREGATE, SET_FRAMES, family_defaults
from .errors import FlexSelectError, check_positive
from .evidence import EvidenceRange, evidence_ranges
from .index import (
    IndexKey,
    IndexStore,
    VideoIndex,
    difference,
    file_identity,
    gib,
    read_index,
    visual_from_manifest,
    visual_manifest,
    write_index,
)
from .selection import Aggregate, check_finite, frame_sets, round_budget, split_budget, top_k
from .video import Clip, check_video_file, load_clip

log = logging.getLogger("flexselect")

Selector = Literal["reference", "lite", "none"]
StageProgress = Callable[[str, int, int], None]  # (stage, done, total); may raise to cancel


class Ranker(Protocol):
    """A FlexSelect-Lite ranker (torch or ONNX): scores a frame set's tokens without the big model."""

    def score(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> torch.Tensor: ...

    def check_compatible(self, backend: Backend) -> None: ...


@dataclass(frozen=True)
class Sampling:
    """How frames are taken from the video (None: the model family's default)."""

    frames: int | None = None
    fps: float | None = None
    start: float | None = None
    end: float | None = None
    max_frames: int | None = None
    max_side: int | None = None

    def __post_init__(self) -> None:
        # Checked at construction, so a bad value fails before the model or the video is touched, on every surface.
        if self.frames is not None and self.fps is not None:
            raise FlexSelectError("give either frames or fps, not both")
        for name in ("frames", "max_frames", "max_side"):
            check_positive(name, getattr(self, name), whole=True)
        check_positive("fps", self.fps)
        check_positive("start", self.start, allow_zero=True)
        check_positive("end", self.end)
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise FlexSelectError(f"end ({self.end}s) must be after start ({self.start}s)")


@dataclass(frozen=True)
class SelectOptions:
    """How tokens are selected (None: the model family's default); mirrors the C++ runtime's `SelectOptions`."""

    budget: int | None = None  # kept visual tokens for the whole video
    layer: int | None = None  # reference layer, 0-based
    set_frames: int | None = None  # frame units per frame set
    aggregate: Aggregate | None = None  # over heads and question tokens
    selector: Selector | None = None  # reference (default), lite (with a ranker) or none

    def __post_init__(self) -> None:
        # Checked here, once, so every surface (CLI, API, eval, ComfyUI) refuses the same values the same way.
        for name in ("budget", "set_frames"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise FlexSelectError(f"{name} must be a positive whole number, got {value!r}")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0
        ):
            raise FlexSelectError(f"the reference layer must be a whole number >= 0, got {self.layer!r}")
        if self.aggregate not in (None, "max", "mean"):
            raise FlexSelectError(f"aggregate must be 'max' or 'mean', got {self.aggregate!r}")
        if self.selector not in (None, "reference", "lite", "none"):
            raise FlexSelectError(f"selector must be 'reference', 'lite' or 'none', got {self.selector!r}")


@dataclass
class Selection:
    kept: torch.Tensor  # ascending global token indices
    scores: torch.Tensor  # [num_tokens] float32; NaN where a set was kept whole without scoring
    sets: list[list[int]]
    budget: int  # tokens asked to keep (after rounding to whole frames, capped at the video's tokens)
    layer: int | None
    selector: Selector
    seconds: float
    index: dict = field(default_factory=dict)  # whether a video index was used, reused, and what it saved

    def kept_per_frame(self, visual: VisualTokens) -> np.ndarray:
        return np.bincount(self.kept.numpy() // visual.tokens_per_frame, minlength=visual.num_frames)

    def evidence(self, visual: VisualTokens) -> list[EvidenceRange]:
        """The time ranges where the kept tokens concentrate, ranked (see `flexselect.evidence`)."""
        return evidence_ranges(self.kept_per_frame(visual), visual.timestamps)


@dataclass
class Answer:
    text: str
    visual: VisualTokens
    selection: Selection
    generation: Generation
    stats: dict = field(default_factory=dict)
    evidence: list[EvidenceRange] = field(default_factory=list)  # where in the video the kept tokens come from
    question: str = ""


def conversation(history: list[tuple[str, str]], question: str) -> str:
    """Earlier (question, answer) turns, then the question, as ChatML (every supported family's chat format): the
    text that takes the place of {question} in the prompt after the video."""
    turns = "".join(f"{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n<|im_start|>user\n" for q, a in history)
    return turns + question


class FlexSelect:
    """Load once, ask many questions. See `answer()` for the one-call form."""

    def __init__(
        self,
        backend: Backend,
        ranker: Ranker | None = None,
        cache_videos: int = 4,
        index_memory: int | None = None,
        auto_index: bool = True,
    ) -> None:
        """`index_memory`: bytes all video indexes may take (None: half the memory available now); `auto_index`:
        index a video on its first reference-layer question, so follow-ups cost about the answer pass alone."""
        self.backend = backend
        self.ranker = ranker
        if ranker is not None:
            ranker.check_compatible(backend)
        self.defaults = family_defaults(backend.family)
        self._cache: OrderedDict[tuple, VisualTokens] = OrderedDict()
        self._cache_size = cache_videos
        self._shape = None  # the model's shape for memory checks (flexselect.plan), read on first use
        self.indexes = IndexStore(index_memory)
        self.auto_index = auto_index

    @classmethod
    def load(
        cls,
        model: str | os.PathLike | None = None,
        *,
        gguf: str | os.PathLike | None = None,
        mmproj: str | os.PathLike | None = None,
        ranker: str | os.PathLike | None = None,
        device: str = "auto",
        dtype: str = "auto",
        positions: str = "original",
        n_ctx: int = 32768,
        n_gpu_layers: int = -1,
        index_memory: int | None = None,
        auto_index: bool = True,
    ) -> FlexSelect:
        """A transformers checkpoint folder (`model`) or a GGUF + its mmproj (`gguf`, `mmproj`)."""
        if (model is None) == (gguf is None):
            raise FlexSelectError("give either a transformers model folder (--model) or a GGUF file (--gguf)")
        if positions not in ("original", "compact"):
            raise FlexSelectError(f"positions must be 'original' or 'compact', got {positions!r}")
        check_positive("n_ctx", n_ctx, whole=True)
        if isinstance(n_gpu_layers, bool) or not isinstance(n_gpu_layers, int) or n_gpu_layers < -1:
            raise FlexSelectError(f"n_gpu_layers must be a whole number >= -1 (-1: all), got {n_gpu_layers!r}")
        if gguf is not None:
            from .backends.llama_cpp import LlamaCppBackend

            if mmproj is None:
                raise FlexSelectError(f"{gguf} needs its vision projector: pass --mmproj mmproj.gguf")
            backend: Backend = LlamaCppBackend(gguf, mmproj, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
        else:
            from .backends import load_backend

            backend = load_backend(model, device=device, dtype=dtype, positions=positions)
        pipe = cls(backend, index_memory=index_memory, auto_index=auto_index)
        return pipe.with_ranker(ranker) if ranker is not None else pipe

    def with_ranker(self, ranker: str | os.PathLike) -> FlexSelect:
        """The same loaded model (and video cache) scored by a Lite ranker: no second copy of the big model."""
        from .lite import load_ranker

        pipe = FlexSelect(self.backend, load_ranker(ranker, self.backend), self._cache_size, auto_index=self.auto_index)
        pipe._cache = self._cache
        pipe.indexes = self.indexes
        return pipe

    # -- video -> visual tokens ---------------------------------------------------------------------------------
    def encode(
        self, video: str | os.PathLike | Clip, sampling: Sampling = Sampling(), progress: StageProgress | None = None
    ) -> tuple[VisualTokens, dict]:
        """Visual tokens of a video (cached) and the seconds spent decoding and encoding."""
        d = self.defaults
        if isinstance(video, VisualTokens):  # already encoded (e.g. loaded with an index)
            return video, {"cached": True, "decode_s": 0.0, "encode_s": 0.0}
        reads_features = getattr(self.ranker, "reads_vision_features", False)
        sampling = self._resolved(sampling)
        if isinstance(video, Clip):
            key = None
        else:
            path = check_video_file(video)
            key = self._video_key(path, sampling)
            # A ranker of the authors' layout reads the vision tower's features, which a cached entry encoded
            # for another pipeline (same video cache, see with_ranker) may lack.
            if key in self._cache and (not reads_features or self._cache[key].vision_features is not None):
                self._cache.move_to_end(key)
                return self._cache[key], {"cached": True, "decode_s": 0.0, "encode_s": 0.0}
        t0 = time.perf_counter()
        clip = (
            video
            if isinstance(video, Clip)
            else load_clip(
                video,
                num_frames=sampling.frames,
                fps=sampling.fps,
                start=sampling.start,
                end=sampling.end,
                max_frames=sampling.max_frames or d.max_frames,
                max_side=sampling.max_side or d.max_side,
                on_frame=_stage(progress, "decode"),
            )
        )
        t1 = time.perf_counter()
        encode = self.backend.encode_with_vision_features if reads_features else self.backend.encode
        visual = encode(clip, _stage(progress, "encode"))
        t2 = time.perf_counter()
        if key is not None:
            self._cache[key] = visual
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return visual, {"cached": False, "decode_s": t1 - t0, "encode_s": t2 - t1, "sampled_frames": len(clip.frames)}

    def _resolved(self, sampling: Sampling) -> Sampling:
        if sampling.frames is None and sampling.fps is None:
            return Sampling(
                fps=self.defaults.fps,
                start=sampling.start,
                end=sampling.end,
                max_frames=sampling.max_frames,
                max_side=sampling.max_side,
            )
        return sampling

    @staticmethod
    def _video_key(path: Path, sampling: Sampling) -> tuple:
        st = path.stat()
        return (str(path.resolve()), st.st_mtime_ns, st.st_size, sampling)

    # -- visual tokens -> kept tokens ---------------------------------------------------------------------------
    def select(
        self,
        visual: VisualTokens,
        prompt: Prompt,
        options: SelectOptions = SelectOptions(),
        progress: StageProgress | None = None,
    ) -> Selection:
        t0 = time.perf_counter()
        selector = options.selector or ("lite" if self.ranker is not None else "reference")
        aggregate = options.aggregate or AGGREGATE
        budget, layer = options.budget, options.layer
        if selector == "lite" and self.ranker is None:
            raise FlexSelectError("selector 'lite' needs a ranker: pass --ranker PATH")
        if selector == "reference":
            layer = resolve_reference_layer(self.backend, layer)
        total = visual.num_tokens
        tpf = visual.tokens_per_frame
        if selector == "none":
            budget = total
        elif budget is None:
            budget = min(round_budget(self.defaults.budget, tpf), total)
        elif budget > total:
            raise FlexSelectError(
                f"the budget of {budget} tokens is larger than the video's {total} visual tokens "
                f"({visual.num_frames} frames x {tpf}); use a smaller budget or sample more frames (only the "
                "default budget is capped at the video's tokens)"
            )
        else:
            budget = min(round_budget(budget, tpf), total)
        sets = frame_sets(visual.num_frames, options.set_frames or SET_FRAMES)
        shares = split_budget(budget, [len(s) * tpf for s in sets])
        scored = [i for i, (frames, share) in enumerate(zip(sets, shares)) if share < len(frames) * tpf]
        index, notice = None, None
        if selector == "reference" and scored and self.auto_index:
            index, notice = self._index_for(visual, prompt, layer, options.set_frames or SET_FRAMES, sets)
        usage = _IndexUsage(index, notice)
        reused = self._score_reused(usage, visual, {i: sets[i] for i in scored}, prompt, aggregate)
        scores = torch.full((total,), float("nan"))
        kept = []
        for i, (frames, share) in enumerate(zip(sets, shares)):
            tokens = visual.frame_tokens(frames)
            if i not in scored:
                kept.append(tokens)  # the whole set fits: no scoring pass needed
            else:
                if selector == "lite":
                    set_scores = self.ranker.score(visual, frames, prompt)
                elif i in reused:
                    set_scores = reused[i]
                elif usage.index is not None:
                    set_scores = self._score_indexed(usage, visual, frames, prompt, layer, aggregate)
                else:
                    set_scores = self.backend.score(visual, frames, prompt, layer, aggregate)
                set_scores = set_scores.float().cpu()
                check_finite(set_scores, "the Lite ranker's scores" if selector == "lite" else "the attention scores")
                scores[tokens] = set_scores
                kept.append(tokens[top_k(set_scores, share)])
            if progress:
                progress("select", i + 1, len(sets))
        return Selection(
            kept=torch.sort(torch.cat(kept)).values,
            scores=scores,
            sets=sets,
            budget=budget,
            layer=layer if selector == "reference" else None,
            selector=selector,
            seconds=time.perf_counter() - t0,
            index=usage.stats(),
        )

    # -- the video index: each set's question-independent scoring state, kept for follow-up questions ------------
    def index(
        self,
        video: str | os.PathLike | Clip | VisualTokens,
        sampling: Sampling = Sampling(),
        options: SelectOptions = SelectOptions(),
        progress: StageProgress | None = None,
    ) -> VideoIndex:
        """Index every frame set of a video now (reference-layer scoring only), so any question about it costs about
        the answer pass. Raises FlexSelectError when the index would exceed the memory limit."""
        if not self._can_index():
            raise FlexSelectError(f"the {type(self.backend).__name__} backend cannot index a video")
        visual = video if isinstance(video, VisualTokens) else self.encode(video, sampling, progress)[0]
        layer = resolve_reference_layer(self.backend, options.layer)
        set_frames = options.set_frames or SET_FRAMES
        prompt = self.backend.prompt("?")  # only the prefix matters: the context rows never see the question
        sets = frame_sets(visual.num_frames, set_frames)
        index, notice = self._index_for(visual, prompt, layer, set_frames, sets)
        if index is None:
            raise FlexSelectError(
                notice.replace("scoring without an index", "raise --index-memory or sample fewer frames")
            )
        for i, frames in enumerate(sets):
            if tuple(frames) not in index.sets:
                index.sets[tuple(frames)] = self.backend.index_set(visual, frames, prompt, layer, index.device)
            if progress:
                progress("index", i + 1, len(sets))
        return index

    def save_index(
        self,
        video: str | os.PathLike,
        path: str | os.PathLike,
        sampling: Sampling = Sampling(),
        options: SelectOptions = SelectOptions(),
        progress: StageProgress | None = None,
    ) -> VideoIndex:
        """Index a video and write the index (with its visual tokens) to `path` (safetensors, atomic)."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FlexSelectError(f"cannot write {path}: the folder {path.parent} does not exist")
        visual, _ = self.encode(video, sampling, progress)
        index = self.index(visual, options=options, progress=progress)
        tensors = {"visual.embeds": visual.embeds}
        sets = []
        for g, (frames, entry) in enumerate(index.sets.items()):
            tensors.update({f"set{g}.{name}": t for name, t in self.backend.index_tensors(entry).items()})
            sets.append({"frames": list(frames), "build_s": entry.build_s})
        manifest = {
            "model": self.backend.identity(),
            "video": file_identity(Path(video)),
            "sampling": asdict(self._resolved(sampling)),
            "layer": index.key.layer,
            "set_frames": index.key.set_frames,
            "prefix": list(index.key.prefix),
            "bytes": index.nbytes,
            "visual": visual_manifest(visual),
            "sets": sets,
        }
        write_index(path, tensors, manifest)
        return index

    def load_index(
        self,
        path: str | os.PathLike,
        video: str | os.PathLike,
        sampling: Sampling = Sampling(),
        options: SelectOptions = SelectOptions(),
    ) -> VisualTokens:
        """Load an index written by `save_index` for `video`: its visual tokens are cached, so questions about the
        video skip decoding, encoding and the sets' context passes. Refuses an index made for another model, video,
        sampling, reference layer or set size, with a message that says which."""
        manifest, tensors = read_index(path)
        video = Path(video)
        if not video.is_file():
            raise FlexSelectError(f"video not found: {video}")
        layer = resolve_reference_layer(self.backend, options.layer)
        expected = {
            "model": (self.backend.identity(), "another model"),
            "video": (file_identity(video), "another video"),
            "sampling": (asdict(self._resolved(sampling)), "other frame sampling"),
            "layer": (layer, "another reference layer"),
            "set_frames": (options.set_frames or SET_FRAMES, "another set size"),
        }
        for name, (value, what) in expected.items():
            if manifest.get(name) != value:
                raise FlexSelectError(
                    f"{path} was made for {what} ({difference(name, manifest.get(name), value)}): "
                    "rebuild it with `flexselect index`"
                )
        prompt = self.backend.prompt("?")
        if manifest["prefix"] != prompt.prefix_ids.tolist():
            raise FlexSelectError(f"{path} was made with another prompt template: rebuild it with `flexselect index`")
        embeds = tensors["visual.embeds"].to(getattr(self.backend, "device", "cpu"))
        visual = visual_from_manifest(manifest["visual"], embeds)
        key = IndexKey(layer, manifest["set_frames"], tuple(manifest["prefix"]))
        index = VideoIndex(key, planned_bytes=manifest["bytes"])
        index.device = self.indexes.placement(index.planned_bytes, getattr(self.backend, "device", None))
        for g, info in enumerate(manifest["sets"]):
            part = {name.split(".", 1)[1]: t for name, t in tensors.items() if name.startswith(f"set{g}.")}
            entry = self.backend.index_from_tensors(tuple(info["frames"]), layer, info["build_s"], part)
            index.sets[tuple(info["frames"])] = entry.to(index.device)
        self.indexes.put(visual, index)
        self._cache[self._video_key(video, self._resolved(sampling))] = visual
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return visual

    def _can_index(self) -> bool:
        """Only pure-attention models: a hybrid model's (Qwen3.5) linear-attention layers carry a recurrent state that
        a question would advance and that cannot be cut back to the video's, as a KV cache can."""
        hybrid = len(attention_layers(self.backend)) < self.backend.num_layers
        return hasattr(self.backend, "index_set") and not hybrid

    def clear_index(self) -> int:
        """Drop every video index (frees their GPU / CPU memory); returns how many were dropped."""
        return self.indexes.clear()

    def _index_for(
        self, visual: VisualTokens, prompt: Prompt, layer: int, set_frames: int, sets: list[list[int]]
    ) -> tuple[VideoIndex | None, str | None]:
        """This video's index for (layer, set size, prompt prefix), or room made for a new one; None and a
        one-line notice when it would not fit the memory limit; (None, None) when the backend cannot index."""
        if not self._can_index():
            return None, None
        key = IndexKey(layer, set_frames, tuple(prompt.prefix_ids.tolist()))
        index = self.indexes.get(visual, key)
        if index is not None:
            return index, None
        planned = self.backend.index_bytes(visual, sets, prompt, layer)
        logging.getLogger("flexselect.index").info(
            "indexing this video: %d frame set(s), about %s", len(sets), gib(planned)
        )
        return self.indexes.reserve(visual, key, planned, getattr(self.backend, "device", None))

    def _score_reused(
        self, usage: _IndexUsage, visual: VisualTokens, sets: dict[int, list[int]], prompt: Prompt, aggregate: Aggregate
    ) -> dict[int, torch.Tensor]:
        """Scores of the sets this video's index already holds, all at once where the backend can batch them (a
        follow-up question); the other sets are left to `_score_indexed`."""
        if usage.index is None or not hasattr(self.backend, "score_indexed_many"):
            return {}
        held = {i: usage.index.sets[tuple(frames)] for i, frames in sets.items() if tuple(frames) in usage.index.sets}
        usage.reused += len(held)
        usage.saved_s += sum(entry.build_s for entry in held.values())
        return dict(zip(held, self.backend.score_indexed_many(list(held.values()), visual, prompt, aggregate)))

    def _score_indexed(
        self,
        usage: _IndexUsage,
        visual: VisualTokens,
        frames: list[int],
        prompt: Prompt,
        layer: int,
        aggregate: Aggregate,
    ) -> torch.Tensor:
        index = usage.index
        entry = index.sets.get(tuple(frames))
        if entry is None:
            try:
                entry = self.backend.index_set(visual, frames, prompt, layer, index.device)
            except (torch.OutOfMemoryError, MemoryError):
                self.indexes.discard(visual, index.key)
                usage.drop("ran out of memory while indexing: scoring without an index")
                return self.backend.score(visual, frames, prompt, layer, aggregate)
            index.sets[tuple(frames)] = entry
            usage.built += 1
        else:
            usage.reused += 1
            usage.saved_s += entry.build_s
        return self.backend.score_indexed(entry, visual, prompt, aggregate)

    # -- the whole job ------------------------------------------------------------------------------------------
    def check_fits(self, video, sampling: Sampling, options: SelectOptions, generation: GenerationConfig) -> None:
        """Refuse a run the memory estimate of `flexselect.plan` says cannot fit, before decoding anything.
        Transformers backends only (the llama.cpp backend checks its context itself)."""
        from . import plan
        from .video import output_size, probe, sample_indices

        model = getattr(self.backend, "model", None)  # the llama.cpp backend's `model` is a C pointer: skipped
        if not isinstance(model, torch.nn.Module) or isinstance(video, Clip):
            return
        d = self.defaults
        fps = sampling.fps if sampling.frames is not None or sampling.fps is not None else d.fps
        info = probe(video)
        n = len(
            sample_indices(
                info,
                sampling.frames,
                fps if sampling.frames is None else None,
                sampling.start,
                sampling.end,
                sampling.max_frames or d.max_frames,
            )
        )
        width, height = output_size(info.width, info.height, sampling.max_side or d.max_side)
        shape = self._shape or plan.shape_of(model)
        self._shape = shape
        req = plan.request(
            shape, n, width, height, options.budget, options.set_frames, options.layer, generation.max_new_tokens
        )
        device = str(self.backend.device)
        est = plan.estimate(shape, req, model.dtype.itemsize, materialised_attention=device == "cpu")
        free, host, name = plan.available_memory(device)
        plan.check_fits(est, free, host, name, weights_loaded=True)

    def check_question_fits(self, prompt: Prompt, generation: GenerationConfig) -> None:
        """A question too long for the model's context is refused before any video work, and named as the cause."""
        text = len(prompt.prefix_ids) + len(prompt.suffix_ids)
        limit = self.backend.context_length
        if text + generation.max_new_tokens >= limit:
            hint = "shorten the question" if text >= limit // 2 else "generate fewer tokens (max_new_tokens)"
            raise FlexSelectError(
                f"the question takes {text} tokens with the chat template and the answer up to "
                f"{generation.max_new_tokens}: no room is left for the video in this model's context of {limit} "
                f"tokens; {hint}"
            )

    def answer(
        self,
        video: str | os.PathLike | Clip,
        question: str,
        sampling: Sampling = Sampling(),
        options: SelectOptions = SelectOptions(),
        generation: GenerationConfig = GenerationConfig(),
        progress: StageProgress | None = None,
        history: list[tuple[str, str]] = (),
    ) -> Answer:
        """`history`: earlier (question, answer) turns of the conversation. They go to the answer pass only; the
        selection is made for the question alone (measured and explained in README.md, "Follow-up questions")."""
        if not question or not question.strip():
            raise FlexSelectError("the question is empty: ask something about the video")
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        prompt = self.backend.prompt(question.strip())
        self.check_question_fits(prompt, generation)
        self.check_fits(video, sampling, options, generation)
        visual, encode_stats = self.encode(video, sampling, progress)
        selection = self.select(visual, prompt, options, progress)
        answer_prompt = self.backend.prompt(conversation(history, question.strip())) if history else prompt
        generated = self.backend.generate(visual, selection.kept, answer_prompt, generation, _stage(progress, "answer"))
        total_s = time.perf_counter() - t0
        stats = {
            "frames": encode_stats.get("sampled_frames"),
            "frame_units": visual.num_frames,
            "tokens_per_frame": visual.tokens_per_frame,
            "visual_tokens": visual.num_tokens,
            "kept_tokens": int(len(selection.kept)),
            "frame_sets": len(selection.sets),
            "selector": selection.selector,
            "reference_layer": selection.layer,
            "video_cached": encode_stats["cached"],
            "index": selection.index,
            "seconds": {
                "decode": encode_stats["decode_s"],
                "encode": encode_stats["encode_s"],
                "select": selection.seconds,
                "ttft_answer": generated.ttft_s,
                "answer": total_s - encode_stats["decode_s"] - encode_stats["encode_s"] - selection.seconds,
                "total": total_s,
            },
            "peak_memory_mb": peak_memory_mb(),
        }
        return Answer(generated.text, visual, selection, generated, stats, selection.evidence(visual), question.strip())


class _IndexUsage:
    """What one selection did with the video's index (for the stats)."""

    def __init__(self, index: VideoIndex | None, notice: str | None) -> None:
        self.index = index
        self.reused = self.built = 0
        self.saved_s = 0.0
        self.notice = notice

    def drop(self, notice: str) -> None:
        log.warning(notice)
        self.index, self.notice = None, notice

    def stats(self) -> dict:
        if self.index is None:
            return {"used": False, "notice": self.notice} if self.notice else {"used": False}
        return {
            "used": True,
            "reused_sets": self.reused,
            "built_sets": self.built,
            "saved_s": self.saved_s,
            "bytes": self.index.nbytes,
            "device": self.index.device,
        }


def peak_memory_mb() -> dict:
    """Peak GPU memory (if CUDA is in use) and the process's peak resident memory, in MiB."""
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak = {"process_rss": round(rss_kb / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)}
    if torch.cuda.is_available():
        peak["gpu"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peak


def _stage(progress: StageProgress | None, stage: str):
    return (lambda done, total: progress(stage, done, total)) if progress else None


KEEP_LOADED = 2  # models the one-call form keeps loaded; loading another drops the least recently used
_LOADED: OrderedDict[tuple, FlexSelect] = OrderedDict()


def answer(video: str | os.PathLike, question: str, model: str | os.PathLike | None = None, **options) -> Answer:
    """One call: load `model` (kept loaded for the next calls, up to `KEEP_LOADED` models) and answer `question`.

    `options` are those of `FlexSelect.load` (device, dtype, gguf, mmproj, ranker, positions) and of
    `FlexSelect.answer` (sampling, options, generation, progress).
    """
    load_keys = ("gguf", "mmproj", "ranker", "device", "dtype", "positions", "n_ctx", "n_gpu_layers")
    load_args = {k: options.pop(k) for k in load_keys if k in options}
    key = (str(model), tuple(sorted((k, str(v)) for k, v in load_args.items())))
    if key in _LOADED:
        _LOADED.move_to_end(key)
    else:
        while len(_LOADED) >= KEEP_LOADED:  # released before the next load, so two models never exceed the limit
            _LOADED.popitem(last=False)
        _LOADED[key] = FlexSelect.load(model, **load_args)
    return _LOADED[key].answer(video, question, **options)
