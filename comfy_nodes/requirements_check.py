"""transformers is shared with ComfyUI and other packs, so the pack asks for a range (requirements.txt) rather than
one version, and checks at model load what the scoring capture relies on: it stops the model at the reference layer
and computes the question's attention from that layer's inputs, which needs the decoder layers to take the rotary
`position_embeddings` as a keyword (transformers 5) and the model families of transformers >= MIN_VERSION."""

from __future__ import annotations

from flexselect.errors import FlexSelectError

MIN_VERSION = (5, 23)  # the release the library is tested with (tests pin it); 6.x may change the internals used
MAX_MAJOR = 5
FIX = 'install a 5.x release of 5.23 or newer with ComfyUI\'s Python: python -m pip install "transformers>=5.23,<6"'


def check_transformers() -> None:
    try:
        import transformers
        from transformers import DynamicCache  # noqa: F401 - the answer's KV cache
    except ImportError as e:
        raise FlexSelectError(f"FlexSelect needs transformers ({e}); {FIX}") from None
    version = transformers.__version__
    try:
        major, minor = (int(p) for p in version.split(".")[:2])
    except ValueError:
        raise FlexSelectError(f"cannot read the transformers version {version!r}; {FIX}") from None
    if (major, minor) < MIN_VERSION or major > MAX_MAJOR:
        raise FlexSelectError(
            f"FlexSelect's token scoring needs transformers 5.23 to 5.x; this ComfyUI has {version}: {FIX}"
        )
