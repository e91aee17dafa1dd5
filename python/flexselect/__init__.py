"""FlexSelect: keep only the visual tokens of a long video that the question needs, then answer."""

from .errors import FlexSelectError

__all__ = ["FlexSelectError"]
