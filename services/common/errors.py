"""The root of streamrec's own exceptions: every domain error derives from it."""

from __future__ import annotations


class StreamrecError(Exception):
    """Something streamrec refuses or cannot do, with a message that says why."""
