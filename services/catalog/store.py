"""The catalog store: popular items, fresh items and the item catalog in Redis.

The embeddings service writes the popular and fresh lists, the catalog's owner
(the simulator, in the demo) writes the catalog, and serving reads all three.
Serving's candidates for one request are the faiss neighbours of the user's
vector plus the lists kept here, which also carry cold users (no history, no
known item vector) so that a new user gets popular and fresh items, not an error.

Redis layout (keys from :class:`~contracts.keys.KeySpace` ``catalog_*``; all share
the hash tag ``{items}`` so each write below is one MULTI/EXEC in one Redis
Cluster slot):

- ``popular``: sorted set, item → decayed click count; replaced whole by the
  embeddings service at every publish (:func:`write_ranked`);
- ``fresh``: sorted set, item → time it was first clicked; same writer;
- ``features``: hash, item → its feature vector as little-endian float32 bytes:
  the catalog of live items, written by whoever owns the catalog (in the demo,
  the simulator, which knows its world's items) with :func:`publish_catalog`;
- ``features:version``: incremented by every catalog write, so readers reload
  the catalog only when it changed.

:class:`CandidateFeed` keeps an immutable :class:`CandidateLists` in memory,
refreshed by a background thread; a request reads one reference and never waits
on Redis for these lists. When Redis cannot be reached the last good lists keep
serving (``streamrec_serving_candidate_feed_stale`` is 1).

>>> catalog = ItemCatalog(["i1", "i2"], np.array([[1.0, 0.0], [0.0, 1.0]]))
>>> features, known = catalog.features(["i2", "nope"])
>>> features.tolist(), known.tolist()
([[0.0, 1.0], [0.0, 0.0]], [True, False])
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.cluster import RedisCluster

from contracts.keys import KeySpace
from services.common.clients import REDIS_ERRORS

log = logging.getLogger(__name__)


def write_ranked(client: redis.Redis | RedisCluster, key: str, scores: Mapping[str, float]) -> None:
    """Replace the sorted set ``key`` by ``scores`` in one transaction (readers see old or new)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(key)
    if scores:
        pipe.zadd(key, {item: float(score) for item, score in scores.items()})
    pipe.execute()


def publish_catalog(
    client: redis.Redis | RedisCluster,
    keys: KeySpace,
    item_ids: Sequence[str],
    features: np.ndarray,
) -> int:
    """Replace the catalog by ``item_ids`` with their feature rows; returns the catalog version."""
    matrix = np.asarray(features, dtype="<f4")
    if matrix.ndim != 2 or len(matrix) != len(item_ids):
        raise ValueError(f"features must have shape ({len(item_ids)}, f), got {np.shape(features)}")
    if not np.isfinite(matrix).all():
        raise ValueError("features contain NaN or infinity")
    pipe = client.pipeline(transaction=True)
    pipe.delete(keys.catalog_features())
    if len(item_ids):
        pipe.hset(
            keys.catalog_features(),
            mapping={item: row.tobytes() for item, row in zip(item_ids, matrix, strict=True)},
        )
    pipe.incr(keys.catalog_version())
    return int(pipe.execute()[-1])


