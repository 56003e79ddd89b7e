"""The Redis parameter store: versioned multi-part publish, atomic reads, hot reloading.

Publishers (the bandits and DRN services) call :meth:`ParamStore.publish` with
the encoded blobs of the parts they own; readers call :meth:`ParamStore.latest`
or keep a :class:`ParamWatcher` that swaps new versions in as they appear
(docs/decisions.md §7 and §8).
"""

from __future__ import annotations

from services.paramstore.store import (
    Combiner,
    ModelNotFound,
    ParamMetrics,
    ParamStore,
    ParamStoreSettings,
    Pin,
    StalePublish,
    VersionInfo,
    combine_parts,
    param_metrics,
)
from services.paramstore.watcher import ParamWatcher, build_default

__all__ = [
    "Combiner",
    "ModelNotFound",
    "ParamMetrics",
    "ParamStore",
    "ParamStoreSettings",
    "ParamWatcher",
    "Pin",
    "StalePublish",
    "VersionInfo",
    "build_default",
    "combine_parts",
    "param_metrics",
]
