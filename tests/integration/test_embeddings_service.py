"""The embeddings service against the real broker and Redis: clicks in, answering snapshots out."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import redis
import torch
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from contracts.events import Click, encode
from contracts.keys import KeySpace
from contracts.params import decode_params
from services.common.runtime import ConsumerRuntime
from services.common.service import build_runtime
from services.common.settings import KafkaSettings, RedisSettings, TopicSettings
from services.embeddings.service import SPEC, EmbeddingsSettings, ItemStats
from services.index import ReloadableIndex, read_pointer
from services.simulator import World, WorldConfig
from tests.integration.processes import ServiceProcess

pytestmark = pytest.mark.integration
torch.set_num_threads(1)

TS = 1.7e9
WORLD = WorldConfig(n_users=200, n_items=120, n_topics=6, topic_spread=0.4)


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def produce_sessions(bootstrap: str, topic: str, world: World, users: int, start: int) -> set[str]:
    """Each user's session of 12 clicks, in time order; returns the items clicked."""
    rng = np.random.default_rng(start)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    items: set[str] = set()
    for n in range(users):
        user = f"u{(start + n) % WORLD.n_users}"
        for position, item in enumerate(world.sample_session(user, 12, rng=rng)):
            click = Click(
                event_id=f"e{start}-{n}-{position}",
                user_id=user,
                item_id=item,
                ts=TS + start + n + position / 100,
            )
            producer.send(topic, key=user.encode(), value=encode(click))
            items.add(item)
    producer.flush()
    producer.close()
    return items


