"""Per-user click sequences and windowed user features, kept in Redis from ``clicks``.

The service (:mod:`services.sequences.service`) appends each user's clicks
exactly once (:mod:`services.sequences.store`); serving, DRN and the embeddings
service read them through :class:`Sequences` (:mod:`services.sequences.reader`).
"""

from __future__ import annotations

from services.sequences.reader import (
    DEFAULT_WINDOWS_S,
    SequenceEntry,
    Sequences,
    UserFeatures,
    window_features,
)
from services.sequences.store import AppendStats, SequenceStore

__all__ = [
    "DEFAULT_WINDOWS_S",
    "AppendStats",
    "SequenceEntry",
    "SequenceStore",
    "Sequences",
    "UserFeatures",
    "window_features",
]
