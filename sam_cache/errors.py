"""The project's errors: one base class that both command-line apps catch, and nothing else.

Every error samcache raises on purpose (bad input, a store that cannot be used, a run that cannot
go on) is a :class:`SamcacheError`, and its message is meant for the user: it names the file or
the option and the problem. The CLIs print such an error as one red line and exit with status 1;
anything else is a bug and keeps its traceback (``--debug`` shows the traceback of ours too).
"""

from __future__ import annotations

__all__ = ["SamcacheError", "ConfigError"]


class SamcacheError(Exception):
    """Base of every error samcache raises on purpose."""


class ConfigError(SamcacheError, ValueError):
    """An option or config value is of the wrong type, out of range, or not one of its choices."""