class Running:
    """An embeddings runtime on a thread, stopped (and its last snapshot published) on exit."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime
        self.thread = threading.Thread(target=runtime.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.runtime.stop()
        self.thread.join(60)
        self.runtime.processor.close()  # type: ignore[attr-defined]


def test_publishes_snapshots_whose_index_answers_and_resumes_after_restart(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    topics = TopicSettings(clicks=topic_factory("clicks", partitions=2))
    world = World(WORLD, seed=3)
    clicked = produce_sessions(kafka_bootstrap, topics.clicks, world, users=150, start=0)
    settings = EmbeddingsSettings(
        group=unique_name("embeddings"),
        snapshot_dir=tmp_path / "snapshots",
        publish_interval_s=0.5,
        dim=16,
        window=4,
        lr=0.05,
    )

    def start() -> Running:
        return Running(
            build_runtime(
                SPEC,
                CollectorRegistry(),
                settings,
                kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
                redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
                topics=topics,
            )
        )

    key = keyspace.index_current("items")
    catalog = keyspace
    running = start()
    try:
        processor = running.runtime.processor
        wait_until(lambda: len(processor.stats.first_seen) == len(clicked), 60, "every click")
        wait_until(lambda: read_pointer(redis_client, key) is not None, 60, "a first snapshot")
    finally:
        running.stop()

    # The graceful stop checkpointed and published the last snapshot: it holds every item.
    first = read_pointer(redis_client, key)
    assert first is not None
    with ReloadableIndex(redis_client, key, poll_interval=0.1) as index:
        assert index.wait_for_version(first.version, timeout=30)
        snapshot = index.current
        assert set(snapshot.item_ids) == clicked
        assert snapshot.manifest.dimension == settings.dim and snapshot.manifest.kind == "flat"
        # The index answers: each item's own (normalised) vector finds itself first.
        probe = list(snapshot.item_ids[:20])
        vectors, known = snapshot.vectors(probe)
        assert known.all()
        ids, scores = index.search(vectors, 5)
        assert [row[0] for row in ids] == probe
        np.testing.assert_allclose(scores[:, 0], 1.0, rtol=1e-4)

    # Popular and fresh lists for serving's cold starts, best first.
    popular = redis_client.zrevrange(catalog.catalog_popular(), 0, -1, withscores=True)
    fresh = redis_client.zrevrange(catalog.catalog_fresh(), 0, -1)
    assert 0 < len(popular) <= settings.popular_n and 0 < len(fresh) <= settings.fresh_n
    assert {item.decode() for item, _ in popular} <= clicked
    assert {item.decode() for item in fresh} <= clicked

    learned = processor.model.state()["counts"].sum()

    # Restart: the model comes back from the checkpoint, and new clicks publish a newer version.
    later = produce_sessions(kafka_bootstrap, topics.clicks, world, users=40, start=1000)
    running = start()
    try:
        restarted = running.runtime.processor
        wait_until(lambda: restarted.stats.latest >= TS + 1000, 60, "the new clicks")
        # Restored, not relearned: the first run's counts and first-click times are there.
        assert restarted.model.state()["counts"].sum() > learned
        assert min(restarted.stats.first_seen.values()) < TS + 1000
    finally:
        running.stop()
    second = read_pointer(redis_client, key)
    assert second is not None and second.version > first.version
    with ReloadableIndex(redis_client, key, poll_interval=0.1) as index:
        assert index.wait_for_version(second.version, timeout=30)
        assert set(index.current.item_ids) == clicked | later


def test_item_stats_decay_rebase_and_round_trip() -> None:
    stats = ItemStats(half_life_s=1.0)
    stats.add("old", 0.0)
    # 600 half-lives later the weights would overflow without a rebase.
    stats.add("new", 600.0)
    stats.add("new", 600.0)
    top = stats.popular(5)
    assert list(top) == ["new", "old"]
    assert top["new"] == pytest.approx(2.0) and top["old"] == pytest.approx(2.0**-600)
    assert stats.fresh(5, window_s=10.0) == {"new": 600.0}
    clone = ItemStats.from_state(stats.state(), half_life_s=1.0)
    assert clone.popular(5) == top and clone.first_seen == stats.first_seen


def test_sigkill_mid_stream_neither_loses_nor_double_counts_a_click(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Kill -9 the service mid-stream and restart it: every click counts once.

    The popularity statistics are per click and travel in the checkpoint with the
    offsets, so they show exactly-once: with a half-life far beyond the stream's
    span each item's score is its click count (to 1e-6); a lost click or one
    applied twice moves some score by 1. (Which pairs the skip-gram trains on
    depends on in-memory click windows, which a restart starts afresh.)
    """
    n = 24_000
    clicks_topic = topic_factory("clicks", partitions=2)
    dead_letter = topic_factory("dlq")
    group = unique_name("embeddings")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": keyspace.namespace,
        "STREAMREC_TOPIC_CLICKS": clicks_topic,
        "STREAMREC_TOPIC_DEAD_LETTER": dead_letter,
        "STREAMREC_EMBEDDINGS_GROUP": group,
        "STREAMREC_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
        "STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S": "0.5",
        "STREAMREC_EMBEDDINGS_DIM": "8",
        "STREAMREC_EMBEDDINGS_POPULARITY_HALF_LIFE_S": "1e12",
    }
    rng = np.random.default_rng(5)
    users = rng.integers(0, 400, n)
    items = rng.zipf(1.3, n) % 300
    expected = np.bincount(items, minlength=300)

    def produce() -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        started = time.monotonic()
        for i in range(n):
            click = Click(
                event_id=f"e{i}", user_id=f"u{users[i]}", item_id=f"i{items[i]}", ts=TS + i / 1000
            )
            producer.send(clicks_topic, key=click.user_id.encode(), value=encode(click))
            if i % 500 == 0:  # about 3,000 clicks/s
                time.sleep(max(0.0, started + i / 3000 - time.monotonic()))
        producer.flush()
        producer.close()

    def consumed() -> int:
        total = 0
        for partition in (0, 1):
            raw = redis_client.hget(keyspace.checkpoint(group, partition), "offsets")
            total += json.loads(raw).get(clicks_topic, 0) if raw else 0
        return total

    thread = threading.Thread(target=produce)
    thread.start()
    service = ServiceProcess("embeddings", env, tmp_path / "embeddings.log").start()
    try:
        wait_until(lambda: consumed() > 2_000, 90, "checkpointed progress before the kill")
        service.kill()
        killed_at = consumed()
        service.start()
        thread.join()
        assert killed_at < n // 2, "the kill must land mid-stream"
        wait_until(lambda: consumed() == n, 120, "every click consumed")
    finally:
        thread.join()
        service.stop()

    owner = min(p for p in (0, 1) if redis_client.hget(keyspace.checkpoint(group, p), "state"))
    arrays = decode_params(redis_client.hget(keyspace.checkpoint(group, owner), "state")).arrays
    stats = ItemStats.from_state(
        {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("stats/")}, 1e12
    )
    scores = {item: stats.scores.get(f"i{item}", 0.0) for item in range(300)}
    np.testing.assert_allclose([scores[i] for i in range(300)], expected, rtol=1e-6)
    assert "restored" in (tmp_path / "embeddings.log").read_text()


