"""Errors about the user's data, reported by train.py as one line before any work starts."""


class DataError(ValueError):
    """The data path, a file in it, or a dataset format is unusable."""
