from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contracts.keys import KeySpace
from services.index import (
    IndexNotReady,
    IndexSpec,
    Manifest,
    Pointer,
    ReloadableIndex,
    SnapshotStore,
    build_index,
    publish,
)
from services.index.reloadable import LoadedIndex

pytestmark = pytest.mark.integration

D, N = 8, 500
QUERIES_PER_LOAD = 20


def write_version(store: SnapshotStore, version: int, *, d: int = D, pinned=()) -> Manifest:
    """Snapshot ``version``: N random vectors whose ids name the version they belong to."""
    vectors = np.random.default_rng(version).standard_normal((N, d)).astype(np.float32)
    spec = IndexSpec(kind="flat", metric="l2")
    ids = [f"v{version}-item{i}" for i in range(N)]
    return store.write(build_index(spec, vectors), ids, spec, version, pinned=pinned)


def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class WitnessedIndex(ReloadableIndex):
    """Holds every load open until the query threads have answered more queries.

    If any query waited for a load (a lock shared by the loader and the query
    path), this could never happen and the witness would time out.
    """

    def __init__(self, *args: object, queries_done: Callable[[], int], **kwargs: object) -> None:
        self.queries_during_load: list[int] = []
        self._queries_done = queries_done
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def _load(self, pointer: Pointer) -> LoadedIndex:
        start = self._queries_done()
        wait_until(lambda: self._queries_done() >= start + QUERIES_PER_LOAD, timeout=30)
        loaded = super()._load(pointer)
        self.queries_during_load.append(self._queries_done() - start)
        return loaded


def test_swaps_under_query_load_never_fail_or_block_queries(
    tmp_path: Path, redis_client: redis.Redis, keyspace: KeySpace
) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    key = keyspace.index_current("items")
    registry = CollectorRegistry()
    publish(redis_client, key, write_version(store, 1))

    done = threading.Event()
    answered = [0, 0]
    failures: list[str] = []
    versions_seen: set[str] = set()
    slowest = [0.0]

    index = WitnessedIndex(
        redis_client, key, poll_interval=0.02, registry=registry, queries_done=lambda: sum(answered)
    )
    # The first load is witnessed too, so query threads run before any index serves.

    def query(worker: int) -> None:
        rng = np.random.default_rng(100 + worker)
        while not done.is_set():
            vectors = rng.standard_normal((2, D)).astype(np.float32)
            started = time.perf_counter()
            try:
                ids, scores = index.search(vectors, 5)
            except IndexNotReady:
                answered[worker] += 1
                continue
            except Exception as exc:  # any other error is a failed query
                failures.append(repr(exc))
                continue
            slowest[0] = max(slowest[0], time.perf_counter() - started)
            # All answers of one query come from one snapshot: no torn swap.
            prefixes = {item.split("-")[0] for row in ids for item in row}
            if len(prefixes) != 1 or scores.shape != (2, 5) or len(ids[0]) != 5:
                failures.append(f"inconsistent answer {ids} {scores.shape}")
            versions_seen.update(prefixes)
            answered[worker] += 1

    workers = [threading.Thread(target=query, args=(w,)) for w in range(2)]
    for worker in workers:
        worker.start()
    try:
        assert index.wait_for_version(1, timeout=60)
        for version in (2, 3, 4, 5):
            publish(redis_client, key, write_version(store, version, pinned={index.version}))
            assert index.wait_for_version(version, timeout=60)

        # A snapshot whose index bytes were corrupted after writing is refused.
        bad = write_version(store, 6, pinned={index.version})
        index_file = tmp_path / bad.index_file
        data = bytearray(index_file.read_bytes())
        data[-10] ^= 0xFF
        index_file.write_bytes(bytes(data))
        publish(redis_client, key, bad)
        assert wait_until(lambda: failures_total(registry) == 1)
        # So is one of another dimension than the one being served.
        publish(redis_client, key, write_version(store, 7, d=D + 1, pinned={index.version}))
        assert wait_until(lambda: failures_total(registry) == 2)
        assert index.version == 5
        assert registry.get_sample_value("streamrec_index_version") == 5

        publish(redis_client, key, write_version(store, 8, pinned={index.version}))
        assert index.wait_for_version(8, timeout=60)
        answered_at_8 = sum(answered)
        assert wait_until(lambda: sum(answered) > answered_at_8 + 50)
    finally:
        done.set()
        for worker in workers:
            worker.join()
        index.close()

    assert failures == []
    assert {"v1", "v5", "v8"} <= versions_seen
    assert "v6" not in versions_seen and "v7" not in versions_seen
    # Six loads (v1-v5, v8), each held open until queries went on answering.
    assert len(index.queries_during_load) == 6
    assert min(index.queries_during_load) >= QUERIES_PER_LOAD
    assert registry.get_sample_value("streamrec_index_swaps_total") == 6
    assert registry.get_sample_value("streamrec_index_swap_duration_seconds_count") == 6
    assert failures_total(registry) == 2
    assert registry.get_sample_value("streamrec_index_version") == 8
    assert registry.get_sample_value("streamrec_index_items") == N
    age = registry.get_sample_value("streamrec_index_age_seconds")
    assert age is not None and 0 <= age < 3600
    print(f"answered {sum(answered)} queries; slowest {slowest[0] * 1000:.1f} ms")


