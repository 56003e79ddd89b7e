"""Faults with real processes: a frozen consumer, a Redis restart, a broker stopped or killed.

Kill -9 of the joiner, bandits, sequences, embeddings and DRN services is covered
next to each service (test_bandit_loop, test_sequences, test_embeddings_service,
test_drn_service). What is left is
what happens *around* a consumer: a process frozen past its session timeout
while another one of its group takes over, the state store going away and
coming back, and the broker going away and coming back.

The reference for every check is the single-process LinUCB model computed
in-process from the same feedback (see test_bandit_loop): the published model
must equal it within 1e-9, so a lost or a double-applied event fails the test.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from pathlib import Path

import pytest
import redis
from kafka import KafkaConsumer, TopicPartition

from contracts.events import decode_feedback
from contracts.keys import KeySpace
from services.common.topics import ensure_topics
from services.paramstore import ModelNotFound, ParamStore
from services.serving.policies import watch_learner
from services.stack.kafka import start_broker
from services.stack.servers import start_redis
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import (
    _applied,
    _assert_same_model,
    _env,
    _feedback_stream,
    _produce,
    _published,
    _reference,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _topic_names(unique_name) -> dict[str, str]:
    return {
        "feedback": unique_name("feedback"),
        "dead_letter": unique_name("dlq"),
        "impressions": unique_name("impressions"),
        "clicks": unique_name("clicks"),
    }


def _create(bootstrap: str, topics: dict[str, str]) -> None:
    ensure_topics(
        {"bootstrap_servers": bootstrap},
        {t: 1 if k == "dead_letter" else 4 for k, t in topics.items()},
    )


def _assignments(log: Path) -> list[str]:
    """The partition lists a bandits process logged on each assignment, in order."""
    return re.findall(r"assigned partitions \[([0-9, ]*)\]", log.read_text())


def test_a_consumer_frozen_past_its_session_timeout_hands_over_exactly_once(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, tmp_path
):
    """SIGSTOP one of two bandits processes mid-stream; the other takes its partitions.

    When the frozen one resumes it finds itself evicted (its partitions are
    "lost" or its checkpoint fenced) and drops its stale state, then rejoins. A
    publish it had in flight when frozen carries its old ownership epoch and is
    refused, so readers never see a partition's part go back; the final model
    must be exact.
    """
    feedback = _feedback_stream(40_000, seed=11)
    topics = _topic_names(unique_name)
    _create(kafka_bootstrap, topics)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("bandits"), **topics)
    logs = tmp_path / "b1.log", tmp_path / "b2.log"
    first = ServiceProcess("bandits", env, logs[0]).start()
    second = ServiceProcess("bandits", env, logs[1]).start()
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topics["feedback"], feedback, 4000.0)
    )
    sampling = threading.Event()
    samples: list[dict[str, tuple[int, float]]] = []

    def sample() -> None:
        while not sampling.is_set():
            try:
                _, parts = store.latest_parts("linucb")
            except ModelNotFound:
                continue
            samples.append(
                {
                    name: (
                        part.offsets.get(topics["feedback"], {}).get(int(name[1:]), 0),
                        part.arrays["counts"].sum(),
                    )
                    for name, part in parts.items()
                }
            )
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        wait_for(
            lambda: all(_assignments(log) and _assignments(log)[-1] for log in logs),
            60,
            "both processes to own partitions",
        )
        producer.start()
        wait_for(lambda: _applied(store) > 8_000, 60, "progress before the freeze")
        assert first.popen is not None
        first.popen.send_signal(signal.SIGSTOP)
        frozen_at = _applied(store)
        before = [len(_assignments(log)) for log in logs]
        # The session timeout is 3 s: the second process is handed every partition.
        wait_for(
            lambda: (
                len(_assignments(logs[1])) > before[1] and _assignments(logs[1])[-1] == "0, 1, 2, 3"
            ),
            60,
            "the takeover by the second process",
        )
        wait_for(lambda: _applied(store) > frozen_at + 4_000, 60, "progress while frozen")
        first.popen.send_signal(signal.SIGCONT)
        wait_for(lambda: len(_assignments(logs[0])) > before[0], 60, "the frozen one to rejoin")
        producer.join()
        wait_for(lambda: _applied(store) == len(feedback), 120, "all feedback applied")
        time.sleep(2.0)  # a stale checkpoint or a double application shows in later publishes
        assert _applied(store) == len(feedback)
        _assert_same_model(_published(store)[1], _reference(feedback))
        assert first.alive() and second.alive()
    finally:
        sampling.set()
        sampler.join()
        if producer.is_alive():
            producer.join()
        if first.popen is not None:
            first.popen.send_signal(signal.SIGCONT)
        first.stop()
        second.stop()
    assert frozen_at < len(feedback) // 2, "the freeze must land mid-stream"
    for name in samples[-1]:
        seen = [sample[name] for sample in samples if name in sample]
        assert seen == sorted(seen), f"part {name} went back: {seen}"


def test_redis_restart_with_persistence_resumes_and_readers_keep_the_last_params(
    kafka_bootstrap, unique_name, tmp_path
):
    """Stop Redis mid-stream, produce while it is down, start it again on the same port."""
    server = start_redis(tmp_path / "redis", persistence=True)
    port = server.port
    keys = KeySpace(unique_name("faults"))
    client = redis.Redis.from_url(server.url)
    store = ParamStore(client, keys=keys)
    topics = _topic_names(unique_name)
    _create(kafka_bootstrap, topics)
    feedback = _feedback_stream(30_000, seed=12)
    half = len(feedback) // 2
    env = _env(kafka_bootstrap, server.url, keys, unique_name("bandits"), **topics)
    bandits = ServiceProcess("bandits", env, tmp_path / "b.log").start()
    watcher = watch_learner(
        ParamStore(redis.Redis.from_url(server.url), keys=keys), "linucb", "linucb"
    )
    try:
        _produce(kafka_bootstrap, topics["feedback"], feedback[:half])
        wait_for(lambda: _applied(store) == half, 90, "the first half applied")
        wait_for(lambda: watcher.version == store.head("linucb")[0], 10, "the reader on the newest")
        serving_version, serving = watcher.current()
        served_counts = serving.state()["counts"].sum()
        assert served_counts == half

        server.stop()
        _produce(kafka_bootstrap, topics["feedback"], feedback[half:])
        wait_for(lambda: watcher.stale, 10, "the reader to notice Redis is gone")
        time.sleep(3.0)  # the service polls, fails checkpoints, retries
        assert bandits.alive(), "the service must ride out a Redis outage"
        version, value = watcher.current()
        assert version == serving_version
        assert value.state()["counts"].sum() == half

        server = start_redis(tmp_path / "redis", port=port, persistence=True)
        wait_for(lambda: _applied(store) == len(feedback), 90, "all feedback applied")
        time.sleep(1.0)
        assert _applied(store) == len(feedback)
        _assert_same_model(_published(store)[1], _reference(feedback))
        wait_for(lambda: not watcher.stale, 10, "the reader to recover")
        wait_for(
            lambda: watcher.current()[1].state()["counts"].sum() == len(feedback),
            10,
            "the reader to serve the newest params",
        )
        assert watcher.version > serving_version
        assert "checkpoint failed (will retry)" in (tmp_path / "b.log").read_text()
    finally:
        watcher.close(5)
        bandits.stop()
        client.close()
        server.stop()


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_a_broker_that_goes_down_mid_stream_keeps_its_log_and_services_resume_exactly_once(
    how, redis_url, redis_client, keyspace, unique_name, tmp_path
):
    """Stop (SIGTERM: controlled shutdown) or SIGKILL the broker while feedback is
    being produced and consumed, then start it again on the same ports and log.

    Apache Kafka keeps the log on disk, so every record acknowledged before the
    outage is still there, the producer (idempotent, retrying) delivers the rest
    exactly once, and the bandits service resumes from its Redis checkpoints:
    the published model must equal a single LinUCB fed every event once.
    """
    broker = start_broker(tmp_path / "broker")
    bootstrap = broker.bootstrap
    topics = _topic_names(unique_name)
    _create(bootstrap, topics)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(bootstrap, redis_url, keyspace, unique_name("bandits"), **topics)
    feedback = _feedback_stream(30_000, seed=13)
    log = tmp_path / "b.log"
    bandits = ServiceProcess("bandits", env, log).start()
    producer = threading.Thread(
        target=_produce, args=(bootstrap, topics["feedback"], feedback, 3000.0)
    )
    try:
        producer.start()
        wait_for(lambda: _applied(store) > 6_000, 60, "progress before the outage")
        if how == "sigkill":
            broker.kill_node(0)
        else:
            broker.stop_node(0)
        down_at = _applied(store)
        time.sleep(3.0)
        assert bandits.alive(), "the service must ride out a broker outage"
        broker.start_node(0)
        producer.join(150)
        assert not producer.is_alive(), "the producer must deliver everything after the restart"
        wait_for(lambda: _applied(store) == len(feedback), 120, "all feedback applied")
        time.sleep(1.0)  # a double application would show in later publishes
        assert _applied(store) == len(feedback)
        _assert_same_model(_published(store)[1], _reference(feedback))
        assert _logged_ids(bootstrap, topics["feedback"]) == sorted(
            f.feedback_id for f in feedback
        ), "the log must hold every record exactly once, across the outage"
        assert bandits.alive()
    finally:
        if producer.is_alive():
            producer.join(150)
        bandits.stop()
        broker.stop()
    assert down_at < len(feedback) * 0.8, "the outage must land mid-stream"
    assert "revoked partitions" in log.read_text() or "lost partitions" in log.read_text()


def _logged_ids(bootstrap: str, topic: str) -> list[str]:
    """Every feedback id in ``topic``, read from the beginning, sorted."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5000)
    parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    ids = sorted(decode_feedback(record.value).feedback_id for record in consumer)
    consumer.close()
    return ids
