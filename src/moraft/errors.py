"""The errors moraft raises about what its caller asked for.

`UserError` marks a problem with the request itself (a missing path, a bad option value, an adapter that does not fit
its base): the ``moraft`` command prints it as one line and exits with status 2. Anything else that escapes a command
is a bug in moraft or a library below it, and crashes with its traceback, so it is never mistaken for the user's
fault. Both are ``ValueError`` subclasses, as PEFT's own configuration errors are, so code written against PEFT that
catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(ValueError):
    """A problem with what the user asked for: reported by the CLI as one line, exit status 2."""


class MissingPathError(UserError, FileNotFoundError):
    """A path the user gave does not exist (also a ``FileNotFoundError``, for code that catches that)."""


def first_line(err: BaseException) -> str:
    """The first line of ``err``'s message (its type's name when it has none): a library's error as one line of ours."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


__all__ = ["MissingPathError", "UserError", "first_line"]
