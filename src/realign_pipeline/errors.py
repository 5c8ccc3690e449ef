"""``UsageError``: a user's mistake (a bad argument, a missing file, a wrong option value), not a bug.

The ``realign`` command prints it as one line, ``realign <command>: error: <message>``, and exits with
status 2; anything else that goes wrong is a bug and keeps its traceback. The message names the argument
or file and says what would be right.
"""

from __future__ import annotations


class UsageError(ValueError):
    """A mistake in what the user asked for, found before (or instead of) any expensive work.

    A ``ValueError``, so library callers that catch bad arguments keep working.
    """
