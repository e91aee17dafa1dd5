"""The question-independent half of a frame set's scoring pass, kept so a follow-up question pays only its own rows.

In the scoring pass the prompt prefix and the set's visual tokens (the "context": every row before the suffix) come
before the question, and attention is causal: their keys and values up to the reference layer L do not depend on the
question. A `SetIndex` is the model's own cache object holding them for layers 0..L (so any layer kind the family's
cache knows is kept as the model keeps it). A question then runs only its suffix rows against that cache through the
same capture as the unindexed pass (`shared.attention_scores`: layers 0..L-1, then layer L's Q/K and the score), which
crops the cache back afterwards: the scores are the full pass's formula over the same keys, equal up to float rounding.

Nothing here is family-specific: the layout (`scoring_inputs`, with its visual columns and extra inputs) and the
capture are the backend's. `IndexedScoring` is mixed into `HFBackend`.
"""

from __future__ import annotations

import copy
import hashlib
import time
from dataclasses import dataclass

import torch
from torch import nn

from ...errors import FlexSelectError
from ...selection import Aggregate
from ..base import Prompt, VisualTokens

BATCH_BYTES = 1 << 30  # at most this much of the sets' caches is copied into one batch of question rows


@dataclass
class SetIndex:
    frames: tuple[int, ...]
    cache: object  # the model's cache (transformers DynamicCache) of the C context rows, layers 0..L
    n_context: int
    columns: torch.Tensor  # [V] context rows of the set's visual tokens, in `visual.frame_tokens(frames)` order
    layer: int
    build_s: float  # seconds the context pass took: what each reuse saves

    @property
    def device(self) -> str:
        tensors = _tensors(self.cache)
        return str(tensors[0].device) if tensors else "cpu"

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors(self.cache))

    def to(self, device: torch.device | str) -> SetIndex:
        return SetIndex(
            self.frames, _cache_to(self.cache, device), self.n_context, self.columns, self.layer, self.build_s
        )


def _tensors(cache) -> list[torch.Tensor]:
    return [v for layer in cache.layers for v in vars(layer).values() if torch.is_tensor(v)]


def _cache_to(cache, device, for_a_question: bool = False):
    """The cache with its tensors on `device`. A question pass appends its rows and crops them off again, which
    leaves DynamicLayer tensors as they were, so those are shared when already on `device`; other layer kinds
    (recurrent states) may be written in place, so a question gets clones of theirs."""
    out = copy.copy(cache)
    out.layers = []
    for layer in cache.layers:
        new = copy.copy(layer)
        clone = for_a_question and type(layer).__name__ != "DynamicLayer"
        for name, value in vars(layer).items():
            if torch.is_tensor(value):
                moved = value.to(device)
                setattr(new, name, moved.clone() if clone and moved is value else moved)
        if getattr(new, "is_initialized", False) and hasattr(new, "device"):
            new.device = torch.device(device)
        out.layers.append(new)
    return out


class _ReachedEnd(Exception):
    """Raised after the reference layer's attention has written its cache, so nothing after it runs."""


def _split(inputs, n_context: int) -> tuple[dict, dict]:
    """The layout's model inputs for the context rows and for the suffix rows. Per-row extras (a [B, N] mask such as
    Qwen3-VL's visual_pos_masks) are cut; the suffix holds no visual token, so it gets no visual extras."""
    n = inputs.embeds.shape[1]
    context = {"inputs_embeds": inputs.embeds[:, :n_context], "position_ids": inputs.position_ids[..., :n_context]}
    for name, value in inputs.extra.items():
        context[name] = value[..., :n_context] if torch.is_tensor(value) and value.shape[-1] == n else value
    suffix = {"inputs_embeds": inputs.embeds[:, n_context:], "position_ids": inputs.position_ids[..., n_context:]}
    return context, suffix


