"""The one error type the converter raises: every message says what is wrong, where, and what to do."""


class ConvertError(ValueError):
    """A conversion that cannot go ahead (bad source, unusable output folder, no space, bad recipe)."""
