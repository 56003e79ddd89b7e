"""The reloadable faiss index: build, snapshot, publish, and serve with hot swaps.

- :mod:`~services.index.builder`: :class:`IndexSpec` and :func:`build_index`
  (flat, HNSW, IVF-PQ; positional ids).
- :mod:`~services.index.snapshot`: :class:`SnapshotStore` writes verified,
  atomically visible snapshots; :func:`publish` moves the Redis pointer to one.
- :mod:`~services.index.reloadable`: :class:`ReloadableIndex` follows the pointer
  and swaps snapshots in without blocking or failing queries.
"""

from __future__ import annotations

from services.index.builder import IndexSpec, build_index, resolve_spec
from services.index.reloadable import IndexNotReady, LoadedIndex, ReloadableIndex
from services.index.snapshot import (
    Manifest,
    Pointer,
    SnapshotError,
    SnapshotStore,
    publish,
    read_pointer,
    read_snapshot,
)

__all__ = [
    "IndexNotReady",
    "IndexSpec",
    "LoadedIndex",
    "Manifest",
    "Pointer",
    "ReloadableIndex",
    "SnapshotError",
    "SnapshotStore",
    "build_index",
    "publish",
    "read_pointer",
    "read_snapshot",
    "resolve_spec",
]
