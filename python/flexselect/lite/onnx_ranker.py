"""A Lite ranker run by ONNX Runtime, with the torch ranker's `score` interface (the pipeline takes either).

Two kinds of graph (see export/onnx.py):
- `RankerInputs` graphs (the authors' layouts): inputs named as in layouts.INPUTS. They need the `manifest.json`
  beside the file (layout, special token ids, host) and, for InternVL, the `tokenizer/` folder.
- two-input graphs (host_embeds, and the C++ runtime's contract), found by type: one float input of visual tokens
  ([n, D] or [1, n, D]), one integer input of question ids ([T] or [1, T]), output 0 = one score per visual token.
  Without a manifest (a hand-made ranker) only the visual width can be checked, and a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import FlexSelectError
from .host import HostInfo, check_host
from .layouts import INPUTS, RankerInputs, build_inputs
from .ranker import check_inputs, ranker_tokenization

if TYPE_CHECKING:
    from ..backends.base import Backend, Prompt, VisualTokens

log = logging.getLogger("flexselect")


class OnnxRanker:
    def __init__(self, session, manifest: dict | None, source: Path, tokenizer=None) -> None:
        self.session = session
        self.manifest = manifest
        self.host = HostInfo(**manifest["host"]) if manifest else None
        self.layout = manifest.get("layout", "host_embeds") if manifest else "host_embeds"
        self.source = source
        self.tokenizer = tokenizer
        self.retokenize = self.text_ids = None
        names = [io.name for io in session.get_inputs()]
        self.generic = sorted(names) == sorted(INPUTS)
        self.features = self.ids = None
        if self.generic:
            if manifest is None:
                raise FlexSelectError(f"ranker {source} needs its manifest.json beside it (written by lite-export)")
        else:
            self._find_two_inputs(session.get_inputs())
        self.output = session.get_outputs()[0].name

    def _find_two_inputs(self, inputs) -> None:
        for io in inputs:
            if io.type == "tensor(float)" and self.features is None and len(io.shape) in (2, 3):
                self.features = io
            elif io.type in ("tensor(int64)", "tensor(int32)") and self.ids is None and len(io.shape) in (1, 2):
                self.ids = io
            else:
                raise FlexSelectError(f"ranker {self.source}: unexpected input {io.name!r} {io.type} {io.shape}")
        if self.features is None or self.ids is None:
            raise FlexSelectError(
                f"ranker {self.source} needs a float visual-token input and an integer question-id input"
            )

    @classmethod
    def load(cls, path: str | Path) -> OnnxRanker:
        from .bundle import MANIFEST, TOKENIZER, read_manifest

        path = Path(path)
        if not path.is_file():
            raise FlexSelectError(f"ranker not found: {path}")
        manifest_file = path.parent / MANIFEST
        manifest = read_manifest(manifest_file) if manifest_file.is_file() else None
        if manifest is None:
            log.warning(
                "%s has no %s beside it: only the visual width can be checked against the model", path, MANIFEST
            )
        tokenizer = None
        if (path.parent / TOKENIZER).is_dir():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(path.parent / TOKENIZER)
        target = (manifest or {}).get("onnx", {}).get("target", "cpu")
        return cls(make_session(path, target), manifest, path, tokenizer)

    @property
    def reads_vision_features(self) -> bool:
        return self.layout != "host_embeds"

    @property
    def feature_dim(self) -> int | None:
        if self.generic:
            return self.manifest.get("vision_dim")
        d = self.features.shape[-1]
        return d if isinstance(d, int) else None

    def check_compatible(self, backend: Backend) -> None:
        if self.host is not None:
            check_host(self.host, backend, f"the ranker {self.source}")
        if not self.generic and self.feature_dim is not None and self.feature_dim != backend.hidden_size:
            raise FlexSelectError(
                f"the ranker {self.source} takes {self.feature_dim}-d visual tokens but the loaded model's are "
                f"{backend.hidden_size}-d: the ranker was made for another model"
            )
        self.retokenize, self.text_ids = ranker_tokenization(self.tokenizer, backend)

    def score(self, visual: VisualTokens, frames: list[int], prompt: Prompt) -> torch.Tensor:
        if self.text_ids is None:
            raise FlexSelectError("the ranker is not bound to a model yet: load it with load_ranker(path, backend)")
        if self.generic:
            inputs = build_inputs(
                self.layout,
                visual,
                frames,
                prompt,
                self.retokenize,
                self.text_ids,
                self.manifest.get("special_ids") or {},
            )
            check_inputs(inputs, self.host.vocab_size, self.manifest["vision_dim"])
            return self.run_inputs(inputs)
        ids = np.asarray(self.text_ids(prompt.question), dtype=np.int64)
        if ids.size == 0:
            raise FlexSelectError("the ranker needs a non-empty question")
        if self.host is not None and int(ids.max()) >= self.host.vocab_size:
            raise FlexSelectError(
                f"the question has token id {int(ids.max())} but the ranker's vocabulary has "
                f"{self.host.vocab_size} entries: the ranker was trained for another tokenizer"
            )
        tokens = visual.frame_tokens(frames).to(visual.embeds.device)
        return self.run(visual.embeds[tokens].float().cpu().numpy(), ids)

    def run_inputs(self, inputs: RankerInputs) -> torch.Tensor:
        """Scores [S] of a RankerInputs graph."""
        feeds = {name: t.cpu().numpy() for name, t in zip(INPUTS, inputs.as_tuple())}
        float_type = next(io.type for io in self.session.get_inputs() if io.name == "vision_features")
        feeds["vision_features"] = feeds["vision_features"].astype(
            np.float16 if float_type == "tensor(float16)" else np.float32
        )
        out = self.session.run([self.output], feeds)[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1))

    def run(self, visual: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        """Scores [n] of a two-input graph from float visual rows [n, D] and question ids [T]."""
        if len(self.features.shape) == 3:
            visual = visual[None]
        ids = ids.astype(np.int64 if self.ids.type == "tensor(int64)" else np.int32)
        if len(self.ids.shape) == 2:
            ids = ids[None]
        out = self.session.run([self.output], {self.features.name: visual, self.ids.name: ids})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1))


def make_session(path: Path, target: str = "cpu"):
    """An ONNX Runtime session with all graph optimizations, on CUDA when this onnxruntime has it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlexSelectError("ONNX rankers need onnxruntime: pip install 'flexselect[lite]'") from None
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        if target == "cuda":
            log.warning(
                "ONNX ranker %s was exported for CUDA, but onnxruntime has no CUDAExecutionProvider here "
                "(install onnxruntime-gpu): running its float16 graph on the CPU is slow; re-export it "
                "with --target cpu",
                path,
            )
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise FlexSelectError(f"cannot load ranker {path}: {str(e)[:300]}") from None
