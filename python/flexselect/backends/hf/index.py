"""The question-independent half of a frame set's scoring pass, kept so a follow-up question pays only its own rows.

In the scoring pass the prompt prefix and the set's visual tokens (the "context": every row before the suffix) come
before the question, and attention is causal: their hidden states, keys and values up to the reference layer L do not
depend on the question. A `SetIndex` holds what the pass computed for them: the model's own cache object after layers
0..L-1 (so any layer kind the family's cache knows is kept as the model keeps it) and the layer-L keys, RoPE applied.
A question then runs only its suffix rows through layers 0..L-1 against a copy of that cache, forms Q and K at layer
L, and is scored with `selection.question_attention_scores` over [cached keys + its own keys]: the full pass's
formula over the same keys, so the scores equal the unindexed pass's up to float rounding.

Nothing here is family-specific: the layout (`scoring_inputs`, `scoring_columns`) and the reference layer's Q/K are
the backend's. `IndexedScoring` is mixed into `HFBackend`.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import FlexSelectError
from ...selection import Aggregate, question_attention_scores
from ..base import Prompt, VisualTokens


@dataclass
class SetIndex:
    frames: tuple[int, ...]
    cache: object  # the model's cache (transformers DynamicCache) after layers 0..L-1 of the context rows
    keys: torch.Tensor  # [H_kv, C, d] layer-L keys of the C context rows, RoPE applied
    columns: torch.Tensor  # [V] context rows of the set's visual tokens, in `visual.frame_tokens(frames)` order
    layer: int
    build_s: float  # seconds the context pass took: what each reuse saves

    @property
    def device(self) -> torch.device:
        return self.keys.device

    @property
    def nbytes(self) -> int:
        tensors = [*_tensors(self.cache), self.keys]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str) -> "SetIndex":
        return SetIndex(self.frames, _cache_to(self.cache, device), self.keys.to(device), self.columns, self.layer,
                        self.build_s)


def _tensors(cache) -> list[torch.Tensor]:
    return [v for layer in cache.layers for v in vars(layer).values() if torch.is_tensor(v)]


def _cache_to(cache, device):
    """A copy of the cache whose tensors are on `device`. A question pass must not change the stored cache:
    DynamicLayer's update concatenates into new tensors, so its tensors are shared; other layer kinds (recurrent
    states) may be written in place, so theirs are cloned."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        in_place = type(layer).__name__ != "DynamicLayer"
        for name, value in vars(layer).items():
            if torch.is_tensor(value):
                moved = value.to(device)
                setattr(new, name, moved.clone() if in_place and moved is value else moved)
        if getattr(new, "is_initialized", False) and hasattr(new, "device"):
            new.device = torch.device(device)
        out.layers.append(new)
    return out


class _ReachedLayer(Exception):
    """Raised from a pre-hook on the reference layer so nothing at or after it runs."""


