"""The FlexSelect-Lite ranker: its own projector over the host's vision features + a small Qwen2-shaped decoder.

The authors' architecture (see layouts.py for the per-family projector and input sequence): the host's vision
tower runs once; the ranker projects the tower's pre-merger features with its own projector, places them in the
host's prompt (embedded with its own token table), runs its decoder, and at its last layer scores the visual
tokens with the reference layer's formula (`selection.question_attention_scores`: the question rows' softmax over
all keys, max over heads and rows). Qwen-family layouts use M-RoPE positions like the host's scoring pass, the
others 1-D positions.

Of the scoring layer only the attention's Q/K are needed. They are taken through transformers' attention
interface, the host's own scoring mechanism (`backends.hf.shared.attention_scores`): the layer's own attention code
projects and rotates them (RoPE, M-RoPE with its sections, YaRN scaling: whatever the config says), the capture
scores them and stops the pass, so that layer's attention output and MLP never run. An exported graph cannot stop by
raising, so `graph_forward` (what export/onnx.py traces) captures Q/K through the same interface without raising
(`attention_capture`) and leaves the layer's remainder unused: the exporter drops it as dead nodes, so the graph
computes exactly what scoring needs. tests/test_lite*.py check that both give the same scores.

`graph_forward` has no Python control flow on tensor values, so it exports to ONNX with every size dynamic.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FlexSelectError
from ..selection import Aggregate, question_attention_scores
from .host import HostInfo, check_host, host_tokenizer
from .layouts import FAMILY_LAYOUT, LAYOUTS, RankerInputs, build_inputs, make_projector

if TYPE_CHECKING:
    from transformers import PretrainedConfig

    from ..backends.base import Backend, Prompt, VisualTokens

ATTENTION = "flexselect_lite"  # the export's attention-interface name: sdpa, and a Q/K capture at the scoring layer

# Qwen2-0.5B's shape (the authors' ranker for Qwen2.5-VL-7B and LLaVA-Video-7B; InternVL2.5-1B's LM too).
DEFAULT_CONFIG = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
    "tie_word_embeddings": True,
}
MROPE_SECTION_PER_128 = (16, 24, 24)  # Qwen2.5-VL's (t, h, w) split of a 128-wide head; scaled for other widths


def attention_capture(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    query_blocks: int = 1,
    **kwargs,
):
    """Attention-interface function: SDPA, except on a module that holds a `flexselect_capture` dict, where the
    post-RoPE query [1, H, L, d] and key [1, H_kv, L, d] are stored instead and a zero output is returned.
    `query_blocks` > 1 (the CPU export, see `blocked_causal_attention`) runs the causal SDPA in query blocks."""
    capture = getattr(module, "flexselect_capture", None)
    if capture is not None:
        capture["query"], capture["key"] = query, key
        return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], query.shape[3]), None
    if query_blocks > 1 and attention_mask is None:
        return blocked_causal_attention(query, key, value, query_blocks, kwargs.get("scaling")), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def blocked_causal_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, blocks: int, scale: float | None = None
) -> torch.Tensor:
    """Causal attention [B, L, H, d] of query [B, H, L, d] (key/value [B, H_kv, L, d]) as `blocks` query blocks,
    each against only the keys up to its own last row.

    ONNX Runtime's CPU kernels (the opset-23 `Attention` and the contrib `GroupQueryAttention` alike, 1.23 to 1.32)
    form the whole L x L product even when causal, where torch's flash kernel skips the part above the diagonal. In
    blocks the graph skips most of it itself: (blocks + 1) / (2 blocks) of the products remain. Every L >= blocks
    gives non-empty blocks (a frame set is far longer); the block bounds stay symbolic in an export.
    """
    n = query.shape[2]
    out = []
    for b in range(blocks):
        start, stop = b * n // blocks, (b + 1) * n // blocks
        rows = torch.arange(start, stop, device=query.device)[:, None]
        mask = torch.arange(stop, device=query.device)[None] <= rows
        q, k, v = query[:, :, start:stop], key[:, :, :stop], value[:, :, :stop]
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous()


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION, attention_capture)


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's section split scaled to `head_dim` (64 -> [8, 12, 12], the authors' ranker)."""
    section = [s * head_dim // 128 for s in MROPE_SECTION_PER_128]
    if sum(section) * 2 != head_dim:
        raise FlexSelectError(f"cannot split a {head_dim}-wide head into M-RoPE sections; use a multiple of 16")
    return section


def decoder_config(layout: str, overrides: dict | None, vocab_size: int) -> PretrainedConfig:
    """The decoder's transformers config: Qwen2 (1-D RoPE) or Qwen2.5-VL's text model (M-RoPE) for Qwen layouts."""
    fields = {**DEFAULT_CONFIG, **(overrides or {}), "vocab_size": vocab_size}
    if layout == "qwen2_5_vl":
        from transformers import Qwen2_5_VLTextConfig

        rope = dict(fields["rope_parameters"])
        head_dim = fields.get("head_dim") or fields["hidden_size"] // fields["num_attention_heads"]
        rope.setdefault("mrope_section", mrope_section(head_dim))
        config = Qwen2_5_VLTextConfig(**{**fields, "rope_parameters": rope})
    else:
        from transformers import Qwen2Config

        config = Qwen2Config(**fields)
    config._attn_implementation = ATTENTION
    return config


class LiteRanker(nn.Module):
    """Projector + decoder scoring a frame set's visual tokens (see module docstring)."""

    def __init__(
        self,
        config: PretrainedConfig,
        host: HostInfo,
        layout: str,
        vision_dim: int,
        scoring_layer: int | None = None,
        aggregate: Aggregate = "max",
        special_ids: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise FlexSelectError(f"unknown ranker layout {layout!r}; known: {', '.join(LAYOUTS)}")
        layers = config.num_hidden_layers
        self.scoring_layer = layers - 1 if scoring_layer is None else scoring_layer
        if not 0 <= self.scoring_layer < layers:
            raise FlexSelectError(f"ranker scoring layer {self.scoring_layer} is out of range 0..{layers - 1}")
        if aggregate not in ("max", "mean"):
            raise FlexSelectError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        if layout == "internvl" and not {"<img>", "</img>"} <= set(special_ids or {}):
            raise FlexSelectError("an InternVL ranker needs the ids of its <img> and </img> tokens")
        _register_attention()
        self.config, self.host, self.layout, self.vision_dim = config, host, layout, vision_dim
        self.aggregate: Aggregate = aggregate
        self.special_ids = dict(special_ids or {})
        self.projector = make_projector(layout, vision_dim, config.hidden_size)
        self.llm = self._decoder(config)
        self.llm.norm = nn.Identity()  # never reached: scoring stops inside the scoring layer
        del self.llm.layers[self.scoring_layer + 1 :]  # layers after the scoring one never run
        # Bound by check_compatible: host ids -> ranker ids, and text -> ranker ids.
        self.retokenize: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.text_ids: Callable[[str], list[int]] | None = None
        self.tokenizer = None  # the ranker's own tokenizer, when it differs from the host's (InternVL)

    @staticmethod
    def _decoder(config: PretrainedConfig) -> nn.Module:
        if config.model_type == "qwen2_5_vl_text":
            from transformers import Qwen2_5_VLTextModel

            return Qwen2_5_VLTextModel(config)
        from transformers import Qwen2Model

        return Qwen2Model(config)

    @property
    def reads_vision_features(self) -> bool:
        """Whether the video must be encoded with the vision tower's features (`encode_with_vision_features`)."""
        return self.layout != "host_embeds"

    def embed(
        self,
        input_ids: torch.Tensor,
        vision_features: torch.Tensor,
        visual_rows: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The input sequence [1, L, hidden] (token embeddings, projected visual tokens at visual_rows) and the
        decoder's position ids ([3, 1, L] for M-RoPE, [1, L] otherwise)."""
        weight = self.llm.embed_tokens.weight
        visual = self.projector(vision_features.to(weight.dtype))
        x = self.llm.embed_tokens(input_ids).index_put((visual_rows,), visual.to(weight.dtype))[None]
        return x, position_ids[:, None, :] if position_ids.shape[0] == 3 else position_ids

    def forward(
        self,
        input_ids: torch.Tensor,
        vision_features: torch.Tensor,
        visual_rows: torch.Tensor,
        position_ids: torch.Tensor,
        score_columns: torch.Tensor,
        question_rows: torch.Tensor,
    ) -> torch.Tensor:
        """RankerInputs (see layouts.py) -> scores [S] float32 of the score columns (question_rows: the last T)."""
        from ..backends.hf.shared import attention_scores

        x, positions = self.embed(input_ids, vision_features, visual_rows, position_ids)
        scores = attention_scores(
            self.llm,
            [self.scoring_layer],
            question_rows.shape[0],
            self.aggregate,
            inputs_embeds=x,
            position_ids=positions,
        )
        return scores[self.scoring_layer][score_columns]

    def graph_forward(
        self,
        input_ids: torch.Tensor,
        vision_features: torch.Tensor,
        visual_rows: torch.Tensor,
        position_ids: torch.Tensor,
        score_columns: torch.Tensor,
        question_rows: torch.Tensor,
        query_blocks: int = 1,
    ) -> torch.Tensor:
        """`forward` as an exportable graph: the same scores, without stopping the pass by an exception.
        `query_blocks`: causal attention in that many query blocks (`blocked_causal_attention`; the CPU export)."""
        x, positions = self.embed(input_ids, vision_features, visual_rows, position_ids)
        rotary = self.llm.rotary_emb(x, positions)
        for layer in self.llm.layers[: self.scoring_layer]:
            x = layer(
                x, attention_mask=None, position_ids=positions, position_embeddings=rotary, query_blocks=query_blocks
            )
        block = self.llm.layers[self.scoring_layer]
        capture: dict[str, torch.Tensor] = {}
        block.self_attn.flexselect_capture = capture
        try:
            block.self_attn(block.input_layernorm(x), attention_mask=None, position_embeddings=rotary)
        finally:
            del block.self_attn.flexselect_capture
        queries = capture["query"][0].index_select(1, question_rows)
        return question_attention_scores(queries, capture["key"][0], score_columns, self.aggregate)

    # -- the pipeline's Ranker interface -------------------------------------------------------------------------
    def check_compatible(self, backend: Backend) -> None:
        check_host(self.host, backend)
        self.retokenize, self.text_ids = ranker_tokenization(self.tokenizer, backend)

    def inputs(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> RankerInputs:
        """The set as this ranker reads it, checked against its vocabulary and feature width."""
        if self.retokenize is None:
            raise FlexSelectError("the ranker is not bound to a model yet: load it with load_ranker(path, backend)")
        inputs = build_inputs(self.layout, visual, frames, prompt, self.retokenize, self.text_ids, self.special_ids)
        check_inputs(inputs, self.config.vocab_size, self.vision_dim)
        return inputs

    @torch.inference_mode()
    def score(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> torch.Tensor:
        """Scores of `visual.frame_tokens(frames)` (in that order) for the prompt's question."""
        inputs = self.inputs(visual, frames, prompt).to(self.llm.embed_tokens.weight.device)
        return self(*inputs.as_tuple()).float().cpu()

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def for_host(
        cls,
        host: HostInfo,
        vision_dim: int,
        overrides: dict | None = None,
        layout: str | None = None,
        scoring_layer: int | None = None,
        aggregate: Aggregate = "max",
        special_ids: dict[str, int] | None = None,
    ) -> LiteRanker:
        """A randomly initialised ranker of the host family's layout (the default) and the given decoder shape."""
        layout = layout or default_layout(host.family)
        return cls(
            decoder_config(layout, overrides, host.vocab_size),
            host,
            layout,
            vision_dim,
            scoring_layer,
            aggregate,
            special_ids,
        )

    @classmethod
    def from_small_llm(
        cls,
        path: str | Path,
        host: HostInfo,
        vision_dim: int,
        layout: str | None = None,
        scoring_layer: int | None = None,
        aggregate: Aggregate = "max",
        special_ids: dict[str, int] | None = None,
    ) -> LiteRanker:
        """Initialise the decoder from a local Qwen2-style checkpoint folder (config.json + *.safetensors).

        The embedding table is resized to the host vocabulary; rows of ids both vocabularies have are copied (the
        Qwen2 family shares one tokenizer), the others keep their random init. The projector starts random.
        """
        from safetensors.torch import load_file

        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FlexSelectError(f"{folder} has no config.json: pass the folder of a small Qwen2-style checkpoint")
        raw = json.loads(config_file.read_text())
        if raw.get("model_type") != "qwen2":
            raise FlexSelectError(f"{folder}: model type {raw.get('model_type')!r} is not a Qwen2-style decoder")
        ranker = cls.for_host(host, vision_dim, decoder_fields(raw), layout, scoring_layer, aggregate, special_ids)
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FlexSelectError(f"{folder} has no *.safetensors weights")
        state = {}
        for f in files:
            for name, tensor in load_file(f).items():
                state[name.removeprefix("model.")] = tensor
        own = ranker.llm.state_dict()
        table = state.pop("embed_tokens.weight", None)
        missing = [k for k in own if k != "embed_tokens.weight" and k not in state]
        if missing:
            raise FlexSelectError(f"{folder} lacks decoder weights the ranker needs, e.g. {missing[:3]}")
        with torch.no_grad():
            for name, tensor in own.items():
                if name in state:
                    tensor.copy_(state[name])
            if table is not None:
                rows = min(table.shape[0], host.vocab_size)
                own["embed_tokens.weight"][:rows].copy_(table[:rows])
        return ranker


DECODER_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_position_embeddings",
    "rms_norm_eps",
    "head_dim",
    "rope_parameters",
)


def decoder_fields(raw: dict) -> dict:
    """The decoder-shape fields of a Qwen2-style config.json; old-style rope_theta / rope_scaling become
    rope_parameters (the checkpoint's rope, e.g. the authors' YaRN, is kept as written)."""
    fields = {k: raw[k] for k in DECODER_FIELDS if k in raw}
    if "rope_parameters" not in fields:
        rope = dict(raw.get("rope_scaling") or {})
        rope.pop("type", None) if "rope_type" in rope else rope.update(rope_type=rope.pop("type", "default"))
        rope["rope_type"] = "default" if rope["rope_type"] == "mrope" else rope["rope_type"]
        rope["rope_theta"] = raw.get("rope_theta", DEFAULT_CONFIG["rope_parameters"]["rope_theta"])
        fields["rope_parameters"] = rope
    return fields


def default_layout(family: str) -> str:
    """The authors' layout for families they released or that share one; others train on the host's embeddings."""
    return FAMILY_LAYOUT.get(family, "host_embeds")


def ranker_tokenization(tokenizer, backend: Backend):
    """(host ids -> ranker ids, text -> ranker ids): the host's own ids, or re-tokenized through text when the
    ranker has its own tokenizer (the authors' InternVL ranker: InternLM2 ids -> Qwen2 ids)."""
    host_text_ids = host_tokenizer(backend)
    if tokenizer is None:
        return (lambda ids: ids.long()), host_text_ids
    host_tok = getattr(backend, "tokenizer", None)
    if host_tok is None:
        raise FlexSelectError(
            "this ranker re-tokenizes the prompt with its own tokenizer, which needs a transformers backend"
        )

    def text_ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    def retokenize(ids: torch.Tensor) -> torch.Tensor:
        text = host_tok.decode(ids.tolist(), spaces_between_special_tokens=False)
        return torch.tensor(text_ids(text), dtype=torch.long)

    return retokenize, text_ids


def check_inputs(inputs: RankerInputs, vocab: int, vision_dim: int) -> None:
    if inputs.input_ids.numel() and int(inputs.input_ids.max()) >= vocab:
        raise FlexSelectError(
            f"the prompt has token id {int(inputs.input_ids.max())} but the ranker's vocabulary has {vocab} entries: "
            "the ranker was trained for another tokenizer"
        )
    if inputs.vision_features.shape[-1] != vision_dim:
        raise FlexSelectError(
            f"the ranker reads {vision_dim}-wide vision features but this model's are "
            f"{inputs.vision_features.shape[-1]}-wide: the ranker was made for another model"
        )
