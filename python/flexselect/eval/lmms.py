"""FlexSelect as an lmms-eval model, for the benchmarks' official task definitions and scoring:

    lmms-eval --model flexselect --tasks videomme \
        --model_args model=/models/Qwen2.5-VL-7B-Instruct,budget=7040,max_frames=1024

lmms-eval finds it through the `lmms_eval.models` entry point in pyproject.toml; it is not a dependency of
flexselect (install it beside). `model_args`: model or gguf + mmproj, ranker (then Lite selects), device, dtype,
frames or fps, max_frames, max_side, budget, layer, set_frames, selector (reference / lite / none: the baseline),
max_new_tokens, n_ctx; a misspelt one is refused, not ignored. Only generation tasks are supported: FlexSelect
answers, it does not score given continuations.

Data parallel: `accelerate launch --num_processes N -m lmms_eval ...` (on one machine or several) starts N copies;
each takes its rank and the world size from accelerate, loads the model on its own GPU (`cuda:<local rank>`) and
answers its own shard of the requests (lmms-eval shards them by rank); lmms-eval gathers the answers. A GGUF model
uses the GPUs CUDA_VISIBLE_DEVICES shows each process.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

from lmms_eval.api.model import lmms
from tqdm import tqdm

from ..errors import FlexSelectError
from .datasets import VIDEO_EXTS

log = logging.getLogger("flexselect")


def manifest():
    """The entry point's payload: lmms-eval's registration record for `--model flexselect`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="flexselect", simple_class_path=f"{__name__}.FlexSelectLMM")


def _number(value, kind):
    return None if value in (None, "", "None", "none") else kind(value)


class FlexSelectLMM(lmms):
    def __init__(
        self,
        model=None,
        gguf=None,
        mmproj=None,
        ranker=None,
        device="auto",
        dtype="auto",
        frames=None,
        fps=None,
        max_frames=None,
        max_side=None,
        budget=None,
        layer=None,
        set_frames=None,
        selector=None,
        max_new_tokens=16,
        n_ctx=32768,
        batch_size=1,
        max_batch_size=None,
        **unknown,
    ) -> None:
        from accelerate import Accelerator  # lmms-eval's own dependency: what its data-parallel launch runs on

        from ..pipeline import FlexSelect, Sampling, SelectOptions  # here: lmms-eval imports this module for every run

        if unknown:  # lmms-eval passes every model_args key through: a typo must not silently use a default
            known = [p for p in inspect.signature(FlexSelectLMM.__init__).parameters if p not in ("self", "unknown")]
            raise FlexSelectError(
                f"unknown FlexSelect model_args: {', '.join(sorted(unknown))}; known: {', '.join(known)}"
            )
        if _number(batch_size, int) not in (None, 1):
            log.warning("FlexSelect answers one request at a time; batch_size=%s is ignored", batch_size)
        super().__init__()
        # on CPU, accelerate joins the launched processes only when told to run on CPU (else each is alone)
        self.accelerator = Accelerator(cpu=str(device).startswith("cpu"))
        self._rank, self._world_size = self.accelerator.process_index, self.accelerator.num_processes
        self._device = self.accelerator.device if device == "auto" else _device_of(device, self.accelerator)
        self.pipe = FlexSelect.load(
            model, gguf=gguf, mmproj=mmproj, ranker=ranker, device=str(self._device), dtype=dtype, n_ctx=int(n_ctx)
        )
        self.sampling = Sampling(
            _number(frames, int),
            _number(fps, float),
            max_frames=_number(max_frames, int),
            max_side=_number(max_side, int),
        )
        self.options = SelectOptions(
            _number(budget, int), _number(layer, int), _number(set_frames, int), selector=selector or None
        )
        self.max_new_tokens = int(max_new_tokens)

    @property
    def device(self):
        return self._device

    def generate_until(self, requests) -> list[str]:
        from ..backends.base import GenerationConfig

        replies = []
        for request in tqdm(requests, desc="FlexSelect answering", disable=self.rank != 0):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            video = self._video(doc_to_visual(self.task_dict[task][split][doc_id]), task, doc_id)
            generation = GenerationConfig(
                max_new_tokens=int(gen_kwargs.get("max_new_tokens", self.max_new_tokens)),
                temperature=float(gen_kwargs.get("temperature", 0.0) or 0.0),
                top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
            )
            text = self.pipe.answer(video, context, self.sampling, self.options, generation).text
            until = gen_kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop:
                    text = text.split(stop)[0]
            replies.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return replies

    @staticmethod
    def _video(visuals, task: str, doc_id) -> Path:
        candidates = visuals if isinstance(visuals, (list, tuple)) else [visuals]
        videos = [Path(v) for v in candidates if isinstance(v, (str, Path)) and str(v).lower().endswith(VIDEO_EXTS)]
        if len(videos) != 1:
            raise FlexSelectError(f"{task} document {doc_id}: FlexSelect answers about one video file, got {visuals!r}")
        return videos[0]

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "FlexSelect generates answers: use generation tasks (videomme, mlvu_dev, longvideobench_val_v, lvbench)"
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("FlexSelect answers single-round questions")


def _device_of(device: str, accelerator):
    """An explicit `device`; a bare "cuda" means this process's own GPU when several processes run."""
    import torch

    if device == "cuda" and accelerator.num_processes > 1:
        return torch.device("cuda", accelerator.local_process_index)
    return torch.device(device)
