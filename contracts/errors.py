"""The root of streamrec's own exceptions.

Every exception class in contracts/ and services/ derives from :class:`StreamrecError`.

An error that also means a builtin condition keeps that builtin as a second
base (``class EventError(StreamrecError, ValueError)``), so callers catching the
builtin still catch it; ``except StreamrecError`` catches everything streamrec
raises on purpose. ``tests/unit/test_errors.py`` checks the rule.
"""

from __future__ import annotations


class StreamrecError(Exception):
    """Something streamrec refuses or cannot do, with a message that says why."""
