"""``streamrec run embeddings``: clicks in, item embeddings out as published faiss snapshots.

Training sequences come from per-user click windows kept in this process's
memory (the last ``window`` clicks of at most ``max_users`` users, least
recently active dropped first), not from the sequences service's Redis state:
clicks are keyed by user, so a partition carries every click of its users and
the window is exact without a Redis round trip per batch, and the embeddings
do not lag behind (or fail with) another service. The windows are not
checkpointed: after a restart a user's first new clicks pair with nothing
older, a small loss of training pairs and no error.

Streaming skip-gram: when a click on ``i`` arrives, the pairs it adds are
``(j, i)`` for each of the user's previous ``window`` clicks ``j`` (fed to
:class:`~services.embeddings.Item2Vec` as two-item sequences, which trains both
directions). Every pair of nearby clicks is thus trained exactly once, when its
later click arrives; re-feeding whole windows would train old pairs again with
every click. A user's first click still registers its item (it gets a vector).

The service also keeps each item's popularity (click count decayed with
half-life ``popularity_half_life_s`` of event time) and first-click time, and
publishes the top ``popular_n`` and the ``fresh_n`` most recently first-seen
items (within ``fresh_window_s``) for serving's candidate pools
(:mod:`services.catalog`).

Checkpoints and publishing: the model is global (one learner process), so the
processor sets ``checkpoint_all_owned`` and stores everything (Item2Vec state,
popularity, first-seen times) in the lowest owned partition's checkpoint, the
others holding an empty state; the stored model always matches the stored
offsets of every partition. A checkpoint happens every
``publish_interval_s`` (default 30 s), or as soon as ``publish_every`` clicks
arrived since the last one. Its cost is the encoded state written to Redis: two
``(items, dim)`` float32 tables, counts and last sightings, and the popularity
and first-click records, each keyed by the item id: ~320 bytes an item at
``dim`` 32 with 10-byte ids, 32 MB at 100k items (about 0.1-0.3 s).

Item ids come from producers, so the vocabulary is capped at ``max_items``
(default 200k: ~65 MB with short ids, 270 MB if every id took the 512 bytes of
128 four-byte characters, below the 512 MB Redis takes in one value): past it
the least recently clicked items are forgotten (down to 15/16 of it), by the
model and by the popularity and first-click records together
(``streamrec_embeddings_evicted_items_total``), so the popular and fresh lists
only ever name items the published index holds. A user's earlier click on a
forgotten item pairs with nothing: only a new click brings an item back. Beyond
a few hundred thousand items the state belongs in the snapshot store rather
than in a Redis checkpoint.
After every checkpoint that changed the model, a background thread builds the
index over the normalised vectors (``index_kind``: flat by default, hnsw or
ivfpq), writes it to the snapshot store (``STREAMREC_SNAPSHOT_DIR``), moves the
Redis pointer (``KeySpace.index_current(index_name)``) and replaces the popular
and fresh lists. The snapshot therefore never reflects clicks that a crash could
roll back, and a slow build (HNSW over millions of items) never stalls the
consumer loop; a build still running when the next is due makes the next one
wait and only the newest waiting one is built. A publish that fails (the
snapshot disk full, Redis unreachable) is counted
(``streamrec_embeddings_publish_failures_total``), leaves the pointer on the
last good snapshot and is tried again every ``publish_interval_s`` (or replaced
by a newer one) until one succeeds, new clicks or not: the checkpoint goes on
meanwhile, so the published index lags the model but loses nothing.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import redis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.cluster import RedisCluster

from contracts.events import Click, decode_click
from contracts.keys import KeySpace
from contracts.params import decode_params, encode_params
from services.catalog import write_ranked
from services.common import (
    Checkpoint,
    Context,
    Processor,
    Record,
    Rejection,
)
from services.common.service import ServiceSpec, Wiring, run_service
from services.embeddings.item2vec import Item2Vec
from services.index import IndexSpec, SnapshotStore, build_index, publish, read_pointer

log = logging.getLogger(__name__)

SERVICE = "embeddings"
_ID_ARRAYS = ("item_id_bytes", "item_id_offsets")


class EmbeddingsSettings(BaseSettings):
    """Embeddings service settings (``STREAMREC_EMBEDDINGS_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_EMBEDDINGS_", env_file=".env", extra="ignore", populate_by_name=True
    )

    group: str = SERVICE
    """``STREAMREC_EMBEDDINGS_GROUP``: consumer group and checkpoint namespace."""
    snapshot_dir: Path = Field(
        Path(".streamrec/snapshots"),
        validation_alias=AliasChoices(
            "STREAMREC_EMBEDDINGS_SNAPSHOT_DIR", "STREAMREC_SNAPSHOT_DIR"
        ),
    )
    """``STREAMREC_SNAPSHOT_DIR`` (or ``STREAMREC_EMBEDDINGS_SNAPSHOT_DIR``): the snapshot store."""
    keep_snapshots: int = Field(3, ge=1)
    """``STREAMREC_EMBEDDINGS_KEEP_SNAPSHOTS``: newest snapshots kept on disk."""
    index_name: str = "items"
    """``STREAMREC_EMBEDDINGS_INDEX_NAME``: the pointer is ``KeySpace.index_current(name)``."""
    index_kind: Literal["flat", "hnsw", "ivfpq"] = "flat"
    """``STREAMREC_EMBEDDINGS_INDEX_KIND``: flat (exact; up to ~100k items), hnsw or ivfpq."""
    publish_interval_s: float = Field(30.0, gt=0)
    """``STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S``: checkpoint + publish at least this often."""
    publish_every: int = Field(50_000, ge=1)
    """``STREAMREC_EMBEDDINGS_PUBLISH_EVERY``: ... or after this many clicks."""
    dim: int = Field(32, ge=1)
    """``STREAMREC_EMBEDDINGS_DIM``: embedding dimension."""
    window: int = Field(5, ge=1)
    """``STREAMREC_EMBEDDINGS_WINDOW``: a click pairs with the user's previous this-many clicks."""
    negatives: int = Field(5, ge=0)
    """``STREAMREC_EMBEDDINGS_NEGATIVES``: negative samples per pair."""
    lr: float = Field(0.025, gt=0)
    """``STREAMREC_EMBEDDINGS_LR``: SGD step size."""
    max_items: int = Field(200_000, ge=1)
    """``STREAMREC_EMBEDDINGS_MAX_ITEMS``: items kept (least recently clicked forgotten first)."""
    max_users: int = Field(200_000, ge=1)
    """``STREAMREC_EMBEDDINGS_MAX_USERS``: click windows kept in memory (least recent dropped)."""
    popularity_half_life_s: float = Field(3600.0, gt=0)
    """``STREAMREC_EMBEDDINGS_POPULARITY_HALF_LIFE_S``: event-time half-life of click counts."""
    popular_n: int = Field(200, ge=0)
    """``STREAMREC_EMBEDDINGS_POPULAR_N``: items published in the popular list."""
    fresh_window_s: float = Field(3600.0, gt=0)
    """``STREAMREC_EMBEDDINGS_FRESH_WINDOW_S``: an item is fresh this long after its first click."""
    fresh_n: int = Field(100, ge=0)
    """``STREAMREC_EMBEDDINGS_FRESH_N``: items published in the fresh list."""
    seed: int = 0
    """``STREAMREC_EMBEDDINGS_SEED``."""


class EmbeddingsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.items = Gauge(
            "streamrec_embeddings_items", "Items with an embedding.", registry=registry
        )
        self.pairs = Counter(
            "streamrec_embeddings_pairs_total",
            "Skip-gram (center, context) click pairs trained.",
            registry=registry,
        )
        self.loss = Gauge(
            "streamrec_embeddings_loss",
            "Mean SGNS loss per pair of the last trained batch.",
            registry=registry,
        )
        self.version = Gauge(
            "streamrec_embeddings_snapshot_version",
            "Version of the last index snapshot published.",
            registry=registry,
        )
        self.publish_seconds = Histogram(
            "streamrec_embeddings_publish_seconds",
            "Time to build, write and publish one index snapshot (with the item lists).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=registry,
        )
        self.publish_failures = Counter(
            "streamrec_embeddings_publish_failures_total",
            "Snapshot builds or publishes that failed (a full snapshot disk, Redis away); "
            "retried every publish interval, or with the next checkpoint, until one succeeds.",
            registry=registry,
        )
        self.evicted = Counter(
            "streamrec_embeddings_evicted_items_total",
            "Items forgotten (least recently clicked first) to keep max_items.",
            registry=registry,
        )


@dataclass(frozen=True, slots=True)
class PublishJob:
    """What one publish needs, copied off the model on the consumer thread."""

    item_ids: list[str]
    vectors: np.ndarray
    popular: dict[str, float]
    fresh: dict[str, float]


