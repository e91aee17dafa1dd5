"""What stays loaded between runs: models (by load arguments), ranker-scored pipelines, and encoded clips.

A transformers model is handed to ComfyUI's model management (a `ModelPatcher`), so ComfyUI accounts for its
memory, can offload it when another model needs the GPU, and its "unload models" frees it like any core model;
before each use it is loaded back with `load_models_gpu`. A GGUF model lives in llama.cpp's own memory, which
ComfyUI cannot see: Free Models releases it.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from typing import Any

from flexselect.errors import FlexSelectError

from . import comfy_compat as compat
from .links import ClipValue, ModelHandle, RankerHandle
from .requirements_check import check_transformers
from .wording import for_nodes

log = logging.getLogger("flexselect.comfy")


class ModelCache:
    def __init__(self, max_visual: int = 4) -> None:
        self._lock = threading.RLock()
        self._pipes: dict[tuple, Any] = {}
        self._patchers: dict[tuple, Any] = {}  # model key -> ComfyUI ModelPatcher (transformers models only)
        self._ranked: dict[tuple, Any] = {}  # (model key, ranker path) -> FlexSelect sharing the model's backend
        self._visual: OrderedDict[tuple, tuple] = OrderedDict()  # (id(clip), model key) -> (clip, VisualTokens)
        self.max_visual = max_visual

    def get(self, handle: ModelHandle):
        """The loaded pipeline for `handle`, on its device (ComfyUI may have offloaded it since the last use)."""
        with self._lock:
            pipe = self._pipes.get(handle.key)
            if pipe is None:
                pipe = self._load(handle)
                self._pipes[handle.key] = pipe
                self._patchers[handle.key] = compat.model_patcher(
                    getattr(pipe.backend, "model", None), getattr(pipe.backend, "device", None)
                )
            compat.load_models([self._patchers[handle.key]])
            return pipe

    @staticmethod
    def _load(handle: ModelHandle):
        from flexselect.pipeline import FlexSelect

        if dict(handle.load_args).get("model"):
            check_transformers()
        log.info("FlexSelect: loading %s", handle.label)
        try:
            return FlexSelect.load(**dict(handle.load_args))
        except FlexSelectError as e:
            raise for_nodes(e) from None
        except (OSError, ValueError) as e:  # transformers' messages for a broken folder
            raise FlexSelectError(f"could not load the model {handle.label}: {e}") from None

    def with_ranker(self, handle: ModelHandle, ranker: RankerHandle):
        with self._lock:
            pipe = self.get(handle)
            key = (handle.key, ranker.path)
            ranked = self._ranked.get(key)
            if ranked is None:
                try:  # same backend, ranker-scored: the cached model is neither copied nor changed
                    ranked = pipe.with_ranker(ranker.path)
                except FlexSelectError as e:
                    raise for_nodes(e) from None
                self._ranked[key] = ranked
            return ranked

    def visual(self, clip: ClipValue, handle: ModelHandle):
        with self._lock:
            hit = self._visual.get((id(clip), handle.key))
            if hit is not None and hit[0] is clip:
                self._visual.move_to_end((id(clip), handle.key))
                return hit[1]
            return None

    def put_visual(self, clip: ClipValue, handle: ModelHandle, visual) -> None:
        with self._lock:
            self._visual[(id(clip), handle.key)] = (clip, visual)  # holds the clip: its id cannot be reused
            while len(self._visual) > self.max_visual:
                self._visual.popitem(last=False)

    def free(self) -> int:
        """Drop every model and encoded clip; returns how many models were loaded."""
        with self._lock:
            n = len(self._pipes) + len(self._ranked)
            for pipe in [*self._pipes.values(), *self._ranked.values()]:
                pipe.clear_index()  # video indexes hold per-set KV caches: free them with the models
            patchers = list(self._patchers.values())
            self._pipes.clear()
            self._patchers.clear()
            self._ranked.clear()
            self._visual.clear()
        compat.unload_models(patchers)
        del patchers
        gc.collect()
        compat.soft_empty_cache()
        return n

    def loaded(self) -> list[tuple]:
        return list(self._pipes)

    def patcher(self, handle: ModelHandle):
        return self._patchers.get(handle.key)


models = ModelCache()
