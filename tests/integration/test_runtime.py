"""The consumer runtime against the real broker and Redis: exactly-once, dead letters, lag."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType
from prometheus_client import CollectorRegistry

from contracts.events import MAX_MESSAGE_BYTES, Click, decode_click, encode
from contracts.keys import KeySpace
from services.common import (
    CheckpointStore,
    ConsumerRuntime,
    KafkaSettings,
    RedisSettings,
    RuntimeSettings,
    TopicSettings,
)
from services.common.runtime import SendFailed
from services.common.topics import ensure_topics
from services.stack.kafka import start_broker
from tests.integration.tally_worker import TALLY, TallyProcessor, tally_runtime

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _worker(topic: str, group: str, keys: KeySpace, kafka: str, redis_url: str, log: Path):
    env = os.environ | {"KAFKA_BOOTSTRAP_SERVERS": kafka, "REDIS_URL": redis_url}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.integration.tally_worker", topic, group, keys.namespace],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _tally(client: redis.Redis, keys: KeySpace, group: str, partitions: int) -> tuple[int, int]:
    count = total = 0
    for p in range(partitions):
        state = client.hget(keys.checkpoint(group, p), "state")
        if state:
            c, s = TALLY.unpack(state)
            count, total = count + c, total + s
    return count, total


def _click(i: int, **overrides) -> bytes:
    fields = {
        "event_id": f"e{i}",
        "user_id": f"u{i % 997}",
        "item_id": f"i{i % 50}",
        "ts": 1.7e9 + i / 1000,
    } | overrides
    return encode(Click(**fields))


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_stream_applies_every_event_exactly_once(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name, tmp_path
):
    n = 60_000
    topic = topic_factory("tally", partitions=4)
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {f"{topic}-dlq": 1})
    group = unique_name("tally")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for i in range(n):
        producer.send(topic, key=f"u{i % 997}".encode(), value=_click(i))
    producer.flush()
    producer.close()

    worker = _worker(topic, group, keyspace, kafka_bootstrap, redis_url, tmp_path / "w.log")
    _wait_for(lambda: _tally(redis_client, keyspace, group, 4)[0] > n // 4, 60, "progress")
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed_at = _tally(redis_client, keyspace, group, 4)[0]
    assert 0 < killed_at < n, "the kill must land mid-stream"

    worker = _worker(topic, group, keyspace, kafka_bootstrap, redis_url, tmp_path / "w.log")
    try:
        _wait_for(lambda: _tally(redis_client, keyspace, group, 4)[0] >= n, 90, "all events")
        time.sleep(1.0)  # any double application would show up in later checkpoints
        assert _tally(redis_client, keyspace, group, 4) == (n, n * (n - 1) // 2)
    finally:
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0


def test_poison_records_are_dead_lettered_with_reasons_and_good_ones_flow(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, tmp_path
):
    topic = unique_name("poison")
    dlq = f"{topic}-dlq"
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topic: 1, dlq: 1})
    poison = {
        b'{"event_id": "x", "user_id": "u1", "item_id": "i1", "ts": 1.7e9': "malformed",
        b'{"event_id": 5, "user_id": "u1", "item_id": "i1", "ts": 1.7e9}': "invalid",
        b'{"event_id": "x", "user_id": "u1", "item_id": "i1", "ts": 1e999}': "invalid",
        b'{"event_id": "x", "user_id": "u1", "item_id": "i1", "ts": NaN}': "malformed",
        b'{"schema_version": 9, "event_id": "x", "user_id": "u", "item_id": "i", "ts": 2e9}': (
            "invalid"
        ),
        b'{"event_id": "", "user_id": "u1", "item_id": "i1", "ts": 1.7e9}': "invalid",
        b"\xff\xfe not json at all": "malformed",
        b'{"event_id": "big", "user_id": "u1", "item_id": "'
        + b"i" * MAX_MESSAGE_BYTES
        + b'", "ts": 1.7e9}': "too large",
        _click(10**6, item_id="reject-me"): "unknown item",
    }
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, max_request_size=2**20)
    good = 0
    for i, raw in enumerate(poison):
        producer.send(topic, key=b"k", value=_click(2 * i))
        producer.send(topic, key=b"k", value=raw)
        good += 2 * i
    producer.flush()
    producer.close()

    group = unique_name("poison")
    worker = _worker(topic, group, keyspace, kafka_bootstrap, redis_url, tmp_path / "p.log")
    try:
        _wait_for(
            lambda: _tally(redis_client, keyspace, group, 1)[0] >= len(poison), 60, "good events"
        )
        assert _tally(redis_client, keyspace, group, 1) == (len(poison), good)
        consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=10)
        tp = TopicPartition(dlq, 0)
        consumer.assign([tp])
        consumer.seek_to_beginning(tp)
        dead = []
        deadline = time.monotonic() + 30
        while len(dead) < len(poison) and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                dead.extend(records)
        consumer.close()
        assert worker.poll() is None, "the service must survive poison input"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    assert len(dead) == len(poison)
    for record in dead:
        headers = dict(record.headers)
        assert record.value in poison
        assert headers["streamrec-dlq-reason"].decode().startswith(poison[record.value])
        assert headers["streamrec-dlq-topic"].decode() == topic
        assert (
            int(headers["streamrec-dlq-offset"]) % 2 == 1
        )  # every poison record sat at odd offsets


def test_lag_comes_from_the_fetched_high_watermark_and_reaches_zero(
    kafka_bootstrap, redis_url, keyspace, unique_name
):
    n = 200
    topic = unique_name("lag")
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topic: 1, f"{topic}-dlq": 1})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for i in range(n):
        producer.send(topic, value=_click(i))
    producer.flush()
    producer.close()
    registry = CollectorRegistry()
    processor = TallyProcessor()
    runtime = tally_runtime(
        topic,
        unique_name("lag"),
        processor,
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        settings=RuntimeSettings(max_batch=50, lag_interval_s=1.0),
        registry=registry,
        bootstrap=kafka_bootstrap,
        clock=itertools.count(step=10).__next__,  # every poll is past the lag interval
    )
    labels = {"service": "tally", "topic": topic, "partition": "0"}
    observed = []
    runtime.open()
    try:
        deadline = time.monotonic() + 60
        while processor.tally.get(0, [0])[0] < n and time.monotonic() < deadline:
            if runtime.poll_once():
                lag = registry.get_sample_value("streamrec_consumer_lag_records", labels)
                observed.append((processor.tally[0][0], lag))
    finally:
        runtime.close()
    assert [done for done, _ in observed] == [50, 100, 150, 200]
    assert [lag for _, lag in observed] == [150, 100, 50, 0]


def test_polls_while_the_broker_is_down_are_retried_and_nothing_is_lost(
    redis_url, keyspace, unique_name, tmp_path
):
    """Polling on while the broker is away (its coordinator and partition leader gone)
    and after it is back: the runtime resumes where it was, nothing lost or doubled.
    (When kafka-python's ``poll`` raises a connection error meanwhile, the runtime
    counts it and polls again: tests/unit/test_runtime_harness.py.)"""
    broker = start_broker(tmp_path / "broker")
    topic = unique_name("outage")
    ensure_topics({"bootstrap_servers": broker.bootstrap}, {topic: 1, f"{topic}-dlq": 1})

    def produce(numbers: range) -> None:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)
        for i in numbers:
            producer.send(topic, value=_click(i))
        producer.flush()
        producer.close()

    registry = CollectorRegistry()
    processor = TallyProcessor()
    runtime = tally_runtime(
        topic,
        unique_name("outage"),
        processor,
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        settings=RuntimeSettings(max_batch=100, checkpoint_interval_s=0.2),
        registry=registry,
        bootstrap=broker.bootstrap,
    )
    try:
        produce(range(500))
        runtime.open()
        deadline = time.monotonic() + 60
        while processor.tally.get(0, [0])[0] < 500 and time.monotonic() < deadline:
            runtime.poll_once()
        broker.stop_node(0)
        outage = time.monotonic() + 12  # longer than a session: the coordinator is gone too
        while time.monotonic() < outage:
            runtime.poll_once()
        broker.start_node(0)
        produce(range(500, 1000))
        deadline = time.monotonic() + 90
        while processor.tally.get(0, [0])[0] < 1000 and time.monotonic() < deadline:
            runtime.poll_once()
        assert processor.tally[0] == [1000, 1000 * 999 // 2]
    finally:
        runtime.close()
        broker.stop()


def test_output_kafka_did_not_acknowledge_is_never_checkpointed_past(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name
):
    """Dead letters go to a topic whose ``max.message.bytes`` is too small for them, so
    Kafka refuses them. The runtime must not checkpoint the offsets of the records
    that produced them: it fails loudly (:class:`SendFailed`), and once the topic is
    fixed a restart re-reads them and every dead letter arrives."""
    topic, group = unique_name("unacked"), unique_name("unacked")
    dlq = f"{topic}-dlq"
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topic: 1})
    ensure_topics(
        {"bootstrap_servers": kafka_bootstrap}, {dlq: 1}, configs={"max.message.bytes": "64"}
    )
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(20):
        producer.send(topic, value=_click(i, item_id="reject-me") if i % 4 == 0 else _click(i))
    producer.flush()
    producer.close()
    redis_settings = RedisSettings(url=redis_url, namespace=keyspace.namespace)

    def runtime() -> ConsumerRuntime:
        made = ConsumerRuntime(
            service="tally",
            group=group,
            inputs={topic: decode_click},
            processor=TallyProcessor(),
            kafka=KafkaSettings(
                bootstrap_servers=kafka_bootstrap,
                delivery_timeout_ms=3000,
                request_timeout_ms=2000,
            ),
            redis_settings=redis_settings,
            topics=TopicSettings(dead_letter=dlq),
            settings=RuntimeSettings(checkpoint_interval_s=3600),
            registry=CollectorRegistry(),
        )
        made.open()
        return made

    first = runtime()
    deadline = time.monotonic() + 60
    while first.processor.tally.get(0, [0])[0] < 15 and time.monotonic() < deadline:
        first.poll_once()
    with pytest.raises(SendFailed, match="5 records were not acknowledged"):
        first.checkpoint(force=True)
    first._failed = True  # what run() sets when the loop raises: close() skips the checkpoint
    first.close()
    assert CheckpointStore(redis_client, keyspace, group).load([0]) == {}, "nothing checkpointed"

    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.alter_configs(
        [ConfigResource(ConfigResourceType.TOPIC, dlq, configs={"max.message.bytes": "1048588"})]
    )
    admin.close()
    second = runtime()
    deadline = time.monotonic() + 60
    while second.processor.tally.get(0, [0])[0] < 15 and time.monotonic() < deadline:
        second.poll_once()
    assert second.checkpoint(force=True)
    second.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, consumer_timeout_ms=3000)
    consumer.assign([TopicPartition(dlq, 0)])
    consumer.seek_to_beginning()
    offsets = sorted(int(dict(r.headers)["streamrec-dlq-offset"]) for r in consumer)
    consumer.close()
    assert offsets == [0, 4, 8, 12, 16], "every dead letter arrived once the topic was fixed"


def test_output_pending_when_the_broker_dies_for_good_fails_the_checkpoint_within_the_bound(
    redis_url, redis_client, keyspace, unique_name, tmp_path
):
    """The processor emits after the broker was SIGKILLed for good. The checkpoint must
    neither hang on that output (a batch whose leader is gone may never expire inside
    kafka-python, so an unbounded flush never returns) nor record the input behind it:
    it raises :class:`SendFailed` within the delivery timeout, so the process exits and
    its supervisor restarts it."""
    broker = start_broker(tmp_path / "broker")
    topic, group = unique_name("gone"), unique_name("gone")
    dlq = f"{topic}-dlq"
    ensure_topics({"bootstrap_servers": broker.bootstrap}, {topic: 1, dlq: 1})
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(20):
        producer.send(topic, value=b"not json" if i % 2 else _click(i))
    producer.flush()
    producer.close()
    runtime = ConsumerRuntime(
        service="tally",
        group=group,
        inputs={topic: decode_click},
        processor=TallyProcessor(),
        kafka=KafkaSettings(
            bootstrap_servers=broker.bootstrap,
            delivery_timeout_ms=3000,
            request_timeout_ms=2000,
        ),
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        topics=TopicSettings(dead_letter=dlq),
        settings=RuntimeSettings(checkpoint_interval_s=3600),
        registry=CollectorRegistry(),
    )
    outcome: list[BaseException | bool] = []
    try:
        runtime.open()
        deadline = time.monotonic() + 60
        while runtime.processor.tally.get(0, [0])[0] < 10 and time.monotonic() < deadline:
            runtime.poll_once()
        broker.kill_node(0)
        runtime.ctx.emit(dlq, b"late", key=None, source_partition=0)

        def checkpoint() -> None:
            try:
                outcome.append(runtime.checkpoint(force=True))
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=checkpoint, daemon=True)
        started = time.monotonic()
        worker.start()
        worker.join(60)
        assert not worker.is_alive(), "the checkpoint hung on output the broker never took"
        assert time.monotonic() - started < 3 + 5 + 5  # delivery timeout + margin + slack
        assert len(outcome) == 1 and isinstance(outcome[0], SendFailed), outcome
        assert CheckpointStore(redis_client, keyspace, group).load([0]) == {}
    finally:
        runtime._failed = True  # what run() sets when the loop raised: no checkpoint on close
        broker.stop()


def test_a_rebalance_slower_than_one_poll_still_completes_and_keeps_the_partitions(
    kafka_bootstrap, redis_url, keyspace, unique_name
):
    """Every group rebalances once right after its first join (the leader's topic
    metadata changes). With polls far shorter than a join round trip, as on a busy
    machine, kafka-python 3.0 used to stop awaiting that join: the member kept no
    partitions, sent no heartbeats and was dropped from the group for good (3 of 4
    groups on this machine). Each group here must end owning every partition."""
    owned = []
    for trial in range(3):
        topic = unique_name("slowjoin")
        ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topic: 4, f"{topic}-dlq": 1})
        runtime = tally_runtime(
            topic,
            unique_name("slowjoin"),
            TallyProcessor(),
            redis_settings=RedisSettings(url=redis_url, namespace=f"{keyspace.namespace}{trial}"),
            settings=RuntimeSettings(poll_timeout_ms=1),
            registry=CollectorRegistry(),
            bootstrap=kafka_bootstrap,
        )
        runtime.open()
        try:
            end = time.monotonic() + 10  # past the 3 s session of a member that stopped
            while time.monotonic() < end:
                runtime.poll_once()
            owned.append(sorted(runtime._owned))
        finally:
            runtime.close()
    assert owned == [[0, 1, 2, 3]] * 3


def test_records_deleted_before_they_were_read_are_counted_and_skipped_on_the_real_broker(
    kafka_bootstrap, redis_url, keyspace, unique_name
):
    """Retention (here ``DeleteRecords``) moves the log start past a checkpoint: the
    runtime resumes at the log start and counts the records it never saw, instead of
    kafka-python resetting silently."""
    topic, group = unique_name("retention"), unique_name("retention")
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topic: 1, f"{topic}-dlq": 1})

    def produce(numbers: range) -> None:
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
        for i in numbers:
            producer.send(topic, value=_click(i))
        producer.flush()
        producer.close()

    def tally() -> tuple[ConsumerRuntime, TallyProcessor]:
        processor = TallyProcessor()
        runtime = tally_runtime(
            topic,
            group,
            processor,
            redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
            settings=RuntimeSettings(max_batch=100),
            registry=CollectorRegistry(),
            bootstrap=kafka_bootstrap,
        )
        runtime.open()
        return runtime, processor

    produce(range(100))
    first, processor = tally()
    deadline = time.monotonic() + 60
    while processor.tally.get(0, [0])[0] < 100 and time.monotonic() < deadline:
        first.poll_once()
    first.close()
    produce(range(100, 200))
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.delete_records({TopicPartition(topic, 0): 150})
    admin.close()
    second, processor = tally()
    deadline = time.monotonic() + 60
    while processor.tally.get(0, [0])[0] < 150 and time.monotonic() < deadline:
        second.poll_once()
    try:
        assert processor.tally[0] == [150, sum(range(100)) + sum(range(150, 200))]
        labels = {"service": "tally", "topic": topic}
        skipped = second.registry.get_sample_value(
            "streamrec_consumer_records_skipped_total", labels
        )
        assert skipped == 50
    finally:
        second.close()
