"""The FlexSelect-Lite ranker: a small Qwen2-style decoder that scores a frame set's visual tokens for a question.

Input: the host Video-LLM's visual embeddings of one frame set, [N, D_host] (exactly `VisualTokens.embeds` rows,
so the host's vision tower runs once and serves both the ranker and the answer pass), and the question's own token
ids in the host's tokenizer, [T]. Output: one score per visual token, [N], computed with the same formula as the
reference layer (`selection.question_attention_scores`: question rows only, softmax over all keys, max over heads
and question rows) at the ranker's scoring layer (its last layer by default).

Design choices (and where they depart from the paper):
- Projector: a 2-layer GELU MLP from the host LM's hidden size (3584 for Qwen2.5-VL-7B) to the ranker's hidden size.
  The paper's rankers take *pre-merger* vision features through a projector of their family (for Qwen2.5-VL its own
  patch merger 1280 -> 896). We take the host's *post-merger* embeddings instead: they are what every backend here
  (transformers, llama.cpp, the C++ runtime) already caches per video, so the ranker needs no access to the vision
  tower's internals and one ONNX interface serves all runtimes. The cost is a projector trained from scratch.
- Question text: the host's tokenizer ids with the ranker's own embedding table sized to the host vocabulary. For
  Qwen2.5-VL the natural ranker init (Qwen2-0.5B) shares the Qwen2 tokenizer, so its table's rows already mean the
  same ids (`from_small_llm` copies the overlap); no second tokenizer ships with the bundle, and the C++ runtime
  passes the ids it already has. Routing text through the host's 7B embedding table plus the projector would need
  that 3584 x 152k table at ranking time, which is what the ranker exists to avoid.
- Sequence: [visual tokens, question tokens], causal, 1-D RoPE positions 0..N+T-1 (the ranker is its own model; the
  host's M-RoPE layout does not apply). The question rows are the last T rows, as the suffix rows are for the host.
- The forward has no Python control flow on tensor values, so it exports to ONNX with dynamic N and T.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from ..errors import FlexSelectError
from ..backends.hf.shared import rotate
from ..selection import Aggregate, question_attention_scores
from .host import HostInfo, check_host, host_tokenizer

if TYPE_CHECKING:
    from transformers import Qwen2Config

    from ..backends.base import Backend, Prompt, VisualTokens

# Qwen2-0.5B's shape (the paper's ranker size for Qwen-family hosts).
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


def qwen2_config(overrides: dict | None = None, vocab_size: int = 151936) -> "Qwen2Config":
    """A Qwen2 config of the default ranker shape, with `overrides` applied (any Qwen2-style field)."""
    from transformers import Qwen2Config

    fields = {**DEFAULT_CONFIG, **(overrides or {}), "vocab_size": vocab_size}
    config = Qwen2Config(**fields)
    config._attn_implementation = "sdpa"  # causal SDPA, no explicit mask: fast on GPU and exportable
    return config


class LiteRanker(nn.Module):
    """Projector + Qwen2 decoder stack scoring visual tokens (see module docstring)."""

    def __init__(self, config: "Qwen2Config", host: HostInfo, scoring_layer: int | None = None,
                 aggregate: Aggregate = "max") -> None:
        from transformers import Qwen2Model

        super().__init__()
        layers = config.num_hidden_layers
        self.scoring_layer = layers - 1 if scoring_layer is None else scoring_layer
        if not 0 <= self.scoring_layer < layers:
            raise FlexSelectError(f"ranker scoring layer {self.scoring_layer} is out of range 0..{layers - 1}")
        if aggregate not in ("max", "mean"):
            raise FlexSelectError(f"aggregate must be 'max' or 'mean', got {aggregate!r}")
        if config.vocab_size != host.vocab_size:
            raise FlexSelectError(f"the ranker's vocabulary ({config.vocab_size}) must be the host's ({host.vocab_size})")
        self.config = config
        self.host = host
        self.aggregate: Aggregate = aggregate
        hidden = config.hidden_size
        self.projector = nn.Sequential(nn.Linear(host.hidden_size, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.llm = Qwen2Model(config)
        self.llm.norm = nn.Identity()  # the final norm is never reached: scoring stops inside the last layer
        self.tokenize: Callable[[str], list[int]] | None = None  # the host's tokenizer, bound by check_compatible

    def forward(self, visual: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        """visual [N, D_host] float, question_ids [T] int64 -> scores [N] float32."""
        weight = self.projector[0].weight
        v = self.projector(visual.to(weight.dtype))
        q = self.llm.embed_tokens(question_ids)
        x = torch.cat([v, q.to(v.dtype)])[None]
        n_rows = question_ids.shape[0]
        positions = torch.arange(x.shape[1], device=x.device)[None]
        cos, sin = self.llm.rotary_emb(x, positions)
        for layer in self.llm.layers[: self.scoring_layer]:
            x = layer(x, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
        block = self.llm.layers[self.scoring_layer]
        attn = block.self_attn
        h = block.input_layernorm(x)
        head_dim = attn.head_dim
        queries = attn.q_proj(h[:, -n_rows:]).view(1, n_rows, -1, head_dim).transpose(1, 2)
        keys = attn.k_proj(h).view(1, h.shape[1], -1, head_dim).transpose(1, 2)
        queries = rotate(queries, cos[:, -n_rows:], sin[:, -n_rows:])
        keys = rotate(keys, cos, sin)
        return question_attention_scores(queries[0], keys[0], slice(0, v.shape[0]), self.aggregate)

    # -- the pipeline's Ranker interface -------------------------------------------------------------------------
    def check_compatible(self, backend: "Backend") -> None:
        check_host(self.host, backend)
        self.tokenize = host_tokenizer(backend)

    @torch.inference_mode()
    def score(self, visual: "VisualTokens", frames: list[int], prompt: "Prompt") -> torch.Tensor:
        """Scores of `visual.frame_tokens(frames)` (in that order) for the prompt's question."""
        device = self.projector[0].weight.device
        ids = question_ids(self.tokenize, prompt.question, self.host.vocab_size)
        tokens = visual.frame_tokens(frames).to(visual.embeds.device)
        return self(visual.embeds[tokens].to(device), ids.to(device)).float().cpu()

    # -- construction --------------------------------------------------------------------------------------------
    @classmethod
    def from_small_llm(cls, path: str | Path, host: HostInfo,
                       scoring_layer: int | None = None, aggregate: Aggregate = "max") -> "LiteRanker":
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
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_theta",
                "head_dim")
        overrides = {k: raw[k] for k in keys if k in raw}
        if "rope_theta" in overrides and "rope_parameters" not in overrides:
            overrides["rope_parameters"] = {"rope_type": "default", "rope_theta": overrides.pop("rope_theta")}
        overrides.pop("rope_theta", None)
        ranker = cls(qwen2_config(overrides, host.vocab_size), host, scoring_layer, aggregate)
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


def question_ids(tokenize: Callable[[str], list[int]] | None, question: str, vocab: int) -> torch.Tensor:
    """The question's own ids in the host's tokenizer, checked against the ranker's embedding table."""
    if tokenize is None:
        raise FlexSelectError("the ranker is not bound to a model yet: load it with load_ranker(path, backend)")
    ids = torch.tensor(tokenize(question), dtype=torch.long)
    if ids.numel() == 0:
        raise FlexSelectError("the ranker needs a non-empty question")
    if int(ids.max()) >= vocab:
        raise FlexSelectError(
            f"the question has token id {int(ids.max())} but the ranker's vocabulary has {vocab} entries: "
            "the ranker was trained for another tokenizer"
        )
    return ids
