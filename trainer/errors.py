"""Stage 2's errors; all are :class:`~sam_cache.errors.SamcacheError`, which the CLIs catch."""

from __future__ import annotations

from sam_cache.errors import ConfigError, SamcacheError

__all__ = ["TrainError", "BackboneError", "ConfigError"]


class TrainError(SamcacheError):
    """Training, evaluation or prediction cannot go on: bad data, a missing split, a NaN loss."""


class BackboneError(SamcacheError):
    """A backbone cannot be built, loaded or wired as asked."""
