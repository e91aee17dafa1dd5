"""What every model backend provides to the pipeline, and the data that flows between the steps.

video -> Clip (video.py) -> VisualTokens (backend.encode) -> frame sets (selection.py) -> scores (backend.score or a
Lite ranker) -> kept token indices (selection.py) -> answer (backend.generate). A backend is a thin adapter: how
frames become visual tokens, where they sit in the prompt, how positions work, which layer is the reference.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from numbers import Integral
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch

from ..defaults import reference_layer_for
from ..errors import FlexSelectError, check_positive
from ..selection import Aggregate, check_finite

if TYPE_CHECKING:  # only for type hints: the models never decode video themselves
    from ..video import Clip

Progress = Callable[[int, int], None]  # (done, total); may raise to cancel (ComfyUI does)
OnToken = Callable[[int], None]  # each generated token's id, as it is sampled (the server streams with it)


@dataclass
class VisualTokens:
    """A video's visual tokens as the language model takes them: encoded once, cached, then scored per frame set."""

    embeds: torch.Tensor  # [num_frames * tokens_per_frame, hidden], frame-major, on the model's device
    num_frames: int  # temporal units (Qwen2.5-VL: pairs of sampled frames)
    grid: tuple[int, int]  # merged tokens per frame as (rows, cols)
    timestamps: np.ndarray  # [num_frames] seconds at which each unit starts
    time_interval: float  # temporal position step per unit (M-RoPE families; 1.0 elsewhere)
    frame_size: tuple[int, int]  # (height, width) in pixels fed to the vision tower
    source: str = ""
    frames_per_unit: int = 1  # sampled frames merged into one unit (Qwen's temporal patch: 2)
    # [num_frames, rows, D]: the vision tower's features before the host's projector, for a Lite ranker of the
    # authors' layout (backends' `encode_with_vision_features`); None when encoded without them
    vision_features: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_tokens(self) -> int:
        return self.num_frames * self.tokens_per_frame

    def frame_tokens(self, frames: list[int]) -> torch.Tensor:
        """Global token indices of the given frames, in the given order."""
        tpf = self.tokens_per_frame
        return (torch.tensor(frames)[:, None] * tpf + torch.arange(tpf)[None, :]).reshape(-1)


@dataclass
class Prompt:
    """The chat prompt around the video. The suffix (question + answer cue) holds the rows that score."""

    prefix_ids: torch.Tensor  # [P] long: text before the video
    suffix_ids: torch.Tensor  # [T] long: text after the video
    question: str


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive("max_new_tokens", self.max_new_tokens, whole=True)
        check_positive("temperature", self.temperature, allow_zero=True)
        check_positive("top_p", self.top_p)
        if self.top_p > 1:
            raise FlexSelectError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, Integral):
            raise FlexSelectError(f"seed must be a whole number, got {self.seed!r}")


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    ttft_s: float  # from the start of the answer pass to the first sampled token
    prompt_tokens: int  # prefix + kept visual + suffix
    stats: dict = field(default_factory=dict)


class Backend(Protocol):
    """A Video-LLM as FlexSelect needs it. Implemented by the transformers adapters and the llama.cpp backend."""

    family: str  # key into defaults.json
    num_layers: int
    hidden_size: int
    context_length: int  # tokens one pass may hold (prompt, visual tokens and the answer together)

    def encode(self, clip: Clip, progress: Progress | None = None) -> VisualTokens: ...

    def prompt(self, question: str) -> Prompt: ...

    def score(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, aggregate: Aggregate
    ) -> torch.Tensor:
        """Scores of the tokens of `frames` (in visual.frame_tokens(frames) order) at the reference `layer`,
        from a pass over [prefix + those frames' tokens as a short video + suffix] that stops at that layer."""
        ...

    def generate(
        self,
        visual: VisualTokens,
        kept: torch.Tensor,
        prompt: Prompt,
        config: GenerationConfig,
        progress: Progress | None = None,
        on_token: OnToken | None = None,
    ) -> Generation:
        """Answer from [prefix + the kept tokens (ascending global indices) + suffix]; `progress` is called after
        each new token (it may raise to cancel), `on_token` with that token's id (for streaming: see `decode`)."""
        ...

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated token ids, special tokens dropped (a partial character decodes to U+FFFD)."""
        ...


def attention_layers(backend: Backend) -> list[int]:
    """The layers a reference layer can be: those with a softmax attention map to score. Every layer, except in
    hybrid models (Qwen3.5) whose linear-attention layers have none: their backend lists the others as
    `attention_layers`."""
    return list(getattr(backend, "attention_layers", range(backend.num_layers)))


def check_reference_layer(backend: Backend, layer: int) -> None:
    """One clear error for a reference layer the model cannot be scored at, before any pass runs."""
    if not 0 <= layer < backend.num_layers:
        raise FlexSelectError(
            f"reference layer {layer} is out of range: this model has layers 0..{backend.num_layers - 1}"
        )
    valid = attention_layers(backend)
    if layer not in valid:
        raise FlexSelectError(
            f"reference layer {layer} is a linear-attention layer, which has no attention map to score; this model's "
            f"full-attention layers are {', '.join(map(str, valid))}: pass one of them as --layer"
        )


def resolve_reference_layer(backend: Backend, layer: int | None) -> int:
    """The layer to score at: `layer`, or the family's default for this model (the full-attention layer nearest the
    paper's relative depth), refused with one clear line if the model cannot be scored there. Every path that scores
    (the pipeline, Lite's teacher) asks this, once, before any pass runs."""
    if layer is None:
        layer = reference_layer_for(backend.family, backend.num_layers, tuple(attention_layers(backend)))
    check_reference_layer(backend, layer)
    return layer


def sample(logits: torch.Tensor, config: GenerationConfig, rng: torch.Generator) -> int:
    """Greedy at temperature 0, else temperature + nucleus sampling with a seeded generator (reproducible)."""
    check_finite(logits, "the next-token logits", masked_ok=True)
    if config.temperature <= 0:
        return int(logits.argmax())
    probs = (logits / config.temperature).softmax(-1).cpu()
    if config.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > config.top_p
        probs[order[outside]] = 0.0
    return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))


def answer_tokens(
    logits: torch.Tensor,
    feed: Callable[[int], torch.Tensor],
    config: GenerationConfig,
    eos_token_ids: set[int],
    start: float,
    progress: Progress | None = None,
    on_token: OnToken | None = None,
    room: int | None = None,
) -> tuple[list[int], float, str]:
    """The answer loop every backend shares, from the prompt's last `logits`: sample (`sample`), stop at an
    end-of-answer id, after `max_new_tokens`, or once `room` tokens are out (the context is full); else
    `feed(token)` runs the model on the token and gives the next logits. Returns (token ids, seconds from `start`
    to the first sampled token, why it stopped: "eos", "max_new_tokens" or "context_full")."""
    rng = torch.Generator().manual_seed(config.seed)
    token_ids: list[int] = []
    ttft = 0.0
    for step in range(config.max_new_tokens):
        token = sample(logits, config, rng)
        if step == 0:
            ttft = time.perf_counter() - start
        if token in eos_token_ids:
            return token_ids, ttft, "eos"
        token_ids.append(token)
        if on_token:
            on_token(token)
        if progress:
            progress(step + 1, config.max_new_tokens)
        if step + 1 == config.max_new_tokens:
            break
        if room is not None and len(token_ids) >= room:
            return token_ids, ttft, "context_full"
        logits = feed(token)
    return token_ids, ttft, "max_new_tokens"
