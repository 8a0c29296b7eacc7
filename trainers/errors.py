"""The one base class for errors in what the user gave or set up (a spec, a config, data, a folder).

Both command lines print such an error as one line and exit 2, without a traceback; a trainer
reports it as a failure that a retry cannot fix. Anything else is a bug or a crash.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input or set-up; the message says what is wrong and what to do."""


def one_line(err: Exception) -> str:
    """The error's message on one line, as both command lines print it."""
    return " ".join(str(err).split())


def first_line(err: Exception, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), at most limit characters:
    the cause quoted in parentheses inside one of this project's messages."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0][:limit]
