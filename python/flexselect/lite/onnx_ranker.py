"""A Lite ranker run by ONNX Runtime, with the torch ranker's `score` interface (the pipeline takes either).

The ONNX model's I/O is found by type, as the C++ runtime does: one float input of visual tokens ([n, D] or
[1, n, D]), one integer input of question ids ([T] or [1, T]), output 0 = one score per visual token. A
`manifest.json` beside the file (written by `flexselect lite-export`) names the host the ranker was trained for;
without one (a hand-made ONNX ranker) only the visual width can be checked, and a warning says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import FlexSelectError
from .host import HostInfo, check_host, host_tokenizer
from .ranker import question_ids

if TYPE_CHECKING:
    from ..backends.base import Backend, Prompt, VisualTokens

log = logging.getLogger("flexselect")


class OnnxRanker:
    def __init__(self, session, host: HostInfo | None, source: Path) -> None:
        self.session = session
        self.host = host
        self.source = source
        self.tokenize: Callable[[str], list[int]] | None = None
        self.features = self.ids = None
        for io in session.get_inputs():
            if io.type == "tensor(float)" and self.features is None and len(io.shape) in (2, 3):
                self.features = io
            elif io.type in ("tensor(int64)", "tensor(int32)") and self.ids is None and len(io.shape) in (1, 2):
                self.ids = io
            else:
                raise FlexSelectError(f"ranker {source}: unexpected input {io.name!r} {io.type} {io.shape}")
        if self.features is None or self.ids is None:
            raise FlexSelectError(f"ranker {source} needs a float visual-token input and an integer question-id input")
        self.output = session.get_outputs()[0].name

    @classmethod
    def load(cls, path: str | Path) -> "OnnxRanker":
        from .bundle import MANIFEST, read_manifest

        path = Path(path)
        if not path.is_file():
            raise FlexSelectError(f"ranker not found: {path}")
        manifest_file = path.parent / MANIFEST
        host = HostInfo(**read_manifest(manifest_file)["host"]) if manifest_file.is_file() else None
        if host is None:
            log.warning("%s has no %s beside it: only the visual width can be checked against the model",
                        path, MANIFEST)
        return cls(make_session(path), host, path)

    @property
    def feature_dim(self) -> int | None:
        d = self.features.shape[-1]
        return d if isinstance(d, int) else None

    def check_compatible(self, backend: "Backend") -> None:
        if self.host is not None:
            check_host(self.host, backend, f"the ranker {self.source}")
        if self.feature_dim is not None and self.feature_dim != backend.hidden_size:
            raise FlexSelectError(
                f"the ranker {self.source} takes {self.feature_dim}-d visual tokens but the loaded model's are "
                f"{backend.hidden_size}-d: the ranker was made for another model"
            )
        self.tokenize = host_tokenizer(backend)

    def score(self, visual: "VisualTokens", frames: list[int], prompt: "Prompt") -> torch.Tensor:
        vocab = self.host.vocab_size if self.host is not None else np.iinfo(np.int64).max
        ids = question_ids(self.tokenize, prompt.question, vocab).numpy()
        tokens = visual.frame_tokens(frames).to(visual.embeds.device)
        feats = visual.embeds[tokens].float().cpu().numpy()
        return self.run(feats, ids)

    def run(self, visual: np.ndarray, ids: np.ndarray) -> torch.Tensor:
        """Scores [n] from float visual rows [n, D] and question ids [T]."""
        if len(self.features.shape) == 3:
            visual = visual[None]
        ids = ids.astype(np.int64 if self.ids.type == "tensor(int64)" else np.int32)
        if len(self.ids.shape) == 2:
            ids = ids[None]
        out = self.session.run([self.output], {self.features.name: visual, self.ids.name: ids})[0]
        return torch.from_numpy(np.asarray(out, dtype=np.float32).reshape(-1))


def make_session(path: Path):
    """An ONNX Runtime session on CUDA when this onnxruntime has it, else on the CPU (logged once)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise FlexSelectError("ONNX rankers need onnxruntime: pip install 'flexselect[lite]'") from None
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
        log.warning("ONNX ranker: onnxruntime has no CUDAExecutionProvider here (install onnxruntime-gpu for it); "
                 "running on the CPU")
    try:
        return ort.InferenceSession(str(path), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable or invalid models
        raise FlexSelectError(f"cannot load ranker {path}: {str(e)[:300]}") from None