class ItemStats:
    """Decayed click counts and first-click times per item, in event time.

    Counts use forward decay: a click at time ``t`` adds ``2 ** ((t - base) / half_life)``
    and reading at ``now`` multiplies by ``2 ** (-(now - base) / half_life)``, so an
    update touches one item. The base moves forward (rescaling every score) before
    the weights could overflow.

    >>> stats = ItemStats(half_life_s=10.0)
    >>> stats.add("a", 100.0); stats.add("a", 110.0); stats.add("b", 110.0)
    >>> {k: round(v, 3) for k, v in stats.popular(2, now=110.0).items()}
    {'a': 1.5, 'b': 1.0}
    """

    #: Rebase when weights reach 2**RESCALE_EXPONENT (float64 keeps 2**1023).
    RESCALE_EXPONENT = 512.0

    def __init__(self, half_life_s: float) -> None:
        if not (math.isfinite(half_life_s) and half_life_s > 0):
            raise ValueError(f"half_life_s must be a positive number, got {half_life_s!r}")
        self.half_life_s = float(half_life_s)
        self.base: float | None = None
        self.scores: dict[str, float] = {}
        self.first_seen: dict[str, float] = {}
        self.latest = 0.0

    def add(self, item_id: str, ts: float) -> None:
        if self.base is None:
            self.base = ts
        exponent = (ts - self.base) / self.half_life_s
        if exponent > self.RESCALE_EXPONENT:
            self._rebase(ts)
            exponent = 0.0
        self.scores[item_id] = self.scores.get(item_id, 0.0) + 2.0**exponent
        if item_id not in self.first_seen:
            self.first_seen[item_id] = ts
        self.latest = max(self.latest, ts)

    def forget(self, item_ids: list[str]) -> None:
        """Drop what is kept of ``item_ids`` (a forgotten item clicked again is new)."""
        for item in item_ids:
            self.scores.pop(item, None)
            self.first_seen.pop(item, None)

    def _rebase(self, base: float) -> None:
        assert self.base is not None
        factor = 2.0 ** (-(base - self.base) / self.half_life_s)
        self.scores = {item: score * factor for item, score in self.scores.items()}
        self.base = base

    def popular(self, n: int, now: float | None = None) -> dict[str, float]:
        """The ``n`` items with the highest decayed counts at ``now`` (default: latest click)."""
        if n <= 0 or not self.scores or self.base is None:
            return {}
        now = self.latest if now is None else now
        factor = 2.0 ** (-(now - self.base) / self.half_life_s)
        top = sorted(self.scores.items(), key=lambda pair: pair[1], reverse=True)[:n]
        return {item: score * factor for item, score in top}

    def fresh(self, n: int, window_s: float, now: float | None = None) -> dict[str, float]:
        """Up to ``n`` items first clicked within ``window_s`` before ``now``, newest first."""
        now = self.latest if now is None else now
        recent = [(item, t) for item, t in self.first_seen.items() if t >= now - window_s]
        recent.sort(key=lambda pair: pair[1], reverse=True)
        return dict(recent[: max(0, n)])

    def state(self) -> dict[str, np.ndarray]:
        ids = list(self.first_seen)
        return {
            **_encode_ids(ids),
            "score": np.array([self.scores.get(item, 0.0) for item in ids], dtype=np.float64),
            "first_seen": np.array([self.first_seen[item] for item in ids], dtype=np.float64),
            "base": np.array(self.base if self.base is not None else math.nan, dtype=np.float64),
            "latest": np.array(self.latest, dtype=np.float64),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, np.ndarray], half_life_s: float) -> ItemStats:
        stats = cls(half_life_s)
        ids = _decode_ids(state)
        base = float(state["base"])
        stats.base = None if math.isnan(base) else base
        stats.scores = dict(zip(ids, state["score"].tolist(), strict=True))
        stats.first_seen = dict(zip(ids, state["first_seen"].tolist(), strict=True))
        stats.latest = float(state["latest"])
        return stats


def _encode_ids(ids: list[str]) -> dict[str, np.ndarray]:
    encoded = [item.encode() for item in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(raw) for raw in encoded], dtype=np.int64)
    return {
        "item_id_bytes": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        "item_id_offsets": offsets,
    }


def _decode_ids(state: Mapping[str, np.ndarray]) -> list[str]:
    raw = np.asarray(state["item_id_bytes"], dtype=np.uint8).tobytes()
    offsets = np.asarray(state["item_id_offsets"]).tolist()
    return [raw[offsets[i] : offsets[i + 1]].decode() for i in range(len(offsets) - 1)]


