"""The catalog store: candidate lists and the item catalog in Redis.

- :mod:`~services.catalog.store`: the popular and fresh lists (written by the
  embeddings service with :func:`write_ranked`), the catalog of live items and
  their features (written with :func:`publish_catalog`), and the in-memory
  :class:`CandidateFeed` serving reads them from.
"""

from __future__ import annotations

from services.catalog.store import (
    CandidateFeed,
    CandidateLists,
    ItemCatalog,
    publish_catalog,
    write_ranked,
)

__all__ = [
    "CandidateFeed",
    "CandidateLists",
    "ItemCatalog",
    "publish_catalog",
    "write_ranked",
]
