"""A model's history in the parameter store, against a real Redis: pins, rollback, retention.

Readers (``head``, ``latest_parts``, ``latest`` and so every ParamWatcher) serve a
pinned version atomically while publishers keep publishing; retention keeps
versions by age tiers (every version, then one per second, then one per minute),
by count and by bytes, and never drops the newest or the pinned version.
"""

from __future__ import annotations

import random
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
from services.paramstore import ModelNotFound, ParamStore, ParamWatcher

pytestmark = pytest.mark.integration


def blob(
    model: str,
    value: float,
    *,
    size: int = 4,
    partition: int = 0,
    offset: int = 0,
    events: int | None = None,
) -> bytes:
    """A blob whose array ``x`` holds ``size`` copies of ``value`` (same arguments, same bytes)."""
    meta: dict[str, Any] = {"marker": value}
    if events is not None:
        meta["events"] = events
    return encode_params(
        model,
        0,
        {"x": np.full(size, value)},
        offsets={"feedback": {partition: offset}},
        meta=meta,
        created_at=1.0,
    )


class Clock:
    """A settable clock for the store's ``clock=``: unix seconds."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def make_store(client: redis.Redis, keys: KeySpace, **kwargs: Any) -> ParamStore:
    return ParamStore(client, keys=keys, registry=CollectorRegistry(), **kwargs)


def eventually(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def blob_ttls(client: redis.Redis, keys: KeySpace, model: str) -> dict[str, int]:
    found = client.scan_iter(f"{keys.namespace}:params:{{{model}}}:blob:*", count=1000)
    return {key.decode(): int(client.pttl(key)) for key in found}


def referenced(store: ParamStore, model: str) -> set[str]:
    return {key for v in store.versions(model) for key in store.manifest(model, v).values()}


@pytest.fixture
def model(unique_name: Callable[[str], str]) -> str:
    return unique_name("model")


def marker(parts: dict[str, Any]) -> float:
    (value,) = {float(p.arrays["x"][0]) for p in parts.values()}
    return value


def test_a_pin_serves_its_version_while_publishes_go_on_and_unpin_serves_the_newest(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    for value in range(1, 6):
        assert store.publish(model, {"main": blob(model, float(value))}) == value
    assert store.pin_of(model) is None
    before = time.time()
    pin = store.pin(model, 2, reason="bad update at v3")
    assert (pin.version, pin.reason, pin.by) == (2, "bad update at v3", "operator")
    assert before - 5 < pin.at < time.time() + 5
    assert store.pin_of(model) == pin
    assert store.head(model) is not None and store.head(model)[0] == 2  # type: ignore[index]
    version, parts = store.latest_parts(model)
    assert version == 2 and marker(parts) == 2.0
    version, header, arrays = store.latest(model)
    assert version == 2 and header["pinned"] is True and arrays["x"][0] == 2.0
    # Learners keep learning: publishes make versions, readers stay on the pin.
    assert store.publish(model, {"main": blob(model, 6.0)}) == 6
    assert store.current_version(model) == 6
    assert store.latest_parts(model)[0] == 2
    assert [v.version for v in store.history(model) if v.pinned] == [2]
    assert store.unpin(model) == pin
    assert store.pin_of(model) is None and store.unpin(model) is None
    version, header, arrays = store.latest(model)
    assert version == 6 and header["pinned"] is False and arrays["x"][0] == 6.0
    # A pin by the guard replaces an operator's pin.
    store.pin(model, 4, reason="x")
    assert store.pin(model, 5, reason="reward drop", by="guard").by == "guard"
    assert store.latest_parts(model)[0] == 5


def test_rollback_pins_the_version_before_the_one_served(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace, keep_versions=4)
    for value in range(1, 7):
        store.publish(model, {"main": blob(model, float(value))})
    assert store.versions(model) == [3, 4, 5, 6]
    first = store.rollback(model)
    assert (first.version, first.reason, first.by) == (5, "rollback", "operator")
    assert store.rollback(model, reason="again").version == 4  # back from the pinned one
    assert store.rollback(model, 6, by="guard") == store.pin_of(model)
    assert store.latest_parts(model)[0] == 6
    store.pin(model, 3, reason="oldest")
    with pytest.raises(ModelNotFound, match="no retained version is older"):
        store.rollback(model)
    assert store.pin_of(model).version == 3  # type: ignore[union-attr]
    with pytest.raises(ModelNotFound, match="version 2 is not retained"):
        store.pin(model, 2, reason="gone")
    with pytest.raises(ModelNotFound, match="version 9 is not retained"):
        store.rollback(model, 9)
    with pytest.raises(ValueError, match="version must be an integer >= 1"):
        store.pin(model, 0, reason="zero")
    with pytest.raises(ValueError, match="model name"):
        store.pin("a{b}", 1, reason="bad name")
    with pytest.raises(ModelNotFound, match="no version is served"):
        store.rollback(f"{model}-never")
    with pytest.raises(ModelNotFound):
        store.pin(f"{model}-never", 1, reason="nothing published")


def test_history_lists_time_size_offsets_events_and_the_pin(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    assert store.history(model) == []
    shared = blob(model, 0.0, size=500, partition=1, offset=70, events=30)
    first = {"p0": blob(model, 1.0, offset=10, events=5), "p1": shared}
    started = time.time()
    store.publish(model, first)
    store.publish(model, {"p0": blob(model, 2.0, offset=12, events=8)})
    store.publish(model, {"p2": encode_params(model, 0, {"x": np.zeros(2)})})  # no events
    store.pin(model, 1, reason="test")
    one, two, three = store.history(model)
    assert [v.version for v in (one, two, three)] == [1, 2, 3]
    assert started - 5 < one.published_at < two.published_at < three.published_at
    assert three.published_at < time.time() + 5
    assert one.digests == {p: decode_params(b).checksum for p, b in first.items()}
    assert one.size_bytes == len(first["p0"]) + len(shared)
    assert one.offsets == {"feedback:0": 10, "feedback:1": 70}
    assert two.offsets == {"feedback:0": 12, "feedback:1": 70}
    assert (one.events, two.events, three.events) == (35, 38, None)
    assert (one.pinned, two.pinned, three.pinned) == (True, False, False)
    assert store.version_parts(model, 1)["p0"].arrays["x"][0] == 1.0
    assert sorted(store.version_parts(model, 3)) == ["p0", "p1", "p2"]
    with pytest.raises(ModelNotFound, match="version 4 is not retained"):
        store.version_parts(model, 4)


def test_version_parts_verifies_each_blob(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    store.publish(model, {"p0": blob(model, 1.0), "p1": blob(model, 2.0)})
    store.publish(model, {"p0": blob(model, 3.0)})
    keys = store.manifest(model, 1)
    raw = redis_client.get(keys["p0"])
    assert isinstance(raw, bytes)
    redis_client.set(keys["p0"], raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(ParamError, match=r"part 'p0' v1: checksum mismatch"):
        store.version_parts(model, 1)
    assert store.version_parts(model, 2)["p1"].arrays["x"][0] == 2.0


def test_retention_never_drops_the_pinned_version_or_its_blobs(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    clock = Clock()
    size = len(blob(model, 0.0, size=100))
    store = make_store(
        redis_client,
        keyspace,
        keep_versions=3,
        keep_bytes=4 * size,
        keep_all_s=1,
        keep_recent_s=10,
        keep_age_s=100,
        blob_ttl_s=0.05,
        clock=clock,
    )
    store.publish(model, {"main": blob(model, 1.0, size=100)})
    store.pin(model, 1, reason="keep me")
    for value in range(2, 30):
        clock.now += 7.3  # past every age tier within the loop
        store.publish(model, {"main": blob(model, float(value), size=100)})
    assert store.versions(model)[0] == 1 and len(store.versions(model)) <= 3
    assert marker(store.version_parts(model, 1)) == 1.0
    assert store.latest_parts(model)[0] == 1
    # A pinned version over the byte budget on its own still stays.
    clock.now += 1
    store.publish(model, {"main": blob(model, 99.0, size=10_000)})
    assert store.versions(model) == [1, 30]
    ttls = blob_ttls(redis_client, keyspace, model)
    assert ttls[store.manifest(model, 1)["main"]] == -1
    # Unpinned, the version is judged like any other: far past keep_age_s, it goes.
    store.unpin(model)
    assert store.versions(model) == [30]
    assert eventually(
        lambda: set(blob_ttls(redis_client, keyspace, model)) == referenced(store, model)
    )


def expected_kept(
    times: dict[int, float], now: float, keep_all: float, keep_recent: float, keep_age: float
) -> set[int]:
    """The retention policy written plainly: which versions a store must hold at ``now``."""
    newest = max(times)
    second_edge = int(now - keep_all)  # floor for positive times
    minute_edge = int((now - keep_recent) // 60) * 60
    age_edge = now - keep_age

    def newest_in(version: int, width: int) -> bool:
        bucket = int(times[version] // width)
        return all(int(t // width) != bucket or t <= times[version] for t in times.values())

    kept = set()
    for version, published in times.items():
        if version == newest:
            kept.add(version)
        elif published < age_edge:
            continue
        elif published < minute_edge:
            if newest_in(version, 60):
                kept.add(version)
        elif published < second_edge:
            if newest_in(version, 1):
                kept.add(version)
        else:
            kept.add(version)
    return kept


def test_retention_thins_history_by_age_as_the_policy_says(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    clock = Clock(1_700_000_000.5)
    policy = {"keep_all_s": 3.0, "keep_recent_s": 150.0, "keep_age_s": 600.0}
    store = make_store(redis_client, keyspace, blob_ttl_s=0.05, clock=clock, **policy)
    rng = random.Random(7)
    times: dict[int, float] = {}
    steady = blob(model, -1.0, size=50)
    for step in range(1500):
        # Bursts, steady publishing and pauses, so buckets hold 0 to many versions.
        clock.now += rng.choice([0.01, 0.05, 0.25, 0.25, 0.25, 0.7, 2.5, 40.0])
        parts = {"moving": blob(model, float(step))}
        if step % 100 == 0:
            parts["steady"] = steady
        version = store.publish(model, parts)
        times[version] = clock.now
        if step % 100 == 99 or step < 20:
            kept = expected_kept(
                times,
                clock.now,
                policy["keep_all_s"],
                policy["keep_recent_s"],
                policy["keep_age_s"],
            )
            assert set(store.versions(model)) == kept, f"after publish {step}"
    history = store.history(model)
    assert [round(v.published_at, 6) for v in history] == [
        round(times[v.version], 6) for v in history
    ]
    # The byte count kept incrementally equals the blobs the kept versions name.
    live = referenced(store, model)
    sizes = {key: int(redis_client.strlen(key)) for key in live}
    retained = store.registry.get_sample_value("streamrec_params_retained_bytes", {"model": model})
    assert retained == sum(sizes.values())
    assert eventually(lambda: set(blob_ttls(redis_client, keyspace, model)) == live)
    assert len(history) < len(times) / 5


def test_watchers_follow_a_pin_and_an_unpin(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace)
    for value in range(1, 4):
        store.publish(model, {"main": blob(model, float(value))})
    watcher: ParamWatcher[Any] = ParamWatcher(store, model, poll_interval_s=0.02)
    try:
        assert watcher.wait_ready(10)[0] == 3

        def serving() -> tuple[int, bool, float]:
            version, (header, arrays) = watcher.current()
            return version, header["pinned"], float(arrays["x"][0])

        store.pin(model, 1, reason="test")
        assert eventually(lambda: serving() == (1, True, 1.0))
        store.publish(model, {"main": blob(model, 4.0)})
        time.sleep(0.2)
        assert serving() == (1, True, 1.0)
        store.unpin(model)
        assert eventually(lambda: serving() == (4, False, 4.0))
        # Pinning the version already served changes the digest: the watcher reloads.
        store.pin(model, 4, reason="hold")
        assert eventually(lambda: serving() == (4, True, 4.0))
        store.unpin(model)
        assert eventually(lambda: serving() == (4, False, 4.0))
    finally:
        watcher.close()


def test_a_pin_is_atomic_under_query_load(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    store = make_store(redis_client, keyspace, keep_versions=30, blob_ttl_s=0.05)
    names = [f"p{i}" for i in range(4)]
    published: dict[int, float] = {}

    def publish(value: float) -> None:
        version = store.publish(model, {name: blob(model, value, size=64) for name in names})
        published[version] = value

    publish(0.0)
    reads: list[tuple[int, float, bool]] = []
    failures: list[str] = []
    done = threading.Event()

    def read() -> None:
        reader = make_store(redis_client, keyspace)  # its own connection from the pool
        while not done.is_set():
            try:
                version, header, _ = reader.latest(
                    model, combine=lambda states: {"x": states[0]["x"]}
                )
                _, parts = reader.latest_parts(model)
            except (ParamError, ModelNotFound) as exc:
                failures.append(str(exc))
                continue
            values = {float(p.arrays["x"][0]) for p in parts.values()}
            if len(values) != 1:
                failures.append(f"mixed version: {sorted(values)}")
                continue
            reads.append((version, float(header["meta"]["marker"]), bool(header["pinned"])))

    def pin_and_unpin() -> None:
        rng = random.Random(3)
        while not done.is_set():
            retained = store.versions(model)
            try:
                store.pin(model, rng.choice(retained), reason="load test")
            except ModelNotFound:
                pass  # retention dropped it since the listing: a real, harmless race
            time.sleep(0.003)
            store.unpin(model)
            time.sleep(0.003)

    threads = [threading.Thread(target=read) for _ in range(3)]
    threads.append(threading.Thread(target=pin_and_unpin))
    for thread in threads:
        thread.start()
    try:
        for value in range(1, 301):
            publish(float(value))
            if value % 10 == 0:
                time.sleep(0.01)
    finally:
        done.set()
        for thread in threads:
            thread.join()
    assert failures == []
    assert len(reads) > 100
    # Every read saw one whole version, and that version's own content.
    assert all(published[version] == value for version, value, _ in reads)
    assert {pinned for _, _, pinned in reads} == {True, False}


def test_a_publish_stays_cheap_with_thousands_of_retained_versions(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    clock = Clock()
    store = make_store(redis_client, keyspace, clock=clock)

    def commands() -> int:
        stats = redis_client.info("commandstats")
        return sum(int(entry["calls"]) for entry in stats.values())

    steady = {f"p{i}": blob(model, -float(i)) for i in range(1, 4)}
    costs = []
    for step in range(3000):
        clock.now += 1.0  # one per second: the policy keeps them all for an hour
        before = commands()
        store.publish(model, {"p0": blob(model, float(step)), **steady})
        costs.append(commands() - before)
    assert len(store.versions(model)) == 3000
    assert min(costs) > 20, "commandstats counts the commands scripts run"
    # Redis commands a publish runs (the script's included): the same at 30 versions
    # as at 3,000, not one walk over the manifests.
    assert max(costs[-100:]) <= max(costs[20:120]) <= 80