class ItemCatalog:
    """Live items and their feature vectors; immutable once built."""

    def __init__(self, item_ids: Sequence[str], features: np.ndarray) -> None:
        matrix = np.asarray(features, dtype=np.float64)
        if matrix.ndim != 2 or len(matrix) != len(item_ids):
            raise ValueError(
                f"features must have shape ({len(item_ids)}, f), got {np.shape(features)}"
            )
        self.item_ids: tuple[str, ...] = tuple(item_ids)
        self.matrix = matrix
        self.positions = {item: row for row, item in enumerate(self.item_ids)}
        if len(self.positions) != len(self.item_ids):
            raise ValueError("catalog item ids are not unique")

    @classmethod
    def empty(cls, dim: int) -> ItemCatalog:
        return cls([], np.zeros((0, dim)))

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.item_ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self.positions

    def features(self, item_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Feature rows of ``item_ids`` (``float64 (n, dim)``) and a mask of the known ones."""
        rows = np.fromiter(
            (self.positions.get(item, -1) for item in item_ids), dtype=np.int64, count=len(item_ids)
        )
        known = rows >= 0
        out = np.zeros((len(rows), self.dim))
        out[known] = self.matrix[rows[known]]
        return out, known

    def sample(self, n: int, rng: np.random.Generator, exclude: Collection[str] = ()) -> list[str]:
        """Up to ``n`` distinct catalog items not in ``exclude``, uniformly at random.

        Draws about ``n`` indices rather than permuting the catalog, so the cost
        does not grow with the catalog.
        """
        available = len(self.item_ids) - sum(1 for item in exclude if item in self.positions)
        n = min(n, available)
        if n <= 0:
            return []
        if 4 * n >= available:
            pool = [item for item in self.item_ids if item not in exclude]
            return [pool[i] for i in rng.choice(len(pool), size=n, replace=False)]
        chosen: dict[str, None] = {}
        while len(chosen) < n:
            for row in rng.integers(len(self.item_ids), size=2 * (n - len(chosen))):
                item = self.item_ids[row]
                if item not in exclude:
                    chosen[item] = None
        return list(chosen)[:n]


@dataclass(frozen=True, slots=True)
class CandidateLists:
    """What a request reads besides the index: one immutable reference."""

    popular: tuple[str, ...]
    fresh: tuple[str, ...]
    catalog: ItemCatalog
    catalog_version: int = 0


class CandidateFeed:
    """Keeps :class:`CandidateLists` from Redis in memory, refreshed in the background.

    Args:
        client: Redis connection (``decode_responses=False``).
        keys: where the lists live.
        item_dim: width of catalog feature vectors; a catalog of another width is
            refused (the last good one keeps serving).
        popular_n, fresh_n: how many of each list a refresh keeps.
        refresh_s: seconds between refreshes.
        registry: Prometheus registry for the feed's series.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        keys: KeySpace,
        *,
        item_dim: int,
        popular_n: int = 20,
        fresh_n: int = 10,
        refresh_s: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not (math.isfinite(refresh_s) and refresh_s > 0):
            raise ValueError(f"refresh_s must be a positive number of seconds, got {refresh_s!r}")
        for name, value in (("popular_n", popular_n), ("fresh_n", fresh_n)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self._redis = client
        self.keys = keys
        self.item_dim = item_dim
        self.popular_n = popular_n
        self.fresh_n = fresh_n
        self.refresh_s = float(refresh_s)
        self._lists = CandidateLists((), (), ItemCatalog.empty(item_dim))
        self._failing = False
        self._refused_version: int | None = None
        self._stop = threading.Event()
        registry = registry if registry is not None else CollectorRegistry()
        self._items = Gauge(
            "streamrec_serving_catalog_items",
            "Items in the catalog serving holds.",
            registry=registry,
        )
        self._stale = Gauge(
            "streamrec_serving_candidate_feed_stale",
            "1 while the last refresh of popular/fresh/catalog failed (last good lists serve).",
            registry=registry,
        )
        self._errors = Counter(
            "streamrec_serving_candidate_feed_errors_total",
            "Failed refreshes of popular/fresh/catalog, by reason (redis, catalog).",
            ["reason"],
            registry=registry,
        )
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name="candidate-feed", daemon=True)
        self._thread.start()

    def current(self) -> CandidateLists:
        """The lists now serving (one reference read)."""
        return self._lists

    def refresh(self) -> bool:
        """Read the lists once; True if they were read (the catalog reloads only on change)."""
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.zrevrange(self.keys.catalog_popular(), 0, self.popular_n - 1)
            pipe.zrevrange(self.keys.catalog_fresh(), 0, self.fresh_n - 1)
            pipe.get(self.keys.catalog_version())
            popular, fresh, version = pipe.execute()
            version = int(version or 0)
            catalog, loaded = self._lists.catalog, self._lists.catalog_version
            refused = None
            if version not in (loaded, self._refused_version):
                try:
                    catalog, loaded = self._load_catalog(), version
                except ValueError as exc:
                    refused = exc
                    self._refused_version = version
        except REDIS_ERRORS as exc:
            return self._failed("redis", exc)
        decode = bytes.decode
        self._lists = CandidateLists(
            popular=tuple(decode(item) for item in popular[: self.popular_n]),
            fresh=tuple(decode(item) for item in fresh[: self.fresh_n]),
            catalog=catalog,
            catalog_version=loaded,
        )
        self._items.set(len(catalog))
        if refused is not None:
            return self._failed("catalog", refused)
        if version == self._refused_version:
            return True  # still the refused catalog: stale stays set, nothing new to log
        if self._failing:
            log.info("candidate feed recovered")
        self._failing = False
        self._stale.set(0)
        return True

    def _load_catalog(self) -> ItemCatalog:
        raw = cast(dict[bytes, bytes], self._redis.hgetall(self.keys.catalog_features()))
        ids = [item.decode() for item in raw]
        matrix = np.zeros((len(ids), self.item_dim))
        for row, blob in enumerate(raw.values()):
            vector = np.frombuffer(blob, dtype="<f4")
            if len(vector) != self.item_dim:
                raise ValueError(
                    f"catalog item {ids[row]!r} has {len(vector)} features,"
                    f" expected {self.item_dim}"
                )
            matrix[row] = vector
        return ItemCatalog(ids, matrix)

    def _failed(self, reason: str, error: Exception) -> bool:
        self._errors.labels(reason).inc()
        self._stale.set(1)
        if not self._failing:
            log.warning(
                "candidate feed refresh failed (%s: %s); last good lists serve", reason, error
            )
        self._failing = True
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - logged; the background loop must outlive any one failure
                log.exception("candidate feed refresh crashed; retrying")
