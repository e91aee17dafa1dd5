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
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

import numpy as np
import torch

from .defaults import AGGREGATE, SET_FRAMES, family_defaults, resolve_layer
from .errors import FlexSelectError, check_positive
from .evidence import EvidenceRange, evidence_ranges
from .backends.base import Backend, Generation, GenerationConfig, Prompt, VisualTokens
from .selection import Aggregate, frame_sets, round_budget, split_budget, top_k
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
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)
                                       or self.layer < 0):
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


class FlexSelect:
    """Load once, ask many questions. See `answer()` for the one-call form."""

    def __init__(self, backend: Backend, ranker: Ranker | None = None, cache_videos: int = 4) -> None:
        self.backend = backend
        self.ranker = ranker
        if ranker is not None:
            ranker.check_compatible(backend)
        self.defaults = family_defaults(backend.family)
        self._cache: OrderedDict[tuple, VisualTokens] = OrderedDict()
        self._cache_size = cache_videos
        self._shape = None  # the model's shape for memory checks (flexselect.plan), read on first use

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
    ) -> "FlexSelect":
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
        pipe = cls(backend)
        return pipe.with_ranker(ranker) if ranker is not None else pipe

    def with_ranker(self, ranker: str | os.PathLike) -> "FlexSelect":
        """The same loaded model (and video cache) scored by a Lite ranker: no second copy of the big model."""
        from .lite import load_ranker

        pipe = FlexSelect(self.backend, load_ranker(ranker, self.backend), self._cache_size)
        pipe._cache = self._cache
        return pipe

    # -- video -> visual tokens ---------------------------------------------------------------------------------
    def encode(
        self, video: str | os.PathLike | Clip, sampling: Sampling = Sampling(), progress: StageProgress | None = None
    ) -> tuple[VisualTokens, dict]:
        """Visual tokens of a video (cached) and the seconds spent decoding and encoding."""
        d = self.defaults
        if sampling.frames is None and sampling.fps is None:
            sampling = Sampling(fps=d.fps, start=sampling.start, end=sampling.end, max_frames=sampling.max_frames,
                                max_side=sampling.max_side)
        if isinstance(video, Clip):
            key = None
        else:
            path = check_video_file(video)
            st = path.stat()
            key = (str(path.resolve()), st.st_mtime_ns, st.st_size, sampling)
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key], {"cached": True, "decode_s": 0.0, "encode_s": 0.0}
        t0 = time.perf_counter()
        clip = video if isinstance(video, Clip) else load_clip(
            video, num_frames=sampling.frames, fps=sampling.fps, start=sampling.start, end=sampling.end,
            max_frames=sampling.max_frames or d.max_frames, max_side=sampling.max_side or d.max_side,
            on_frame=_stage(progress, "decode"),
        )
        t1 = time.perf_counter()
        visual = self.backend.encode(clip, _stage(progress, "encode"))
        t2 = time.perf_counter()
        if key is not None:
            self._cache[key] = visual
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return visual, {"cached": False, "decode_s": t1 - t0, "encode_s": t2 - t1, "sampled_frames": len(clip.frames)}

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
            layer = resolve_layer(self.backend.family, self.backend.num_layers, layer)
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
        scores = torch.full((total,), float("nan"))
        kept = []
        for i, (frames, share) in enumerate(zip(sets, shares)):
            tokens = visual.frame_tokens(frames)
            if share >= len(tokens):
                kept.append(tokens)  # the whole set fits: no scoring pass needed
            else:
                if selector == "lite":
                    set_scores = self.ranker.score(visual, frames, prompt)
                else:
                    set_scores = self.backend.score(visual, frames, prompt, layer, aggregate)
                set_scores = set_scores.float().cpu()
                scores[tokens] = set_scores
                kept.append(tokens[top_k(set_scores, share)])
            if progress:
                progress("select", i + 1, len(sets))
        return Selection(
            kept=torch.sort(torch.cat(kept)).values, scores=scores, sets=sets, budget=budget,
            layer=layer if selector == "reference" else None, selector=selector, seconds=time.perf_counter() - t0,
        )

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
        n = len(sample_indices(info, sampling.frames, fps if sampling.frames is None else None, sampling.start,
                               sampling.end, sampling.max_frames or d.max_frames))
        width, height = output_size(info.width, info.height, sampling.max_side or d.max_side)
        shape = self._shape or plan.shape_of(model)
        self._shape = shape
        req = plan.request(shape, n, width, height, options.budget, options.set_frames, options.layer,
                           generation.max_new_tokens)
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
    ) -> Answer:
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
        generated = self.backend.generate(visual, selection.kept, prompt, generation, _stage(progress, "answer"))
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
        return Answer(generated.text, visual, selection, generated, stats, selection.evidence(visual))


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