class IndexedScoring:
    """The video index for a transformers backend (see module docstring)."""

    def index_bytes(self, visual: VisualTokens, sets: list[list[int]], prompt: Prompt, layer: int) -> int:
        """Bytes of the sets' index before it is built: K and V of layers 0..L per context row. Every layer counts
        as an attention layer (an over-estimate for fixed-size recurrent layers: never an OOM)."""
        rows: dict[int, int] = {}  # context rows by set length: sets differ by at most one frame
        for frames in sets:
            if len(frames) not in rows:
                rows[len(frames)] = self.scoring_inputs(visual, frames, prompt).embeds.shape[1] - len(prompt.suffix_ids)
        kv_width = self.text_model.layers[0].self_attn.k_proj.out_features
        per_row = kv_width * self.model.dtype.itemsize * 2 * (layer + 1)
        return sum(rows[len(frames)] * per_row for frames in sets)

    @torch.inference_mode()
    def index_set(
        self, visual: VisualTokens, frames: list[int], prompt: Prompt, layer: int, device: str = "cpu"
    ) -> SetIndex:
        from transformers import DynamicCache

        if not 0 <= layer < self.num_layers:
            raise FlexSelectError(
                f"reference layer {layer} is out of range: this model has layers 0..{self.num_layers - 1}"
            )
        t0 = time.perf_counter()
        inputs = self.scoring_inputs(visual, frames, prompt)
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set", prompt)
        n_context = inputs.embeds.shape[1] - len(prompt.suffix_ids)
        context, _ = _split(inputs, n_context)
        cache = DynamicCache(config=self.text_model.config)

        def stop(module: nn.Module, args: tuple, output) -> None:
            raise _ReachedEnd

        handle = self.text_model.layers[layer].self_attn.register_forward_hook(stop)
        try:
            self.text_model(**context, past_key_values=cache, use_cache=True)
        except _ReachedEnd:
            pass
        finally:
            handle.remove()
        for extra in cache.layers[layer + 1 :]:  # never written: the pass stopped at layer L
            if getattr(extra, "is_initialized", False):
                raise FlexSelectError("the indexing pass ran past the reference layer")
        entry = SetIndex(tuple(frames), cache, n_context, inputs.visual_columns, layer, time.perf_counter() - t0)
        return entry if entry.device == str(device) else entry.to(device)

    @torch.inference_mode()
    def score_indexed(
        self, entry: SetIndex, visual: VisualTokens, prompt: Prompt, aggregate: Aggregate = "max"
    ) -> torch.Tensor:
        from .shared import attention_scores

        inputs = self.scoring_inputs(visual, list(entry.frames), prompt)
        n_context = inputs.embeds.shape[1] - len(prompt.suffix_ids)
        if n_context != entry.n_context:
            raise FlexSelectError("this index was made for another prompt or video")
        self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set", prompt)
        _, suffix = _split(inputs, n_context)
        cache = _cache_to(entry.cache, self.device, for_a_question=True)
        scores = attention_scores(
            self.text_model, [entry.layer], len(prompt.suffix_ids), aggregate, past_key_values=cache, **suffix
        )[entry.layer]
        return scores[entry.columns.to(scores.device)]

    @torch.inference_mode()
    def score_indexed_many(
        self, entries: list[SetIndex], visual: VisualTokens, prompt: Prompt, aggregate: Aggregate = "max"
    ) -> list[torch.Tensor]:
        """`score_indexed` of several sets at once: sets with as many context rows run their question rows as one
        batch (row b against set b's cache), so each weight matrix is read once per batch, not once per set. A
        question's few dozen rows are too few to keep a CPU's cores busy: a pass over them costs about reading the
        weights, whatever the number of rows. The sets' caches are copied into one per batch, so a batch holds at
        most BATCH_BYTES of them (and only caches already on the model's device are batched: the rest move there one
        set at a time)."""
        from transformers import DynamicCache

        from .shared import batch_attention_scores

        out: list[torch.Tensor | None] = [None] * len(entries)
        batches: dict[tuple, list[int]] = {}
        for i, entry in enumerate(entries):
            batchable = entry.device == str(self.device) and all(
                type(layer).__name__ == "DynamicLayer" for layer in entry.cache.layers[: entry.layer + 1]
            )
            if batchable:
                batches.setdefault((entry.n_context, entry.layer), []).append(i)
            else:
                out[i] = self.score_indexed(entry, visual, prompt, aggregate)
        for (n_context, layer), members in batches.items():
            per_batch = max(1, BATCH_BYTES // entries[members[0]].nbytes)
            for b0 in range(0, len(members), per_batch):
                group = [entries[i] for i in members[b0 : b0 + per_batch]]
                if len(group) == 1:  # nothing to batch: no copy of the cache
                    out[members[b0]] = self.score_indexed(group[0], visual, prompt, aggregate)
                    continue
                suffixes = []
                for entry in group:
                    inputs = self.scoring_inputs(visual, list(entry.frames), prompt)
                    if inputs.embeds.shape[1] - len(prompt.suffix_ids) != n_context:
                        raise FlexSelectError("this index was made for another prompt or video")
                    self._check_fits(inputs.embeds.shape[1], "scoring pass of a frame set", prompt)
                    suffixes.append(_split(inputs, n_context)[1])
                cache = DynamicCache(config=self.text_model.config)
                for i in range(layer + 1):
                    cache.update(
                        torch.cat([e.cache.layers[i].keys for e in group]),
                        torch.cat([e.cache.layers[i].values for e in group]),
                        i,
                    )
                scores = batch_attention_scores(
                    self.text_model,
                    [layer],
                    len(prompt.suffix_ids),
                    aggregate,
                    past_key_values=cache,
                    inputs_embeds=torch.cat([x["inputs_embeds"] for x in suffixes]),
                    position_ids=torch.cat([x["position_ids"] for x in suffixes], dim=-2),  # batch dim: [3,] B, N
                )[layer]
                for i, entry, row in zip(members[b0 : b0 + per_batch], group, scores):
                    out[i] = row[entry.columns.to(row.device)]
        return out

    # -- on disk --------------------------------------------------------------------------------------------------
    def index_tensors(self, entry: SetIndex) -> dict[str, torch.Tensor]:
        """A set index as named tensors: the visual columns and K/V of layers 0..L."""
        out = {"columns": entry.columns}
        for i, layer in enumerate(entry.cache.layers[: entry.layer + 1]):
            if getattr(layer, "keys", None) is None or not hasattr(layer, "values"):
                raise FlexSelectError(
                    f"layer {i}'s cache ({type(layer).__name__}) is not a key/value cache: this "
                    "model's index can be kept in memory but not written to disk"
                )
            out[f"k{i}"], out[f"v{i}"] = layer.keys, layer.values
        return out

    def index_from_tensors(
        self, frames: tuple[int, ...], layer: int, build_s: float, tensors: dict[str, torch.Tensor]
    ) -> SetIndex:
        from transformers import DynamicCache

        names = ("columns", *(f"{kv}{i}" for i in range(layer + 1) for kv in "kv"))
        missing = [name for name in names if name not in tensors]
        if missing:
            raise FlexSelectError(f"the index file lacks {', '.join(missing[:3])}: it is damaged; rebuild it")
        cache = DynamicCache(config=self.text_model.config)
        dtype = self.model.dtype
        for i in range(layer + 1):
            cache.update(tensors[f"k{i}"].to(dtype), tensors[f"v{i}"].to(dtype), i)
        return SetIndex(frames, cache, tensors["k0"].shape[-2], tensors["columns"].long(), layer, build_s)

    def identity(self) -> dict:
        """What an on-disk index must match: family, shape, dtype and a hash of some of the weights."""
        h = hashlib.sha256()
        tm = self.text_model
        for t in (
            tm.embed_tokens.weight[:64],
            tm.layers[0].self_attn.k_proj.weight,
            tm.layers[-1].self_attn.k_proj.weight,
        ):
            h.update(t.detach().float().cpu().numpy().tobytes())
        return {
            "family": self.family,
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "weights_sha256": h.hexdigest(),
        }
