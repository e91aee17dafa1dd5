"""What all transformers backends share: the scoring pass that stops at the reference layer, and generation.

A family adapter subclasses `HFBackend` and says how frames become visual tokens (`encode`), how a frame set and
the answer prompt are laid out with their positions (`scoring_inputs`, `answer_inputs`), and where its language
model sits. Everything here is family-agnostic because decoder layers of the Qwen2/Llama kind all receive the
rotary (cos, sin) of the sequence as `position_embeddings`: the scoring pass captures exactly what the reference
layer would have used, so RoPE and M-RoPE need no special cases.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import FlexSelectError
from ...selection import Aggregate, question_attention_scores
from ..base import Generation, GenerationConfig, Progress, Prompt, VisualTokens, sample
from .index import IndexedScoring


class _ReachedReferenceLayer(Exception):
    """Raised from a pre-hook on the reference layer so nothing at or after it runs."""


@dataclass
class LayoutedInput:
    """An input sequence ready for the language model: embeddings plus the model's position ids."""

    embeds: torch.Tensor  # [1, N, hidden]
    position_ids: torch.Tensor  # [1, N] or [3, 1, N] (M-RoPE)
    next_position: int  # position of the first generated token (all dims alike)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Standard rotary embedding: x [B, H, N, d]; cos/sin [B, N, d] as the model's rotary module returns them."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FlexSelectError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise FlexSelectError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16") from None


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

    def _check_fits(self, n_tokens: int, what: str) -> None:
        """A clear error before a pass longer than the model was made for (it would degrade, or run out of memory)."""
        if n_tokens > self.context_length:
            raise FlexSelectError(
                f"the {what} needs {n_tokens} tokens but this model takes at most {self.context_length}: use a "
                "smaller --budget, fewer --frames or a smaller --set-frames"
            )

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embed_tokens(ids.to(self.device))

    # -- family hooks -------------------------------------------------------------------------------------------
    def scoring_inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> LayoutedInput:
        raise NotImplementedError

    def answer_inputs(self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt) -> LayoutedInput:
        raise NotImplementedError

    # -- scoring pass -------------------------------------------------------------------------------------------
    def hidden_at_layer(self, inputs: LayoutedInput, layer: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Run layers 0..layer-1 and return what enters `layer`: hidden states and its rotary (cos, sin)."""
        if not 0 <= layer < self.num_layers:
            raise FlexSelectError(
                f"reference layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}"
            )
        captured: dict[str, object] = {}

        def stop_here(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rotary"] = kwargs["position_embeddings"]
            raise _ReachedReferenceLayer

        handle = self.text_model.layers[layer].register_forward_pre_hook(stop_here, with_kwargs=True)
        try:
            self.text_model(inputs_embeds=inputs.embeds, position_ids=inputs.position_ids, use_cache=False)
        except _ReachedReferenceLayer:
            pass
        finally:
            handle.remove()
        return captured["hidden"], captured["rotary"]

    def question_qk(self, hidden: torch.Tensor, rotary: tuple, layer: int, n_rows: int):
        """Queries of the last `n_rows` positions and keys of all positions at `layer`, RoPE applied: only the
        layer's input norm and Q/K projections run (no attention, no MLP)."""
        block = self.text_model.layers[layer]
        attn = block.self_attn
        head_dim = attn.head_dim
        x = block.input_layernorm(hidden)
        cos, sin = rotary
        q = attn.q_proj(x[:, -n_rows:]).view(1, n_rows, -1, head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(1, x.shape[1], -1, head_dim).transpose(1, 2)
        q = rotate(q, cos[:, -n_rows:], sin[:, -n_rows:])
        k = rotate(k, cos, sin)
        return q[0], k[0]

    @torch.inference_mode()
    def score(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, aggregate: Aggregate = "max"
    ) -> torch.Tensor:
        inputs = self.scoring_inputs(visual, frames, prompt)
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set")
        hidden, rotary = self.hidden_at_layer(inputs, layer)
        q, k = self.question_qk(hidden, rotary, layer, len(prompt.suffix_ids))
        start = len(prompt.prefix_ids)
        return question_attention_scores(q, k, slice(start, start + len(frames) * visual.tokens_per_frame), aggregate)

    # -- answer pass --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(
        self, visual: VisualTokens, kept: torch.Tensor, prompt: Prompt, config: GenerationConfig,
        progress: Progress | None = None,
    ) -> Generation:
        from transformers import DynamicCache

        start = time.perf_counter()
        inputs = self.answer_inputs(visual, kept, prompt)
        self._check_fits(inputs.embeds.shape[1] + config.max_new_tokens, "answer (prompt + --max-new-tokens)")
        cache = DynamicCache(config=self.text_model.config)
        hidden = self.text_model(
            inputs_embeds=inputs.embeds, position_ids=inputs.position_ids, past_key_values=cache, use_cache=True
        ).last_hidden_state
        rng = torch.Generator().manual_seed(config.seed)
        token_ids: list[int] = []
        ttft = 0.0
        position = inputs.next_position
        for step in range(config.max_new_tokens):
            logits = self.model.lm_head(hidden[:, -1]).float()[0]
            token = sample(logits, config, rng)
            if step == 0:
                ttft = time.perf_counter() - start
            if token in self.eos_token_ids:
                break
            token_ids.append(token)
            if progress:
                progress(step + 1, config.max_new_tokens)
            if step + 1 == config.max_new_tokens:
                break
            pos = torch.full((1, 1), position, device=self.device, dtype=torch.long)
            if inputs.position_ids.dim() == 3:
                pos = pos.expand(inputs.position_ids.shape[0], 1, 1)
            hidden = self.text_model(
                inputs_embeds=self.embed_ids(torch.tensor([[token]])), position_ids=pos,
                past_key_values=cache, use_cache=True,
            ).last_hidden_state
            position += 1
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        return Generation(text=text, token_ids=token_ids, ttft_s=ttft, prompt_tokens=inputs.embeds.shape[1])
