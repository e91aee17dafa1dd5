"""What a Lite ranker needs to know about its host Video-LLM: family, LM hidden size, vocabulary, tokenizer.

A ranker only works with the host it was trained for: it reads that host's visual embeddings (hidden size) and
that host's question token ids (vocabulary). These helpers read the three facts from any backend (transformers or
llama.cpp) and compare them with what a ranker bundle records.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable

from ..errors import FlexSelectError

if TYPE_CHECKING:
    from ..backends.base import Backend


@dataclass(frozen=True)
class HostInfo:
    family: str  # key into defaults.json, e.g. "qwen2_5_vl"
    hidden_size: int  # width of VisualTokens.embeds
    vocab_size: int  # size of the ranker's question embedding table

    def to_dict(self) -> dict:
        return asdict(self)


def host_vocab_size(backend: "Backend") -> int | None:
    """The host's vocabulary size: a backend's `vocab_size`, or its transformers input embedding table."""
    size = getattr(backend, "vocab_size", None)
    if isinstance(size, int):
        return size
    text_model = getattr(backend, "text_model", None)
    return text_model.get_input_embeddings().num_embeddings if text_model is not None else None


def host_info(backend: "Backend") -> HostInfo:
    vocab = host_vocab_size(backend)
    if vocab is None:
        raise FlexSelectError(f"cannot tell the vocabulary size of the {backend.family} backend")
    return HostInfo(backend.family, backend.hidden_size, vocab)


def host_tokenizer(backend: "Backend") -> Callable[[str], list[int]]:
    """The question's own ids as the host tokenizes them (no special tokens added), as the C++ runtime passes them."""
    if hasattr(backend, "tokenize"):  # llama.cpp backend
        return backend.tokenize
    tokenizer = backend.tokenizer  # transformers backends
    return lambda text: list(tokenizer(text, add_special_tokens=False).input_ids)


def check_host(expected: HostInfo, backend: "Backend", what: str = "the ranker") -> None:
    """FlexSelectError naming both values if the backend is not the host the ranker was trained for."""
    actual = {"family": backend.family, "hidden_size": backend.hidden_size, "vocab_size": host_vocab_size(backend)}
    for key, have in actual.items():
        want = getattr(expected, key)
        if have is not None and have != want:
            raise FlexSelectError(
                f"{what} was trained for a {expected.family} model with {key.replace('_', ' ')} {want}, but the "
                f"loaded model ({backend.family}) has {key.replace('_', ' ')} {have}: use a ranker trained for "
                "this model (flexselect lite-teacher + lite-train)"
            )