def test_a_flood_of_distinct_items_keeps_the_snapshot_and_the_lists_bounded_and_consistent(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """Issue 11: 20,000 invented item ids against a 500-item cap, then real sessions.

    The published index, the popular and fresh lists and the checkpoint must all
    stay within the cap, and the lists must only name items the index holds.
    """
    cap = 500
    topics = TopicSettings(clicks=topic_factory("clicks", partitions=2))
    settings = EmbeddingsSettings(
        group=unique_name("embeddings"),
        snapshot_dir=tmp_path / "snapshots",
        publish_interval_s=0.5,
        dim=8,
        max_items=cap,
        popular_n=cap,
        fresh_n=cap,
        fresh_window_s=1e9,
    )
    registry = CollectorRegistry()
    running = Running(
        build_runtime(
            SPEC,
            registry,
            settings,
            kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
            redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
            topics=topics,
        )
    )
    try:
        processor = running.runtime.processor
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        for n in range(20_000):
            bot = f"bot{n % 50}"
            click = Click(event_id=f"f{n}", user_id=bot, item_id=f"spam-{n}", ts=TS + n / 100)
            producer.send(topics.clicks, key=bot.encode(), value=encode(click))
        producer.flush()
        producer.close()

        def flooded() -> float:
            evicted = registry.get_sample_value("streamrec_embeddings_evicted_items_total")
            return (evicted or 0.0) + len(processor.model)

        # Every invented id seen (each distinct: held or forgotten) before the real clicks.
        wait_until(lambda: flooded() >= 20_000, 90, "the flood consumed")
        world = World(WORLD, seed=4)
        clicked = produce_sessions(kafka_bootstrap, topics.clicks, world, 60, 10_000)
        wait_until(lambda: processor.stats.latest >= TS + 10_059, 90, "every click")
    finally:
        running.stop()
    forgotten = registry.get_sample_value("streamrec_embeddings_evicted_items_total")
    assert forgotten is not None and forgotten >= 20_000 - cap

    pointer = read_pointer(redis_client, keyspace.index_current("items"))
    assert pointer is not None
    with ReloadableIndex(redis_client, keyspace.index_current("items"), poll_interval=0.1) as index:
        assert index.wait_for_version(pointer.version, timeout=30)
        indexed = set(index.current.item_ids)
    assert len(indexed) <= cap
    assert clicked <= indexed, "the latest real items are the most recently seen: all kept"
    popular = {item.decode() for item in redis_client.zrange(keyspace.catalog_popular(), 0, -1)}
    fresh = {item.decode() for item in redis_client.zrange(keyspace.catalog_fresh(), 0, -1)}
    assert popular and fresh
    assert popular | fresh <= indexed, "the lists name only items the index holds"

    group = settings.group
    owner = min(p for p in (0, 1) if redis_client.hget(keyspace.checkpoint(group, p), "state"))
    arrays = decode_params(redis_client.hget(keyspace.checkpoint(group, owner), "state")).arrays
    model = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("model/")}
    stats = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("stats/")}
    assert len(model["counts"]) == len(stats["score"]) <= cap