class IndexedScoring:
    """The video index for a transformers backend (see module docstring)."""

    def context_rows(self, visual: VisualTokens, frames: list[int], prompt: Prompt):
        """The set's layout, the number C of rows before the suffix, and the visual tokens' rows among them."""
        inputs = self.scoring_inputs(visual, frames, prompt)
        n_context = inputs.embeds.shape[1] - len(prompt.suffix_ids)
        if hasattr(self, "scoring_columns"):
            columns = self.scoring_columns(visual, frames, prompt)
        else:
            start = len(prompt.prefix_ids)
            columns = torch.arange(start, start + len(frames) * visual.tokens_per_frame)
        return inputs, n_context, columns

    def _layer_qk(self, embeds: torch.Tensor, position_ids: torch.Tensor, layer: int, n_rows: int, cache):
        """Queries of the last `n_rows` of these rows [H, n_rows, d] and keys of all of them [H_kv, N, d] at
        `layer`, after what `cache` holds; the cache gets layers 0..layer-1 of these rows."""
        captured: dict[str, object] = {}

        def stop_here(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured["hidden"] = args[0] if args else kwargs["hidden_states"]
            captured["rotary"] = kwargs["position_embeddings"]
            raise _ReachedLayer

        handle = self.text_model.layers[layer].register_forward_pre_hook(stop_here, with_kwargs=True)
        try:
            self.text_model(inputs_embeds=embeds, position_ids=position_ids, past_key_values=cache, use_cache=True)
        except _ReachedLayer:
            pass
        finally:
            handle.remove()
        q, k = self.question_qk(captured["hidden"], captured["rotary"], layer, max(n_rows, 1))
        return q[:, q.shape[1] - n_rows :], k

    def index_bytes(self, visual: VisualTokens, sets: list[list[int]], prompt: Prompt, layer: int) -> int:
        """Bytes of the sets' index before it is built: K and V of layers 0..L-1 plus the layer-L keys per context
        row. Every layer counts as an attention layer (an over-estimate for fixed-size recurrent layers)."""
        rows: dict[int, int] = {}  # context rows by set length: sets differ by at most one frame
        for frames in sets:
            if len(frames) not in rows:
                rows[len(frames)] = self.context_rows(visual, frames, prompt)[1]
        kv_width = self.text_model.layers[0].self_attn.k_proj.out_features
        per_row = kv_width * self.model.dtype.itemsize * (2 * layer + 1)
        return sum(rows[len(frames)] * per_row for frames in sets)

    @torch.inference_mode()
    def index_set(self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int,
                  device: str = "cpu") -> SetIndex:
        from transformers import DynamicCache

        t0 = time.perf_counter()
        inputs, n_context, columns = self.context_rows(visual, frames, prompt)
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set")
        cache = DynamicCache(config=self.text_model.config)
        _, keys = self._layer_qk(inputs.embeds[:, :n_context], inputs.position_ids[..., :n_context], layer, 0, cache)
        entry = SetIndex(tuple(frames), cache, keys, columns, layer, time.perf_counter() - t0)
        return entry if str(entry.device) == str(device) else entry.to(device)

    @torch.inference_mode()
    def score_indexed(self, entry: SetIndex, visual: VisualTokens, prompt: Prompt,
                      aggregate: Aggregate = "max") -> torch.Tensor:
        inputs, n_context, _ = self.context_rows(visual, list(entry.frames), prompt)
        if n_context != entry.keys.shape[1]:
            raise FlexSelectError("this index was made for another prompt or video")
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set")
        device = self.device
        q, k = self._layer_qk(inputs.embeds[:, n_context:], inputs.position_ids[..., n_context:], entry.layer,
                              len(prompt.suffix_ids), _cache_to(entry.cache, device))
        keys = torch.cat([entry.keys.to(device), k], dim=1)
        return question_attention_scores(q, keys, slice(0, n_context), aggregate)[entry.columns.to(device)]

    # -- on disk --------------------------------------------------------------------------------------------------
    def index_tensors(self, entry: SetIndex) -> dict[str, torch.Tensor]:
        """A set index as named tensors: the layer-L keys, the visual columns, and K/V per layer."""
        out = {"keys": entry.keys, "columns": entry.columns}
        for i, layer in enumerate(entry.cache.layers[: entry.layer]):
            if getattr(layer, "keys", None) is None or not hasattr(layer, "values"):
                raise FlexSelectError(f"layer {i}'s cache ({type(layer).__name__}) is not a key/value cache: this "
                                      "model's index can be kept in memory but not written to disk")
            out[f"k{i}"], out[f"v{i}"] = layer.keys, layer.values
        return out

    def index_from_tensors(self, frames: tuple[int, ...], layer: int, build_s: float,
                           tensors: dict[str, torch.Tensor]) -> SetIndex:
        from transformers import DynamicCache

        names = ("keys", "columns", *(f"{kv}{i}" for i in range(layer) for kv in "kv"))
        missing = [name for name in names if name not in tensors]
        if missing:
            raise FlexSelectError(f"the index file lacks {', '.join(missing[:3])}: it is damaged; rebuild it")
        cache = DynamicCache(config=self.text_model.config)
        dtype = self.model.dtype
        for i in range(layer):
            cache.update(tensors[f"k{i}"].to(dtype), tensors[f"v{i}"].to(dtype), i)
        return SetIndex(frames, cache, tensors["keys"].to(dtype), tensors["columns"].long(), layer, build_s)

    def identity(self) -> dict:
        """What an on-disk index must match: family, shape, dtype and a hash of some of the weights."""
        h = hashlib.sha256()
        tm = self.text_model
        for t in (tm.embed_tokens.weight[:64], tm.layers[0].self_attn.k_proj.weight,
                  tm.layers[-1].self_attn.k_proj.weight):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return {"family": self.family, "layers": self.num_layers, "hidden": self.hidden_size,
                "dtype": str(self.model.dtype).removeprefix("torch."), "weights_sha256": h.hexdigest()}
