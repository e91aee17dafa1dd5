"""What all transformers backends share: the scoring pass that stops at the reference layer, and generation.

A family adapter subclasses `HFBackend` and says how frames become visual tokens (`encode`) and how a frame set and
the answer prompt are laid out with their positions (`scoring_inputs`, `answer_inputs`, each a `LayoutedInput`
that also says where the visual tokens sit and carries any extra inputs the language model takes, e.g. DeepStack).

The scoring pass captures Q/K through transformers' attention interface: while it runs, the language model's
attention implementation is `flexselect_capture`, which receives every layer's query and key states exactly as the
attention would use them (after the input norm, the projections, any per-head Q/K norm and RoPE / M-RoPE). Below
the reference layer it is plain sdpa; at the reference layer it scores the question rows
(`selection.question_attention_scores`) and stops the pass by raising, so nothing at or after that layer's attention
runs. No family rebuilds Q/K by hand, so Qwen3-VL's Q/K norms and DeepStack need no special case.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import FlexSelectError
from ...selection import Aggregate, question_attention_scores
from ..base import Generation, GenerationConfig, OnToken, Progress, Prompt, VisualTokens, answer_tokens
from .index import IndexedScoring

CAPTURE_ATTENTION = "flexselect_capture"


class _CaptureDone(Exception):
    """Raised from the attention of the last layer to score, so nothing at or after it runs."""


@dataclass
class _Capture:
    layers: frozenset[int]  # layers whose question-to-key attention is scored
    n_rows: int  # question rows: the last n_rows query positions
    aggregate: Aggregate
    scores: dict[int, torch.Tensor] = field(default_factory=dict)


def _capture_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    flexselect_capture: _Capture | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of the scoring pass: query [1, H, Nq, d], key [1, H_kv, Nk, d] as the layer uses them."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = flexselect_capture
    if capture is not None and module.layer_idx in capture.layers:
        rows, every_key = -capture.n_rows, slice(0, key.shape[2])
        capture.scores[module.layer_idx] = torch.stack(
            [question_attention_scores(q[:, rows:], k, every_key, capture.aggregate) for q, k in zip(query, key)]
        )
        if len(capture.scores) == len(capture.layers):
            raise _CaptureDone
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
        sdpa_mask,
    )

    if CAPTURE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionInterface.register(CAPTURE_ATTENTION, _capture_attention)
        AttentionMaskInterface.register(CAPTURE_ATTENTION, sdpa_mask)  # the masks sdpa gets below the layer


@contextmanager
def _capturing(text_model: nn.Module) -> Iterator[None]:
    """The language model runs on the capture attention inside the block (its own implementation after)."""
    _register()
    config = text_model.config
    previous = config._attn_implementation
    config._attn_implementation = CAPTURE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def attention_scores(
    text_model: nn.Module, layers: Sequence[int], n_rows: int, aggregate: Aggregate = "max", **inputs: Any
) -> dict[int, torch.Tensor]:
    """Run `text_model(**inputs)` on one sequence up to the attention of the deepest of `layers` and return, per
    layer, the scores of every key position (cached ones included, with `past_key_values`) for the last `n_rows`
    query positions, as `question_attention_scores` defines them. Nothing after the deepest layer's Q/K projections
    runs, and a given cache is cropped back to its length on return.

    `inputs` are the language model's own: inputs_embeds, position_ids, optional past_key_values (a cached prefix,
    e.g. a video index), and family extras such as Qwen3-VL's DeepStack (visual_pos_masks, deepstack_visual_embeds).
    """
    batch = batch_attention_scores(text_model, layers, n_rows, aggregate, **inputs)
    return {layer: scores[0] for layer, scores in batch.items()}


def batch_attention_scores(
    text_model: nn.Module, layers: Sequence[int], n_rows: int, aggregate: Aggregate = "max", **inputs: Any
) -> dict[int, torch.Tensor]:
    """`attention_scores` of a batch of B sequences of equal length (each with its own cached prefix, as one
    `past_key_values` of batch B): per layer, [B, keys] scores."""
    n_layers = len(text_model.layers)
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise FlexSelectError(f"reference layer {layer} is out of range: this model has layers 0..{n_layers - 1}")
    capture = _Capture(frozenset(layers), n_rows, aggregate)
    cache = inputs.get("past_key_values")
    cached = cache.get_seq_length() if cache is not None else 0
    with _capturing(text_model):
        try:
            text_model(**inputs, use_cache=False, flexselect_capture=capture)
        except _CaptureDone:
            pass
        finally:
            if cache is not None:  # the layers that ran appended these tokens: drop them, the prefix stays reusable
                for cached_layer in cache.layers:
                    if cached_layer.get_seq_length() > cached:
                        cached_layer.crop(cached - cached_layer.get_seq_length())
    if len(capture.scores) != len(capture.layers):  # a model whose attention does not go through the interface
        raise FlexSelectError(f"{type(text_model).__name__} never reached the capture attention: not supported")
    return capture.scores


@dataclass
class LayoutedInput:
    """An input sequence ready for the language model: embeddings plus the model's position ids."""

    embeds: torch.Tensor  # [1, N, hidden]
    position_ids: torch.Tensor  # [1, N] or [3, 1, N] (M-RoPE)
    next_position: int  # position of the first generated token (all dims alike)
    visual_columns: torch.Tensor  # [V] sequence positions of the visual tokens, in the order they were given
    extra: dict[str, Any] = field(default_factory=dict)  # further language-model inputs (Qwen3-VL: DeepStack)

    def model_inputs(self) -> dict[str, Any]:
        return {"inputs_embeds": self.embeds, "position_ids": self.position_ids, **self.extra}