def failures_total(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("streamrec_index_swap_failures_total") or 0.0


def test_not_ready_until_a_snapshot_is_published(
    tmp_path: Path, redis_client: redis.Redis, keyspace: KeySpace
) -> None:
    key = keyspace.index_current("fresh")
    registry = CollectorRegistry()
    with ReloadableIndex(redis_client, key, poll_interval=0.02, registry=registry) as index:
        with pytest.raises(IndexNotReady, match="no index snapshot loaded yet"):
            index.search(np.zeros(D, np.float32), 3)
        assert index.version is None
        assert not index.wait_for_version(1, timeout=0.1)
        assert math.isnan(registry.get_sample_value("streamrec_index_age_seconds") or 0.0)

        store = SnapshotStore(tmp_path)
        manifest = write_version(store, 1)
        publish(redis_client, key, manifest)
        assert index.wait_for_version(1, timeout=30)

        vectors = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
        ids, scores = index.search(vectors[7], 3)  # a single (d,) query
        assert ids[0][0] == "v1-item7" and len(ids) == 1 and scores.shape == (1, 3)
        assert scores[0, 0] == pytest.approx(0.0, abs=1e-4)
        ids, scores = index.search(vectors[:4], N + 10)  # k above the catalog size
        assert [len(row) for row in ids] == [N] * 4 and scores.shape == (4, N)
        with pytest.raises(ValueError, match=r"shape \(m, 8\) or \(8,\)"):
            index.search(np.zeros((2, D + 1), np.float32), 3)
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(vectors[:1], 0)


def test_a_snapshot_refused_at_start_leaves_the_index_not_ready_until_a_good_one(
    tmp_path: Path, redis_client: redis.Redis, keyspace: KeySpace
) -> None:
    key = keyspace.index_current("items")
    store = SnapshotStore(tmp_path)
    bad = write_version(store, 1)
    assert bad.path is not None
    bad.path.write_bytes(bad.path.read_bytes().replace(b"v1-item3", b"v1-item4"))
    # Published after corruption, so the pointer's own hash matches; the id map's does not.
    publish(redis_client, key, bad)
    registry = CollectorRegistry()
    with ReloadableIndex(
        redis_client, key, poll_interval=0.02, registry=registry, dimension=D
    ) as index:
        assert wait_until(lambda: failures_total(registry) == 1)
        assert index.refresh() is False  # a refused pointer is not retried
        assert failures_total(registry) == 1
        with pytest.raises(IndexNotReady):
            index.search(np.zeros(D, np.float32), 1)
        publish(redis_client, key, write_version(store, 2))
        assert index.wait_for_version(2, timeout=30)
        assert index.current.manifest.version == 2


# -- untrusted pointers (issue "Nothing lost, nothing doubled, nothing unbounded", item 13)


def write_sized(store: SnapshotStore, version: int, n: int = N) -> Manifest:
    """Snapshot ``version`` of ``n`` random vectors (ids ``v{version}-item{i}``)."""
    vectors = np.random.default_rng(version).standard_normal((n, D)).astype(np.float32)
    spec = IndexSpec(kind="flat", metric="l2")
    ids = [f"v{version}-item{i}" for i in range(n)]
    return store.write(build_index(spec, vectors), ids, spec, version)


def point_at(client: redis.Redis, key: str, version: int, path: Path) -> None:
    """Set the pointer as anyone who can write Redis could: any path, its true sha256."""
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    client.set(key, Pointer(version=version, path=str(path), sha256=sha).to_json())


def test_pointers_outside_the_store_oversize_tampered_or_malformed_are_refused(
    tmp_path: Path,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Serving follows the pointer only to a verified snapshot inside its store, within
    the size limit; anything else is refused and counted, and the last good index serves.

    Before, a pointer to a valid snapshot outside the store (a sibling directory by
    ``..``, a symlink in the store, a symlinked index file) was loaded, the size was
    not limited, /etc/passwd was read and parsed, and a malformed pointer was logged
    on every poll but never counted.
    """
    caplog.set_level(logging.ERROR, logger="services.index.reloadable")
    store, elsewhere = SnapshotStore(tmp_path / "store"), SnapshotStore(tmp_path / "elsewhere")
    key = keyspace.index_current("items")
    publish(redis_client, key, write_sized(store, 1))
    v1_bytes = sum(f.stat().st_size for f in store.directory.iterdir())
    registry = CollectorRegistry()
    with ReloadableIndex(
        redis_client,
        key,
        poll_interval=0.02,
        registry=registry,
        snapshot_dir=store.directory,
        max_snapshot_bytes=2 * v1_bytes,
    ) as index:
        assert index.wait_for_version(1, timeout=30)
        refused = 0

        def assert_refused(reason: str) -> None:
            nonlocal refused
            refused += 1
            assert wait_until(lambda: failures_total(registry) == refused), reason
            assert reason in caplog.records[-1].getMessage(), caplog.records[-1].getMessage()
            assert index.version == 1
            ids, _ = index.search(np.zeros(D, np.float32), 3)
            assert all(item.startswith("v1-") for item in ids[0])

        point_at(redis_client, key, 2, Path("/etc/passwd"))
        assert_refused("outside the snapshot store")

        sibling = write_sized(elsewhere, 3)
        assert sibling.path is not None
        point_at(redis_client, key, 3, store.directory / ".." / "elsewhere" / sibling.path.name)
        assert_refused("outside the snapshot store")

        linked = write_sized(elsewhere, 4)
        assert linked.path is not None
        link = store.manifest_path(4)
        os.symlink(linked.path, link)
        point_at(redis_client, key, 4, link)
        assert_refused("outside the snapshot store")

        inside = write_sized(store, 5)
        assert inside.path is not None
        index_file = store.directory / inside.index_file
        escaped = elsewhere.directory / "escaped.faiss"
        escaped.write_bytes(index_file.read_bytes())
        index_file.unlink()
        os.symlink(escaped, index_file)
        point_at(redis_client, key, 5, inside.path)
        assert_refused("outside the snapshot store")

        big = write_sized(store, 6, n=4 * N)
        assert big.path is not None
        point_at(redis_client, key, 6, big.path)
        assert_refused("snapshots are limited to")

        tampered = write_sized(store, 7)
        assert tampered.path is not None
        index_file = store.directory / tampered.index_file
        data = bytearray(index_file.read_bytes())
        data[len(data) // 2] ^= 0x01
        index_file.write_bytes(bytes(data))
        point_at(redis_client, key, 7, tampered.path)
        assert_refused("index checksum mismatch")

        rewritten = write_sized(store, 8)
        assert rewritten.path is not None
        original = rewritten.path.read_bytes()
        rewritten.path.write_bytes(original.replace(b"v8-item1", b"v8-itemX"))
        sha = hashlib.sha256(original).hexdigest()  # what the publisher pinned
        redis_client.set(key, Pointer(8, str(rewritten.path), sha).to_json())
        assert_refused("manifest checksum mismatch")

        redis_client.set(key, b'{"version": 9, "path": "/etc/passwd", "sha256": "x"}')
        assert_refused("malformed pointer")
        time.sleep(0.2)
        assert failures_total(registry) == refused  # refused once, not on every poll

        publish(redis_client, key, write_sized(store, 10))
        assert index.wait_for_version(10, timeout=30)
    assert registry.get_sample_value("streamrec_index_swaps_total") == 2