class SnapshotPublisher:
    """Builds and publishes index snapshots on one background thread, newest job first.

    Versions continue from the newest of the snapshot store and the Redis
    pointer, so a restarted service (or a store on a fresh disk) never tries to
    move the pointer backwards.
    """

    def __init__(
        self,
        *,
        client: redis.Redis | RedisCluster,
        keys: KeySpace,
        store: SnapshotStore,
        index_name: str,
        spec: IndexSpec,
        metrics: EmbeddingsMetrics,
        retry_interval_s: float = 30.0,
    ) -> None:
        if not (math.isfinite(retry_interval_s) and retry_interval_s > 0):
            raise ValueError(f"retry_interval_s must be positive, got {retry_interval_s!r}")
        self.retry_interval_s = float(retry_interval_s)
        self.redis = client
        self.pointer_key = keys.index_current(index_name)
        self.catalog = keys
        self.store = store
        self.spec = spec
        self.metrics = metrics
        self.published: int | None = None
        self._pending: PublishJob | None = None
        self._wake = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="snapshot-publisher", daemon=True)
        self._thread.start()

    def submit(self, job: PublishJob) -> None:
        """Queue ``job``, replacing a queued one that has not started."""
        with self._wake:
            self._pending = job
            self._wake.notify()

    def close(self, timeout: float = 120.0) -> None:
        """Publish what is queued, then stop."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)
        self.redis.close()

    def _run(self) -> None:
        # A job that failed is tried again every retry interval until it succeeds or a
        # newer one replaces it: the next checkpoint only comes with new clicks, and a
        # quiet stream must not leave the published index behind the model for good.
        failed: PublishJob | None = None
        while True:
            with self._wake:
                self._wake.wait_for(
                    lambda: self._pending is not None or self._closing,
                    timeout=None if failed is None else self.retry_interval_s,
                )
                job, self._pending = self._pending, None
                closing = self._closing
            if job is None:
                job, failed = failed, None
            if job is None:
                return  # closing, and nothing left to publish
            try:
                self.publish(job)
            except Exception:  # noqa: BLE001 - logged; the background loop must outlive any one failure
                self.metrics.publish_failures.inc()
                log.exception(
                    "snapshot publish failed; retrying in %.1f s or with the next checkpoint",
                    self.retry_interval_s,
                )
                failed = None if closing else job  # stopping: one last try, no more
            else:
                failed = None

    def publish(self, job: PublishJob) -> int | None:
        """Build, write and point at one snapshot, then replace the item lists."""
        started = time.perf_counter()
        if job.item_ids:
            pointer = read_pointer(self.redis, self.pointer_key)
            current = pointer.version if pointer is not None else 0
            version = max(current, self.store.latest_version() or 0) + 1
            index = build_index(self.spec, job.vectors)
            manifest = self.store.write(index, job.item_ids, self.spec, version, pinned={current})
            publish(self.redis, self.pointer_key, manifest)
            self.published = version
            self.metrics.version.set(version)
        write_ranked(self.redis, self.catalog.catalog_popular(), job.popular)
        write_ranked(self.redis, self.catalog.catalog_fresh(), job.fresh)
        elapsed = time.perf_counter() - started
        self.metrics.publish_seconds.observe(elapsed)
        log.info(
            "published index v%s (%d items, %s) and lists in %.3f s",
            self.published,
            len(job.item_ids),
            self.spec.kind,
            elapsed,
        )
        return self.published


class EmbeddingsProcessor(Processor):
    """Trains one global Item2Vec on all owned partitions' clicks; publishes after checkpoints."""

    checkpoint_all_owned = True

    def __init__(
        self,
        settings: EmbeddingsSettings,
        publisher: SnapshotPublisher | None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.metrics = (
            publisher.metrics if publisher else EmbeddingsMetrics(registry or CollectorRegistry())
        )
        self.model = self._fresh_model()
        self.stats = ItemStats(settings.popularity_half_life_s)
        self.windows: OrderedDict[str, deque[str]] = OrderedDict()
        self.owned: set[int] = set()
        self._since_publish = 0
        self._changed = False
        self._restored_at = -math.inf

    def _fresh_model(self) -> Item2Vec:
        s = self.settings
        return Item2Vec(
            dim=s.dim,
            window=s.window,
            negatives=s.negatives,
            lr=s.lr,
            seed=s.seed,
            max_items=s.max_items,
        )

    def _forget_evicted(self) -> None:
        """Forget, in the item records, what the model forgot: the lists follow the index."""
        evicted = self.model.drain_evicted()
        if evicted:
            self.stats.forget(evicted)
            self.metrics.evicted.inc(len(evicted))

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        sequences: list[list[str]] = []
        pairs = 0
        clicked = self.stats.first_seen  # items clicked and not forgotten since
        for record in records:
            click: Click = record.value
            window = self.windows.get(click.user_id)
            if window is None:
                window = self.windows[click.user_id] = deque(maxlen=self.settings.window)
                if len(self.windows) > self.settings.max_users:
                    self.windows.popitem(last=False)
            else:
                self.windows.move_to_end(click.user_id)
            # A previous click on an item forgotten since (max_items) pairs with nothing:
            # only a click brings an item back, so the records and the model agree.
            earlier = [previous for previous in window if previous in clicked]
            if earlier:
                sequences += [[previous, click.item_id] for previous in earlier]
                pairs += sum(previous != click.item_id for previous in earlier)
            else:
                sequences.append([click.item_id])
            window.append(click.item_id)
            self.stats.add(click.item_id, click.ts)
        loss = self.model.learn_sequences(sequences)
        self._forget_evicted()
        if not math.isnan(loss):
            self.metrics.loss.set(loss)
        self.metrics.pairs.inc(2 * pairs)
        self.metrics.items.set(len(self.model))
        self._changed = True
        self._since_publish += len(records)
        if self._since_publish >= self.settings.publish_every:
            ctx.request_checkpoint()
        return []

    def snapshot(self, partition: int) -> bytes:
        if partition != min(self.owned):
            return b""
        arrays = {f"model/{name}": array for name, array in self.model.state().items()}
        arrays |= {f"stats/{name}": array for name, array in self.stats.state().items()}
        return encode_params(SERVICE, 0, arrays, meta={"partition": partition})

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        self.owned.add(partition)
        if checkpoint is None or not checkpoint.state:
            return None
        if self._changed or checkpoint.written_at <= self._restored_at:
            # One process learns the model (see the module doc). A partition may hold an
            # older copy (written before the lowest owned partition changed): the newest
            # checkpoint wins, and nothing replaces what this process has learned since.
            log.warning(
                "partition %d holds an older model state; keeping the current one", partition
            )
            return None
        arrays = decode_params(checkpoint.state).arrays
        model_state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
        stats_state = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("stats/")}
        self.model = Item2Vec.from_state(model_state, max_items=self.settings.max_items)
        self.stats = ItemStats.from_state(stats_state, self.settings.popularity_half_life_s)
        self._forget_evicted()  # a lower max_items cuts a restored model down at once
        self._restored_at = checkpoint.written_at
        self.metrics.items.set(len(self.model))
        log.info("restored %d item embeddings from partition %d", len(self.model), partition)
        return None

    def revoke(self, partition: int) -> None:
        self.owned.discard(partition)

    def after_checkpoint(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        if not self._changed or self.publisher is None:
            return
        self._changed = False
        self._since_publish = 0
        self.publisher.submit(self.job())

    def job(self) -> PublishJob:
        """What to publish now: normalised vectors and the item lists."""
        ids, vectors = self.model.vectors(normalize=True)
        return PublishJob(
            item_ids=ids,
            vectors=vectors,
            popular=self.stats.popular(self.settings.popular_n),
            fresh=self.stats.fresh(self.settings.fresh_n, self.settings.fresh_window_s),
        )

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()


def _processor(wiring: Wiring[EmbeddingsSettings]) -> EmbeddingsProcessor:
    settings = wiring.settings
    publisher = SnapshotPublisher(
        client=wiring.redis_client(),
        keys=wiring.redis_settings.keys(),
        store=SnapshotStore(settings.snapshot_dir, keep=settings.keep_snapshots),
        index_name=settings.index_name,
        spec=IndexSpec(kind=settings.index_kind),
        metrics=EmbeddingsMetrics(wiring.registry),
        retry_interval_s=settings.publish_interval_s,
    )
    return EmbeddingsProcessor(settings, publisher)


SPEC = ServiceSpec(
    name=SERVICE,
    settings=EmbeddingsSettings,
    inputs=lambda topics: {topics.clicks: decode_click},
    make_processor=_processor,
    runtime_defaults=lambda settings: {"checkpoint_interval_s": settings.publish_interval_s},
)


def main() -> int:
    """Run the embeddings service until SIGTERM; the last snapshot is published before exit."""
    torch.set_num_threads(1)
    return run_service(SPEC)


if __name__ == "__main__":
    raise SystemExit(main())