def check_checkpoint_files(path: Path) -> None:
    """One clear error for a checkpoint folder with missing or truncated files (an interrupted download), before
    transformers fails somewhere inside: the weights (every shard its index lists, each as long as its header says)
    and the tokenizer."""
    problems = []
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as e:
            shards, problems = [], [f"{index.name} is damaged ({e})"]
    elif (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        shards = []  # a pickle checkpoint: transformers reports its own problems
    else:
        shards = ["model.safetensors"]
    for name in shards:
        shard = path / name
        if not shard.is_file():
            problems.append(f"{name} is missing")
        elif not _safetensors_complete(shard):
            problems.append(f"{name} is truncated")
    if not (path / "tokenizer.json").is_file() and not (path / "vocab.json").is_file():
        problems.append("the tokenizer (tokenizer.json) is missing")
    if problems:
        raise FlexSelectError(
            f"the checkpoint {path} is incomplete: {'; '.join(problems)}. Download the whole "
            "model folder again (e.g. `hf download <repo> --local-dir <folder>`)"
        )


def _safetensors_complete(path: Path) -> bool:
    """A safetensors file holds an 8-byte header length, the JSON header, then the tensors' bytes it lists."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return False
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            return False
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return False
    ends = [t["data_offsets"][1] for key, t in header.items() if key != "__metadata__"]
    return 8 + header_len + max(ends, default=0) <= size


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise FlexSelectError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise FlexSelectError(f"device {device!r} was asked for but torch sees no CUDA GPU; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise FlexSelectError(
                f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} "
                f"CUDA GPU(s), cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    return dev


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def check_dtype(dtype: str) -> None:
    if dtype != "auto" and dtype not in DTYPES:
        raise FlexSelectError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    check_dtype(dtype)
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[dtype]


def load_pretrained(model_class, path: Path, device: str, dtype: str) -> nn.Module:
    """A checkpoint's model on the device asked for ("auto": CUDA where there is one) in the dtype asked for."""
    dev = resolve_device(device)
    return model_class.from_pretrained(path, dtype=resolve_dtype(dtype, dev)).to(dev)


class HFBackend(IndexedScoring):
    """Base of the transformers backends (see module docstring); `IndexedScoring` adds the video index."""

    family: str
    model: nn.Module
    tokenizer: object
    eos_token_ids: set[int]

    @property
    def text_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_layers(self) -> int:
        return len(self.text_model.layers)

    @property
    def hidden_size(self) -> int:
        return self.text_model.config.hidden_size

    @property
    def context_length(self) -> int:
        return self.text_model.config.max_position_embeddings

    def _check_fits(self, n_tokens: int, what: str, prompt: Prompt, new_tokens: int = 0) -> None:
        """A clear error before a pass longer than the model was made for (it would degrade, or run out of memory),
        naming the part that is too long: the question's text, or the visual tokens."""
        if n_tokens <= self.context_length:
            return
        text = len(prompt.prefix_ids) + len(prompt.suffix_ids)
        visual = n_tokens - text - new_tokens
        parts = f"{text} of prompt and question, {visual} visual" + (f", {new_tokens} new" if new_tokens else "")
        if text + new_tokens >= self.context_length // 2:
            hint = "shorten the question" + (" or generate fewer tokens" if new_tokens else "")
        else:
            hint = "keep fewer visual tokens (a smaller budget or set_frames, or fewer frames)"
        raise FlexSelectError(
            f"the {what} needs {n_tokens} tokens ({parts}) but this model takes at most {self.context_length}: {hint}"
        )

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(ids.to(self.device))

    # -- family hooks -------------------------------------------------------------------------------------------
    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        raise NotImplementedError

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        raise NotImplementedError

    def scoring_columns(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> torch.Tensor:
        """Sequence positions of the set's visual tokens (in `visual.frame_tokens(frames)` order)."""
        return self.scoring_inputs(visual, frames, prompt).visual_columns

    # -- scoring pass -------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def layer_scores(
        self, inputs: LayoutedInput, layers: Sequence[int], n_rows: int, aggregate: Aggregate = "max"
    ) -> dict[int, torch.Tensor]:
        """Scores of the visual tokens of `inputs` at each of `layers` from one pass that stops at the deepest."""
        scores = attention_scores(self.text_model, layers, n_rows, aggregate, **inputs.model_inputs())
        columns = inputs.visual_columns.to(self.device)
        return {layer: s[columns] for layer, s in scores.items()}

    @torch.inference_mode()
    def score(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, aggregate: Aggregate = "max"
    ) -> torch.Tensor:
        inputs = self.scoring_inputs(visual, frames, prompt)
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set", prompt)
        return self.layer_scores(inputs, [layer], len(prompt.suffix_ids), aggregate)[layer]

    # -- answer pass --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self,
        visual: VisualTokens,
        kept: torch.Tensor,
        prompt: Prompt,
        config: GenerationConfig,
        progress: Progress | None = None,
        on_token: OnToken | None = None,
    ) -> Generation:
        from transformers import DynamicCache

        start = time.perf_counter()
        inputs = self.answer_inputs(visual, kept, prompt)
        self._check_fits(inputs.embeds.shape[1] + config.max_new_tokens, "answer", prompt, config.max_new_tokens)
        cache = DynamicCache(config=self.text_model.config)
        hidden = self.text_model(**inputs.model_inputs(), past_key_values=cache, use_cache=True).last_hidden_state
        position = inputs.next_position

        def feed(token: int) -> torch.Tensor:
            nonlocal position
            pos = torch.full((1, 1), position, device=self.device, dtype=torch.long)
            if inputs.position_ids.dim() == 3:
                pos = pos.expand(inputs.position_ids.shape[0], 1, 1)
            hidden = self.text_model(
                inputs_embeds=self.embed_ids(torch.tensor([[token]])),
                position_ids=pos,
                past_key_values=cache,
                use_cache=True,
            ).last_hidden_state
            position += 1
            return self.model.lm_head(hidden[:, -1]).float()[0]

        first = self.model.lm_head(hidden[:, -1]).float()[0]
        token_ids, ttft, _ = answer_tokens(first, feed, config, self.eos_token_ids, start, progress, on_token)
        return Generation(
            text=self.decode(token_ids).strip(), token_ids=token_ids, ttft_s=ttft, prompt_tokens=inputs.embeds.shape[1]
        )

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)
