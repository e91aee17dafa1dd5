"""The one exception type users see: every bad input ends here with a message that says what to do."""


class FlexSelectError(Exception):
    """A problem with the user's input or environment, explained in plain words (no torch traceback needed)."""
