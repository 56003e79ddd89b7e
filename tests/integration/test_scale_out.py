"""Scale-out on the real engines: a 3-broker Apache Kafka cluster and a 3-master Redis Cluster.

Topics are replicated 3 times with ``min.insync.replicas=2`` and every producer
uses ``acks=all``, so losing one broker loses no acknowledged record. The
joiner and two bandits processes keep their checkpoints and publish their
parameters in the Redis Cluster (through a ``redis+cluster://`` URL). One broker
is SIGKILLed mid-stream and started again: every click must still be rewarded
exactly once, and the published LinUCB model must equal a single LinUCB fed the
uninterrupted join of the same events, within 1e-9.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kafka import KafkaConsumer, TopicPartition

from contracts.events import Feedback, decode_feedback
from contracts.keys import KeySpace
from services.common.clients import redis_from_url
from services.common.runtime import SEQ_HEADER, SOURCE_HEADER
from services.common.topics import ensure_topics
from services.paramstore import ParamStore
from services.stack.kafka import EmbeddedKafka, start_cluster
from services.stack.redis_cluster import EmbeddedRedisCluster, start_redis_cluster
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import (
    SlateProducer,
    _applied,
    _assert_same_model,
    _env,
    _join_reference,
    _published,
    _reference,
    _slates,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def kafka_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    cluster = start_cluster(tmp_path_factory.mktemp("kafka-cluster"), nodes=3)
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    cluster = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=3)
    try:
        yield cluster
    finally:
        cluster.stop()


def _deduplicated(bootstrap: str, topic: str) -> list[Feedback]:
    """The feedback topic as a consumer applies it: re-emissions (a source's sequence
    number at or below one already seen) dropped."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5000)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    last: dict[tuple[int, bytes], int] = {}
    applied = []
    for record in consumer:
        headers = dict(record.headers)
        mark, seq = (record.partition, headers[SOURCE_HEADER]), int(headers[SEQ_HEADER])
        if seq > last.get(mark, -1):
            last[mark] = seq
            applied.append(decode_feedback(record.value))
    consumer.close()
    return applied


def test_a_broker_killed_under_two_bandits_and_the_joiner_changes_nothing(
    kafka_cluster, redis_cluster, unique_name, tmp_path
):
    bootstrap = kafka_cluster.bootstrap
    topics = {
        "impressions": unique_name("impressions"),
        "clicks": unique_name("clicks"),
        "feedback": unique_name("feedback"),
        "dead_letter": unique_name("dlq"),
    }
    ensure_topics(
        {"bootstrap_servers": bootstrap},
        {name: 1 if role == "dead_letter" else 4 for role, name in topics.items()},
        replication_factor=3,
        configs={"min.insync.replicas": "2"},
    )
    keys = KeySpace(unique_name("scale"))
    group = unique_name("loop")
    env = _env(bootstrap, redis_cluster.url, keys, group, **topics) | {
        "STREAMREC_JOINER_WINDOW_S": "2",
        "STREAMREC_JOINER_LATENESS_S": "3",
        "STREAMREC_JOINER_IDLE_CLOSE_S": "10",
    }
    client = redis_from_url(redis_cluster.url)
    store = ParamStore(client, keys=keys)
    impressions, clicks = _slates(20_000, seed=21)
    slates = SlateProducer(bootstrap, topics, impressions, clicks, rate=2500)
    processes = [
        ServiceProcess("joiner", env, tmp_path / "joiner.log"),
        ServiceProcess("bandits", env, tmp_path / "bandits-1.log"),
        ServiceProcess("bandits", env, tmp_path / "bandits-2.log"),
    ]
    try:
        for process in processes:
            process.start()
        slates.start()
        wait_for(lambda: _applied(store) > 2_000, 120, "feedback flowing before the kill")
        kafka_cluster.kill_node(1)
        killed_at = _applied(store)
        time.sleep(5.0)
        kafka_cluster.start_node(1)
        expected = _join_reference(impressions, clicks, 4, slates.join())
        wait_for(lambda: _applied(store) == len(expected), 180, "all feedback applied")
        time.sleep(2.0)  # a double application would show in later publishes
        assert _applied(store) == len(expected)
        header, arrays = _published(store)
        assert len(header["parts"]) == 4
        _assert_same_model(arrays, _reference(expected))
        assert all(process.alive() for process in processes)
    finally:
        for process in processes:
            if process.popen is not None:
                process.stop()
        client.close()
    assert killed_at < len(expected) // 2, "the kill must land mid-stream"
    rewarded = sorted(f.feedback_id for f in expected if f.reward)
    assert sum(f.reward for f in expected) > 500
    logged = _deduplicated(bootstrap, topics["feedback"])
    assert sorted(f.feedback_id for f in logged if f.reward) == rewarded, (
        "every click rewarded exactly once in the feedback consumers apply"
    )
    assert len(logged) == len(expected)
    logs = [(tmp_path / name).read_text() for name in ("bandits-1.log", "bandits-2.log")]
    assert all("assigned partitions [" in text for text in logs), "both bandits owned partitions"
