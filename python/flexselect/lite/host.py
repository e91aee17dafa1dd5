"""What a Lite ranker needs to know about its host Video-LLM, and the check that a model is that host.

A ranker reads one of two things of its host (`reads`):
- "vision_features" (the authors' layouts, the default): the vision tower's pre-merger features, so the ranker is
  tied to the host family and its tower's feature width (`hidden_size` holds that width); the prompt ids only need
  to fit the ranker's own vocabulary, checked per prompt.
- "embeds" (the host_embeds layout, for runtimes that only expose post-merger embeddings, e.g. llama.cpp): the
  host LM's embeddings and its question ids, so family, LM hidden size and vocabulary must all match.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import FlexSelectError

if TYPE_CHECKING:
    from ..backends.base import Backend

READS = ("embeds", "vision_features")


@dataclass(frozen=True)
class HostInfo:
    family: str  # key into defaults.json, e.g. "qwen2_5_vl"
    hidden_size: int  # width of what the ranker reads: VisualTokens.embeds, or the vision features
    vocab_size: int  # size of the ranker's token table
    reads: str = "embeds"

    def to_dict(self) -> dict:
        return asdict(self)


def host_vocab_size(backend: Backend) -> int | None:
    """The host's vocabulary size: a backend's `vocab_size`, or its transformers input embedding table."""
    size = getattr(backend, "vocab_size", None)
    if isinstance(size, int):
        return size
    text_model = getattr(backend, "text_model", None)
    return text_model.get_input_embeddings().num_embeddings if text_model is not None else None


def vision_feature_dim(backend: Backend) -> int | None:
    """Width of the backend's pre-merger vision features, or None when it cannot give them (llama.cpp)."""
    return getattr(backend, "vision_feature_dim", None) if hasattr(backend, "encode_with_vision_features") else None


def host_info(backend: Backend, reads: str = "embeds") -> HostInfo:
    vocab = host_vocab_size(backend)
    if vocab is None:
        raise FlexSelectError(f"cannot tell the vocabulary size of the {backend.family} backend")
    if reads == "vision_features":
        width = vision_feature_dim(backend)
        if width is None:
            raise FlexSelectError(f"the {backend.family} backend cannot give its vision tower's features")
        return HostInfo(backend.family, width, vocab, reads)
    return HostInfo(backend.family, backend.hidden_size, vocab, reads)


def host_tokenizer(backend: Backend) -> Callable[[str], list[int]]:
    """The question's own ids as the host tokenizes them (no special tokens added), as the C++ runtime passes them."""
    if hasattr(backend, "tokenize"):  # llama.cpp backend
        return backend.tokenize
    tokenizer = backend.tokenizer  # transformers backends
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)


def check_host(expected: HostInfo, backend: Backend, what: str = "the ranker") -> None:
    """FlexSelectError naming both values if the backend is not the host the ranker was made for."""
    if expected.reads == "vision_features":
        width = vision_feature_dim(backend)
        actual = {"family": backend.family, "hidden_size": width}
        if width is None:
            raise FlexSelectError(
                f"{what} reads the vision tower's pre-merger features, which the {backend.family} backend here "
                "cannot give (llama.cpp exposes only the merged embeddings): use the transformers checkpoint, or a "
                "ranker of the host_embeds layout (flexselect lite-train --layout host_embeds)"
            )
        labels = {"family": "family", "hidden_size": "vision feature width"}
    else:
        actual = {"family": backend.family, "hidden_size": backend.hidden_size, "vocab_size": host_vocab_size(backend)}
        labels = {"family": "family", "hidden_size": "hidden size", "vocab_size": "vocab size"}
    for key, have in actual.items():
        want = getattr(expected, key)
        if have is not None and have != want:
            raise FlexSelectError(
                f"{what} was made for a {expected.family} model with {labels[key]} {want}, but the loaded model "
                f"({backend.family}) has {labels[key]} {have}: use a ranker made for this model (a released one "
                "through flexselect lite-import, or flexselect lite-teacher + lite-train)"
            )
