"""The one exception type users see: every bad input ends here with a message that says what to do."""

import math
from numbers import Integral, Real


class FlexSelectError(Exception):
    """A problem with the user's input or environment, explained in plain words (no torch traceback needed)."""


def check_positive(what: str, value, whole: bool = False, allow_zero: bool = False) -> None:
    """Refuse a value that is not a finite number > 0 (>= 0 with `allow_zero`; a whole number with `whole`); None
    passes (it means "the default"). NaN and infinity fail every comparison downstream, so they are refused here."""
    if value is None:
        return
    number = not isinstance(value, bool) and isinstance(value, Integral if whole else Real)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "whole number" if whole else "number"
        bound = ">= 0" if allow_zero else "> 0"
        raise FlexSelectError(f"{what} must be a {kind} {bound}, got {value!r}")
