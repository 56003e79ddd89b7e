"""Content-addressed blobs and bounded retention in the parameter store, against a real Redis.

A publish every 0.25 s per model used to write every part again and keep each
replaced blob for two minutes: hundreds of copies of a model under
``noeviction``. These tests pin what replaced that: a part is stored once per
distinct content, a version that changes nothing is not made, and the versions
kept are bounded by count and by bytes, while every blob a kept version names
stays readable.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contracts.keys import KeySpace
from contracts.params import ParamError, decode_params, encode_params
from services.paramstore import ModelNotFound, ParamStore, StalePublish

pytestmark = pytest.mark.integration


def blob(model: str, value: float, size: int = 4, **meta: object) -> bytes:
    """A blob whose array ``x`` holds ``size`` copies of ``value`` (same arguments, same bytes)."""
    return encode_params(model, 0, {"x": np.full(size, value)}, meta=meta, created_at=1.0)


def blob_keys(client: redis.Redis, keys: KeySpace, model: str) -> dict[str, int]:
    """Every blob key of ``model`` in Redis → its TTL in ms (-1: none)."""
    found = client.scan_iter(f"{keys.namespace}:params:{{{model}}}:blob:*")
    return {key.decode(): int(client.pttl(key)) for key in found}


def referenced(store: ParamStore, model: str) -> set[str]:
    """The blob keys the kept manifests of ``model`` name."""
    return {key for v in store.versions(model) for key in store.manifest(model, v).values()}


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.fixture
def model(unique_name: Callable[[str], str]) -> str:
    return unique_name("model")


def make_store(client: redis.Redis, keys: KeySpace, **retention: Any) -> ParamStore:
    return ParamStore(client, keys=keys, registry=CollectorRegistry(), **retention)


def written(store: ParamStore, model: str) -> float:
    value = store.registry.get_sample_value(
        "streamrec_params_written_bytes_total", {"model": model}
    )
    return value or 0.0


def test_blobs_are_named_by_their_checksum_and_an_unchanged_part_is_not_written_again(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    big, small = blob(model, 1.0, size=1000), blob(model, 2.0)
    assert store.publish(model, {"p0": big, "p1": small}) == 1
    first = store.manifest(model, 1)
    assert first["p0"] == keyspace.params_blob(model, "p0", decode_params(big).checksum)
    assert store.digests(model, 1) == {
        "p0": decode_params(big).checksum,
        "p1": decode_params(small).checksum,
    }

    changed = blob(model, 3.0)
    assert store.publish(model, {"p0": big, "p1": changed}) == 2
    assert store.manifest(model, 2)["p0"] == first["p0"], "both versions share p0's blob"
    assert sorted(blob_keys(redis_client, keyspace, model)) == sorted(
        {*first.values(), *store.manifest(model, 2).values()}
    )
    assert written(store, model) == len(big) + len(small) + len(changed)
    _, parts = store.latest_parts(model)
    assert parts["p0"].arrays["x"][0] == 1.0 and parts["p1"].arrays["x"][0] == 3.0


def test_a_publish_that_changes_nothing_makes_no_version(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    subscriber = redis_client.pubsub(ignore_subscribe_messages=True)
    subscriber.subscribe(keyspace.params_channel(model))
    try:
        assert store.publish(model, {"main": blob(model, 1.0)}) == 1
        head = store.head(model)
        # Another store (another process) publishing the same bytes changes nothing either.
        for publisher in (store, make_store(redis_client, keyspace)):
            assert publisher.publish(model, {"main": blob(model, 1.0)}) == 1
        assert store.versions(model) == [1] and store.head(model) == head
        assert store.publish(model, {"main": blob(model, 2.0)}) == 2
        messages: list[int] = []
        deadline = time.monotonic() + 10
        while len(messages) < 2 and time.monotonic() < deadline:
            if (message := subscriber.get_message(timeout=0.1)) is not None:
                messages.append(int(message["data"]))
        assert messages == [1, 2]  # no message for the publishes that made no version
        assert subscriber.get_message(timeout=0.2) is None
    finally:
        subscriber.close()


def test_kept_versions_keep_their_blobs_and_every_other_blob_is_retired(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace, keep_versions=3, blob_ttl_s=0.2)
    steady = blob(model, 0.0)
    for value in range(1, 9):
        store.publish(model, {"steady": steady, "moving": blob(model, float(value))})
    assert store.versions(model) == [6, 7, 8]
    live = referenced(store, model)
    assert len(live) == 4  # the shared steady blob and three moving ones
    stored = blob_keys(redis_client, keyspace, model)
    for key in live:
        assert stored[key] == -1, f"{key} is named by a kept version: it must not expire"
    for key in set(stored) - live:
        assert 0 < stored[key] <= 200, f"{key} is named by no kept version: it is retired"
    assert eventually(lambda: set(blob_keys(redis_client, keyspace, model)) == live)
    # A retired blob that comes back is stored for good again.
    assert store.publish(model, {"moving": blob(model, 6.0)}) == 9
    assert store.versions(model) == [7, 8, 9]
    assert all(ttl == -1 for ttl in blob_keys(redis_client, keyspace, model).values())
    assert eventually(
        lambda: set(blob_keys(redis_client, keyspace, model)) == referenced(store, model)
    )


def test_kept_bytes_bound_the_versions_and_a_shared_blob_counts_once(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    big = blob(model, 0.0, size=2000)
    size = len(blob(model, 1.0))
    budget = len(big) + 3 * size
    store = make_store(redis_client, keyspace, keep_versions=10, keep_bytes=budget)
    for value in range(1, 7):
        store.publish(model, {"big": big, "small": blob(model, float(value))})
    assert store.versions(model) == [4, 5, 6]
    assert (
        store.registry.get_sample_value("streamrec_params_retained_bytes", {"model": model})
        == len(big) + 3 * size
    )
    assert (
        store.registry.get_sample_value("streamrec_params_retained_versions", {"model": model}) == 3
    )
    # The newest version is kept even if it alone is over the budget.
    huge = blob(model, 9.0, size=5000)
    assert store.publish(model, {"small": huge}) == 7
    assert store.versions(model) == [7]
    assert store.latest_parts(model)[1]["small"].arrays["x"].shape == (5000,)


def test_blobs_and_manifests_stay_bounded_over_many_publishes(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace, keep_versions=5, blob_ttl_s=0.05)
    for value in range(200):
        store.publish(model, {f"p{value % 4}": blob(model, float(value), size=100)})
    assert store.versions(model) == [196, 197, 198, 199, 200]
    # Four parts, each replaced every fourth publish: the five kept manifests name
    # at most 4 + 4 distinct blobs, and nothing else stays.
    assert eventually(
        lambda: set(blob_keys(redis_client, keyspace, model)) == referenced(store, model)
    )
    assert len(referenced(store, model)) == 8
    manifests = list(redis_client.scan_iter(f"{keyspace.namespace}:params:{{{model}}}:manifest:*"))
    assert len(manifests) == 5


def test_readers_never_miss_a_blob_while_retention_runs(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    # One kept version and a short TTL: the tightest retention there is.
    store = make_store(redis_client, keyspace, keep_versions=1, blob_ttl_s=0.05)
    store.publish(model, {"a": blob(model, 0.0), "b": blob(model, 0.0)})
    failures: list[str] = []
    reads = [0, 0]
    done = threading.Event()

    def read_atomically() -> None:
        while not done.is_set():
            try:
                _, parts = store.latest_parts(model)
            except (ParamError, ModelNotFound) as exc:
                failures.append(str(exc))
                continue
            if parts["a"].arrays["x"][0] != parts["b"].arrays["x"][0]:
                failures.append("half a version")
            reads[0] += 1

    def walk_keys() -> None:
        # Manifest first, blobs after, in separate commands: the TTL covers the gap.
        while not done.is_set():
            version = store.current_version(model)
            keys = store.manifest(model, version) if version else {}
            for key in keys.values():
                if redis_client.get(key) is None:
                    failures.append(f"walker lost {key}")
            reads[1] += 1

    readers = [threading.Thread(target=read_atomically), threading.Thread(target=walk_keys)]
    for reader in readers:
        reader.start()
    try:
        for value in range(1, 301):
            store.publish(model, {"a": blob(model, float(value)), "b": blob(model, float(value))})
    finally:
        done.set()
        for reader in readers:
            reader.join()
    assert failures == []
    assert min(reads) > 10


def test_a_blob_that_is_not_the_one_its_manifest_names_is_refused(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    version = store.publish(model, {"p0": blob(model, 1.0), "p1": blob(model, 2.0)})
    keys = store.manifest(model, version)
    # A valid blob, of this model, under the other part's key: the checksum alone passes.
    other = redis_client.get(keys["p0"])
    assert isinstance(other, bytes)
    redis_client.set(keys["p1"], other)
    with pytest.raises(ParamError, match=rf"part 'p1' v{version}: blob is not the one"):
        store.latest_parts(model)


def test_a_blob_left_out_as_stored_is_sent_when_redis_lost_it(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    same = blob(model, 1.0)
    assert store.publish(model, {"main": same}) == 1
    key = store.manifest(model, 1)["main"]
    redis_client.delete(key)  # the blob alone is gone: the next publish puts it back
    assert store.publish(model, {"main": same}) == 1
    assert redis_client.get(key) == same
    for found in redis_client.scan_iter(f"{keyspace.namespace}:params:{{{model}}}:*"):
        redis_client.delete(found)  # Redis lost everything: counting starts again
    assert store.publish(model, {"main": same}) == 1
    assert store.latest_parts(model)[1]["main"].arrays["x"][0] == 1.0


def test_an_unchanged_part_still_raises_its_fence(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    state = blob(model, 1.0)
    assert store.publish(model, {"p0": state}, fence={"p0": 1}, owner="g") == 1
    # A new owner claims the partition and publishes the state it restored, unchanged.
    assert store.publish(model, {"p0": state}, fence={"p0": 2}, owner="g") == 1
    with pytest.raises(StalePublish):
        store.publish(model, {"p0": blob(model, 0.5)}, fence={"p0": 1}, owner="g")
    assert store.latest_parts(model)[1]["p0"].arrays["x"][0] == 1.0


def test_a_store_written_by_the_earlier_layout_stays_readable_and_is_retired(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    # Before content addressing, pointers and manifests named whole blob keys.
    legacy = {part: keyspace.params_blob(model, part, f"{part}uuid") for part in ("p0", "p1")}
    for value, key in enumerate(legacy.values()):
        redis_client.set(key, blob(model, float(value)))
    for part, key in legacy.items():
        redis_client.hset(keyspace.params_parts(model), part, key)
        redis_client.hset(keyspace.params_manifest(model, 1), part, key)
    redis_client.set(keyspace.params_current(model), 1)
    store = make_store(redis_client, keyspace, keep_versions=1, blob_ttl_s=0.05)
    assert store.manifest(model, 1) == legacy
    assert {p: s.arrays["x"][0] for p, s in store.latest_parts(model)[1].items()} == {
        "p0": 0.0,
        "p1": 1.0,
    }
    assert store.publish(model, {"p0": blob(model, 5.0)}) == 2
    _, parts = store.latest_parts(model)
    assert parts["p0"].arrays["x"][0] == 5.0 and parts["p1"].arrays["x"][0] == 1.0
    assert store.manifest(model, 2)["p1"] == legacy["p1"]
    assert redis_client.pttl(legacy["p1"]) == -1
    assert eventually(lambda: redis_client.exists(legacy["p0"]) == 0)
