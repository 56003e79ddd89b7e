from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import faiss
import msgspec
import numpy as np
import pytest
import redis

from contracts.keys import KeySpace
from services.index import (
    IndexSpec,
    SnapshotError,
    SnapshotStore,
    build_index,
    publish,
    read_pointer,
    read_snapshot,
)

pytestmark = pytest.mark.integration


def catalog(n: int = 200, d: int = 8, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    vectors = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return vectors, [f"item-{seed}-{i}" for i in range(n)]


def write_version(store: SnapshotStore, version: int, **kwargs: object):
    vectors, ids = catalog(seed=version)
    spec = IndexSpec(kind="flat")
    return store.write(build_index(spec, vectors), ids, spec, version, **kwargs)  # type: ignore[arg-type]


def test_round_trip_verifies_and_restores_the_index(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path / "snapshots")
    vectors, ids = catalog(n=300, d=16)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    spec = IndexSpec(kind="hnsw", metric="ip", hnsw_m=8, ef_search=48)
    manifest = store.write(build_index(spec, vectors), ids, spec, 1)
    assert (manifest.version, manifest.count, manifest.dimension) == (1, 300, 16)
    assert (manifest.kind, manifest.metric, manifest.spec["ef_search"]) == ("hnsw", "ip", 48)

    index, read_ids, read_manifest = store.read(1)
    assert read_ids == ids
    assert read_manifest == manifest
    assert index.hnsw.efSearch == 48
    np.testing.assert_array_equal(index.search(vectors[:3], 1)[1].ravel(), [0, 1, 2])
    assert store.read(manifest.path)[2] == manifest  # type: ignore[arg-type]


def test_writes_are_atomic_for_a_concurrent_reader(tmp_path: Path) -> None:
    """A reader listing and reading snapshots while they are written never sees half of one."""
    store = SnapshotStore(tmp_path, keep=50)
    reader = SnapshotStore(tmp_path)
    errors: list[str] = []
    reads = 0
    done = threading.Event()

    def read_continuously() -> None:
        nonlocal reads
        while not done.is_set():
            for version in reader.versions():
                try:
                    reader.read(version)
                    reads += 1
                except SnapshotError as exc:
                    errors.append(exc.reason)

    thread = threading.Thread(target=read_continuously)
    thread.start()
    try:
        for version in range(1, 21):
            write_version(store, version)
    finally:
        done.set()
        thread.join()
    assert errors == []
    assert reads > 0
    assert store.versions() == list(range(1, 21))
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_leftovers_of_an_interrupted_write_are_not_snapshots(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    write_version(store, 1)
    # A crash after the index file but before the manifest, and one mid-write.
    (tmp_path / "000000000002.faiss").write_bytes(b"partial")
    (tmp_path / ".000000000002.manifest.json.abc.tmp").write_bytes(b"{")
    assert store.versions() == [1]
    write_version(store, 3)
    assert store.versions() == [1, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "000000000001.faiss",
        "000000000001.manifest.json",
        "000000000003.faiss",
        "000000000003.manifest.json",
    ]


def test_pruning_keeps_the_newest_k_and_the_pinned_version(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, keep=3)
    for version in range(1, 7):
        write_version(store, version, pinned={2})
    assert store.versions() == [2, 4, 5, 6]
    write_version(store, 7)
    assert store.versions() == [5, 6, 7]
    assert len(list(tmp_path.glob("*.faiss"))) == 3
    with pytest.raises(ValueError, match="not above the newest snapshot 7"):
        write_version(store, 7)


def test_corrupted_index_bytes_are_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    manifest = write_version(store, 1)
    index_path = tmp_path / manifest.index_file
    data = bytearray(index_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    index_path.write_bytes(bytes(data))
    with pytest.raises(SnapshotError, match="index checksum mismatch") as caught:
        store.read(1)
    assert "v1" in caught.value.reason


def test_corrupted_id_map_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    manifest = write_version(store, 1)
    assert manifest.path is not None
    text = manifest.path.read_bytes()
    assert text.count(b'"item-1-17"') == 1
    manifest.path.write_bytes(text.replace(b'"item-1-17"', b'"item-1-71"'))
    with pytest.raises(SnapshotError, match="id map checksum mismatch"):
        store.read(1)


def test_truncated_or_missing_files_are_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    manifest = write_version(store, 1)
    assert manifest.path is not None
    raw = manifest.path.read_bytes()
    manifest.path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(SnapshotError, match="not JSON"):
        store.read(1)
    manifest.path.write_bytes(raw)
    (tmp_path / manifest.index_file).unlink()
    with pytest.raises(SnapshotError, match="index file unreadable"):
        store.read(1)
    with pytest.raises(SnapshotError, match="manifest unreadable"):
        store.read(9)


def test_publish_sets_the_pointer_and_only_moves_it_forwards(
    tmp_path: Path, redis_client: redis.Redis, keyspace: KeySpace
) -> None:
    store = SnapshotStore(tmp_path)
    key = keyspace.index_current("items")
    assert read_pointer(redis_client, key) is None
    first = write_version(store, 1)
    second = write_version(store, 2)

    pointer = publish(redis_client, key, second)
    assert read_pointer(redis_client, key) == pointer
    raw = msgspec.json.decode(redis_client.get(key))
    assert raw == {"version": 2, "path": str(second.path), "sha256": pointer.sha256}
    assert publish(redis_client, key, second) == pointer  # a retry is harmless
    with pytest.raises(SnapshotError, match="already names a version at or above 1"):
        publish(redis_client, key, first)
    assert read_pointer(redis_client, key) == pointer

    index, ids, manifest = store.read(Path(pointer.path))
    assert manifest.version == 2 and len(ids) == index.ntotal == 200


def test_write_refuses_mismatched_inputs(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    vectors, ids = catalog(n=10)
    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    with pytest.raises(ValueError, match="9 item ids for an index of 10 vectors"):
        store.write(index, ids[:9], IndexSpec(kind="flat"), 1)
    with pytest.raises(ValueError, match="duplicates"):
        store.write(index, ids[:9] + ids[:1], IndexSpec(kind="flat"), 1)
    with pytest.raises(ValueError, match="spec resolves to hnsw/ip"):
        store.write(index, ids, IndexSpec(kind="hnsw"), 1)
    with pytest.raises(ValueError, match="keep must be a positive integer"):
        SnapshotStore(tmp_path, keep=0)
    assert store.versions() == []


def test_reads_are_confined_to_the_store_and_bounded_in_size(tmp_path: Path) -> None:
    """What a pointer can name is confined to the store's regular files, and capped.

    Before: paths outside the store were read (and a valid snapshot there loaded),
    a FIFO blocked the reader forever, and there was no size limit.
    """
    store = SnapshotStore(tmp_path / "store")
    other = SnapshotStore(tmp_path / "other")
    manifest = write_version(store, 1)
    outside = write_version(other, 1)
    assert manifest.path is not None and outside.path is not None
    size = manifest.path.stat().st_size + (store.directory / manifest.index_file).stat().st_size

    assert store.read(1)[2] == manifest
    with pytest.raises(SnapshotError, match="outside the snapshot store"):
        store.read(outside.path)
    with pytest.raises(SnapshotError, match="outside the snapshot store"):
        store.read(store.directory / ".." / "other" / outside.path.name)
    (store.directory / "notes.json").write_text("{}")
    with pytest.raises(SnapshotError, match="not a snapshot manifest"):
        store.read(store.directory / "notes.json")
    # Exactly at the limit is fine; one byte less is refused before the index is read.
    assert read_snapshot(manifest.path, root=store.directory, max_bytes=size)[2] == manifest
    with pytest.raises(SnapshotError, match="snapshots are limited to"):
        read_snapshot(manifest.path, root=store.directory, max_bytes=size - 1)
    with pytest.raises(SnapshotError, match="snapshots are limited to"):
        read_snapshot(manifest.path, root=store.directory, max_bytes=100)

    fifo = store.manifest_path(2)
    os.mkfifo(fifo)
    outcome: list[str] = []

    def read_fifo() -> None:
        try:
            read_snapshot(fifo, root=store.directory, expected_sha256=hashlib.sha256().hexdigest())
        except SnapshotError as exc:
            outcome.append(exc.reason)

    reader = threading.Thread(target=read_fifo, daemon=True)
    reader.start()
    reader.join(10)
    assert not reader.is_alive(), "reading a FIFO blocked"
    assert outcome and "not a regular file" in outcome[0]
