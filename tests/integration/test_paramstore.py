"""The Redis parameter store against a real Redis: publish, read, combine, hot reload."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from contracts.keys import KeySpace
from contracts.params import ParamError, encode_params
from services.bandits import LinUCB, learner_from_params
from services.common.settings import RedisSettings
from services.paramstore import ModelNotFound, ParamStore, ParamWatcher
from services.serving.policies import watch_learner
from services.stack.servers import start_redis

pytestmark = pytest.mark.integration


def blob(model: str, value: float, *, partition: int = 0, offset: int = 0, **meta) -> bytes:
    """A small blob whose array ``x`` holds ``value``, reflecting one feedback partition."""
    return encode_params(
        model,
        0,
        {"x": np.full(4, value), "n": np.array(int(value))},
        offsets={"feedback": {partition: offset}},
        meta=meta,
    )


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``check`` until it holds or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.fixture
def store(redis_client: redis.Redis, keyspace: KeySpace) -> ParamStore:
    return ParamStore(redis_client, keys=keyspace, registry=CollectorRegistry())


@pytest.fixture
def model(unique_name: Callable[[str], str]) -> str:
    return unique_name("model")


def test_publish_then_latest_round_trip(store: ParamStore, model: str) -> None:
    assert store.current_version(model) is None
    first = store.publish(model, {"main": blob(model, 1.0, offset=7)})
    second = store.publish(model, {"main": blob(model, 2.0, offset=9)})
    assert (first, second) == (1, 2)
    assert store.current_version(model) == 2
    version, header, arrays = store.latest(model)
    assert version == 2
    assert header["model"] == model and header["version"] == 2 and header["parts"] == ["main"]
    assert header["offsets"] == {"feedback": {0: 9}}
    assert header["created_at"] > 0 and len(header["digest"]) == 40
    np.testing.assert_array_equal(arrays["x"], np.full(4, 2.0))
    assert arrays["n"].shape == () and arrays["n"].dtype == np.int64
    assert store.versions(model) == [1, 2]
    assert model in store.models()
    third = blob(model, 3.0)
    published = store.publish(model, {"main": third})
    assert sample(store.registry, "streamrec_params_version", model=model) == published
    assert sample(store.registry, "streamrec_params_publish_bytes", model=model) == len(third)
    assert sample(store.registry, "streamrec_params_publish_seconds_count", model=model) == 3


def test_unknown_model_is_a_clear_error(store: ParamStore, model: str) -> None:
    with pytest.raises(ModelNotFound, match=model):
        store.latest_parts(model)
    assert store.head(model) is None and store.versions(model) == []


def test_publish_refuses_bad_blobs_and_names(store: ParamStore, model: str) -> None:
    with pytest.raises(ParamError, match="bad magic"):
        store.publish(model, {"main": b"not a blob"})
    with pytest.raises(ParamError, match="encoded for model 'other'"):
        store.publish(model, {"main": blob("other", 1.0)})
    with pytest.raises(ValueError, match="part name"):
        store.publish(model, {"a:b": blob(model, 1.0)})
    with pytest.raises(ValueError, match="model name"):
        store.publish("bad{tag}", {"main": blob("bad{tag}", 1.0)})
    with pytest.raises(ValueError, match="at least one part"):
        store.publish(model, {})
    assert store.current_version(model) is None


def test_processes_publishing_different_parts_combine(
    redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    first = ParamStore(redis_client, keys=keyspace, blob_ttl_s=60)
    second = ParamStore(redis_client, keys=keyspace, blob_ttl_s=60)
    first.publish(model, {"p0": blob(model, 1.0, partition=0, offset=10)})
    second.publish(model, {"p1": blob(model, 5.0, partition=1, offset=20)})
    version = first.publish(model, {"p0": blob(model, 2.0, partition=0, offset=11)})
    assert version == 3
    manifest = first.manifest(model, version)
    assert sorted(manifest) == ["p0", "p1"]
    assert manifest["p1"] == first.manifest(model, 2)["p1"]  # p1 was not republished
    replaced = first.manifest(model, 2)["p0"]
    assert replaced != manifest["p0"]
    # Version 2 is still kept, so the blob it names stays, without a TTL.
    assert redis_client.pttl(replaced) == -1
    assert redis_client.pttl(manifest["p0"]) == -1 and redis_client.pttl(manifest["p1"]) == -1

    read_version, parts = second.latest_parts(model)
    assert read_version == 3 and sorted(parts) == ["p0", "p1"]
    assert parts["p0"].arrays["x"][0] == 2.0 and parts["p1"].arrays["x"][0] == 5.0

    def total(states: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        return {"x": sum(s["x"] for s in states), "n": sum(s["n"] for s in states)}

    _, header, arrays = second.latest(model, combine=total)
    np.testing.assert_array_equal(arrays["x"], np.full(4, 7.0))
    assert header["offsets"] == {"feedback": {0: 11, 1: 20}}
    with pytest.raises(ParamError, match="pass combine="):
        second.latest(model)


def test_old_manifests_are_pruned(
    store: ParamStore, redis_client: redis.Redis, keyspace: KeySpace, model: str
) -> None:
    small = ParamStore(redis_client, keys=keyspace, keep_versions=3)
    for value in range(6):
        small.publish(model, {"main": blob(model, float(value))})
    assert small.versions(model) == [4, 5, 6]
    assert small.manifest(model, 3) == {}
    # A store that keeps fewer versions prunes the whole older run.
    ParamStore(redis_client, keys=keyspace, keep_versions=1).publish(
        model, {"main": blob(model, 9.0)}
    )
    assert store.versions(model) == [7]


def test_reader_never_sees_half_a_version(store: ParamStore, model: str) -> None:
    publishes = 150
    seen: list[int] = []
    mixed: list[tuple[int, dict[str, float]]] = []
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                version, parts = store.latest_parts(model)
            except ModelNotFound:
                continue
            values = {name: float(p.arrays["x"][0]) for name, p in parts.items()}
            tags = {name: p.meta["v"] for name, p in parts.items()}
            if len(set(values.values())) != 1 or set(tags.values()) != {values["a"]}:
                mixed.append((version, values))
            seen.append(version)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for v in range(1, publishes + 1):
            store.publish(
                model,
                {
                    "a": blob(model, float(v), v=float(v)),
                    "b": blob(model, float(v), v=float(v)),
                },
            )
    finally:
        done.set()
        reader.join()
    assert mixed == []
    assert len(set(seen)) > 1  # the reader really ran while versions changed
    assert seen == sorted(seen)  # one reader never goes back in time
    assert store.latest_parts(model)[0] == publishes


def test_a_flipped_byte_is_detected(
    store: ParamStore, redis_client: redis.Redis, model: str
) -> None:
    version = store.publish(model, {"p0": blob(model, 1.0), "p1": blob(model, 2.0)})
    key = store.manifest(model, version)["p1"]
    corrupted = bytearray(redis_client.get(key))
    corrupted[-3] ^= 0x01
    redis_client.set(key, bytes(corrupted))
    with pytest.raises(ParamError, match=rf"model '{model}' part 'p1' v{version}: checksum"):
        store.latest_parts(model)
    redis_client.delete(key)
    with pytest.raises(ParamError, match="blob is missing"):
        store.latest_parts(model)


def test_linucb_split_across_partitions_merges_to_one_learner(
    store: ParamStore, model: str
) -> None:
    rng = np.random.default_rng(7)
    items = rng.integers(0, 6, size=120)
    X = rng.normal(size=(120, 3))
    rewards = (rng.random(120) < 0.3).astype(float)
    whole = LinUCB(dim=3, alpha=0.5, seed=1)
    whole.update(items, X, rewards)
    halves = []
    for partition, rows in enumerate((slice(0, 50), slice(50, 120))):
        learner = LinUCB(dim=3, alpha=0.5, seed=1)
        learner.update(items[rows], X[rows], rewards[rows])
        halves.append(learner)
        store.publish(
            model,
            {
                f"p{partition}": encode_params(
                    model,
                    1,
                    learner.state(),
                    offsets={"feedback": {partition: rows.stop}},
                    meta={"learner": "linucb"},
                )
            },
        )
    version, header, arrays = store.latest(model, combine=LinUCB.merge)
    assert version == 2 and header["meta"] == {"learner": "linucb"}
    assert header["offsets"] == {"feedback": {0: 50, 1: 120}}
    expected = whole.state()
    assert sorted(arrays) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(arrays[name], value, rtol=1e-12, err_msg=name)
    merged = learner_from_params(version, header, arrays, seed=1)
    probe = rng.normal(size=(6, 3))
    np.testing.assert_allclose(
        merged.score(np.arange(6), probe), whole.score(np.arange(6), probe), rtol=1e-9
    )


def test_watcher_swaps_in_new_versions(store: ParamStore, model: str) -> None:
    registry = CollectorRegistry()
    with ParamWatcher(store, model, poll_interval_s=0.05, registry=registry) as watcher:
        with pytest.raises(ModelNotFound, match="no version loaded yet"):
            watcher.current()
        store.publish(model, {"main": blob(model, 1.0)})
        version, (header, arrays) = watcher.wait_ready(timeout=30)
        assert version == 1 and arrays["x"][0] == 1.0 and header["version"] == 1
        for value in (2.0, 3.0):
            published = store.publish(model, {"main": blob(model, value)})
            assert watcher.wait_for_version(published, timeout=30)
            version, (header, arrays) = watcher.current()
            assert version == published and arrays["x"][0] == value
        assert sample(registry, "streamrec_params_reader_version", model=model) == 3
        assert sample(registry, "streamrec_params_reader_stale", model=model) == 0
        age = sample(registry, "streamrec_params_reader_age_seconds", model=model)
        assert age is not None and age >= 0


def test_watched_learner_is_built_from_its_parts(store: ParamStore, model: str) -> None:
    learner = LinUCB(dim=2, seed=0)
    learner.update(np.array([4, 5]), np.eye(2), np.array([1.0, 0.0]))
    state = encode_params(model, 1, learner.state(), meta={"learner": "linucb"})
    store.publish(model, {"p0": state})
    with watch_learner(store, model, "linucb", poll_interval_s=0.05) as watcher:
        version, served = watcher.wait_ready(timeout=30)
    assert version == 1 and isinstance(served, LinUCB)
    assert served.state()["items"].tolist() == [4, 5]


def test_watcher_keeps_last_good_version_on_corrupt_blob(
    store: ParamStore, redis_client: redis.Redis, model: str
) -> None:
    registry = CollectorRegistry()
    errors = "streamrec_params_reader_errors_total"
    store.publish(model, {"main": blob(model, 1.0)})
    # The poller refreshes once at start; after that this test drives refresh() itself.
    with ParamWatcher(store, model, poll_interval_s=3600, registry=registry) as watcher:
        assert watcher.wait_ready(timeout=30)[0] == 1
        bad = store.publish(model, {"main": blob(model, 2.0)})
        key = store.manifest(model, bad)["main"]
        raw = bytearray(redis_client.get(key))
        raw[-1] ^= 0xFF
        redis_client.set(key, bytes(raw))
        assert watcher.refresh() is False
        assert watcher.stale and watcher.current()[0] == 1
        assert sample(registry, errors, model=model, reason="corrupt") == 1
        assert sample(registry, "streamrec_params_reader_stale", model=model) == 1
        # A refused version is not fetched again while it stays current.
        assert watcher.refresh() is False
        assert sample(registry, errors, model=model, reason="corrupt") == 1
        assert watcher.stale
        good = store.publish(model, {"main": blob(model, 3.0)})
        assert watcher.refresh() is True
        assert watcher.current()[0] == good and not watcher.stale
        assert sample(registry, "streamrec_params_reader_stale", model=model) == 0


def test_watcher_survives_redis_going_away(tmp_path: Path, model: str) -> None:
    server = start_redis(tmp_path / "redis")
    # Few, short retries: the test need not wait out redis-py's default backoff.
    client = redis.Redis.from_url(
        server.url, socket_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.1), 2)
    )
    store = ParamStore(client, keys=KeySpace("outage"))
    registry = CollectorRegistry()
    watcher = ParamWatcher(store, model, poll_interval_s=0.05, registry=registry)
    try:
        store.publish(model, {"main": blob(model, 1.0)})
        assert watcher.wait_ready(timeout=30)[0] == 1
        server.stop()
        assert eventually(lambda: watcher.stale)
        version, (_, arrays) = watcher.current()
        assert version == 1 and arrays["x"][0] == 1.0
        assert sample(registry, "streamrec_params_reader_stale", model=model) == 1
        assert sample(registry, "streamrec_params_reader_errors_total", model=model, reason="redis")

        # A fresh server without the old data counts versions from 1 again: the
        # watcher must still notice that this v1 is not the v1 it serves.
        server = start_redis(tmp_path / "redis", port=server.port)
        assert store.publish(model, {"main": blob(model, 2.0)}) == 1
        assert eventually(lambda: watcher.current()[1][1]["x"][0] == 2.0)
        assert eventually(lambda: not watcher.stale)
        assert sample(registry, "streamrec_params_reader_stale", model=model) == 0
        assert store.publish(model, {"main": blob(model, 3.0)}) == 2
        assert watcher.wait_for_version(2, timeout=30)
    finally:
        watcher.close()
        client.close()
        server.stop()


def test_store_from_settings_uses_their_namespace(redis_url: str, keyspace: KeySpace) -> None:
    settings = RedisSettings(url=redis_url, namespace=keyspace.namespace)
    with ParamStore.from_settings(settings) as store:
        store.publish("drn", {"main": blob("drn", 4.0)})
    with ParamStore.from_url(redis_url, keys=keyspace) as reader:
        assert reader.models() == ["drn"]
        assert reader.latest("drn")[2]["x"][0] == 4.0
