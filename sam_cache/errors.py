"""The project's errors: one base class that both command-line apps catch, and nothing else.

Every error samcache raises on purpose (bad input, a store that cannot be used, a run that cannot
go on) is a :class:`SamcacheError`, and its message is meant for the user: it names the file or
the option and the problem. The CLIs print such an error as one red line and exit with status 1;
anything else is a bug and keeps its traceback (``--debug`` shows the traceback of ours too).
"""

from __future__ import annotations

__all__ = ["SamcacheError", "ConfigError", "differences"]


class SamcacheError(Exception):
    """Base of every error samcache raises on purpose."""


class ConfigError(SamcacheError, ValueError):
    """An option or config value is of the wrong type, out of range, or not one of its choices."""


def differences(have: dict, want: dict, have_words: str = "store has", want_words: str = "this run asks for",
                keys=None) -> list[str]:
    """One line per field whose values differ between two records: ``"key: <have_words> a, <want_words> b"``.

    Arguments:
      have, want: the two records (a missing key reads as None).
      have_words, want_words: how the message names each side.
      keys: the fields to compare (default: every key of either, sorted).

    Returns:
      The lines, in key order; empty when the records agree.
    """
    keys = sorted(set(have) | set(want)) if keys is None else keys
    return [f"{k}: {have_words} {have.get(k)!r}, {want_words} {want.get(k)!r}" for k in keys
            if have.get(k) != want.get(k)]
