"""Faults with real processes: a frozen consumer, a Redis restart, a broker restart.

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
from kafka import KafkaProducer

from contracts.events import Feedback, encode
from contracts.keys import KeySpace
from services.paramstore import ModelNotFound, ParamStore, ParamWatcher
from services.stack.servers import ensure_topics, start_broker, start_redis
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
                        part.offsets[topics["feedback"]][int(name[1:])],
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
    watcher = ParamWatcher(ParamStore(redis.Redis.from_url(server.url), keys=keys), "linucb")
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


def test_broker_restart_services_reconnect_and_resume_at_their_checkpoints(
    redis_url, redis_client, keyspace, unique_name, tmp_path
):
    """Stop the broker mid-run and start a new one on the same port.

    The embedded Tansu keeps its log in memory, so a restart is a broker that
    lost every topic: this shows the service survives the outage, reconnects,
    rejoins its group, restores from Redis and applies what is produced
    afterwards on top of its checkpointed state. It cannot show replay of
    records a broker keeps across a restart (a disk-backed Kafka does).

    The Redis checkpoint stays authoritative: the service resumes each partition
    at its checkpointed offset, so on the emptied log the records below that
    offset are never applied (Tansu answers a fetch past the end with nothing,
    not OFFSET_OUT_OF_RANGE). The test pins that: after a log loss an operator
    must rewind the checkpoints (docs: replay) rather than expect a re-read.
    """
    broker = start_broker(tmp_path / "broker")
    port = broker.port
    bootstrap = broker.bootstrap
    topics = _topic_names(unique_name)
    _create(bootstrap, topics)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(bootstrap, redis_url, keyspace, unique_name("bandits"), **topics)
    feedback = _feedback_stream(20_000, seed=13)
    before, after = feedback[:8_000], feedback[8_000:]
    bandits = ServiceProcess("bandits", env, tmp_path / "b.log").start()
    log = tmp_path / "b.log"
    try:
        _produce(bootstrap, topics["feedback"], before)
        wait_for(lambda: _applied(store) == len(before), 90, "the first batch applied")
        header, _ = _published(store)
        resume = {int(p): o for p, o in header["offsets"][topics["feedback"]].items()}
        assert sum(resume.values()) == len(before)
        broker.stop()
        time.sleep(3.0)
        assert bandits.alive(), "the service must ride out a broker outage"
        broker = start_broker(tmp_path / "broker", port=port)
        _create(bootstrap, topics)
        wait_for(
            lambda: log.read_text().count("(restored [0, 1, 2, 3])") >= 1,
            90,
            "the group rejoined on the new broker and restored its checkpoints",
        )
        producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        sent: dict[int, list[Feedback]] = {p: [] for p in range(4)}
        for i, event in enumerate(after):
            sent[i % 4].append(event)
            producer.send(topics["feedback"], value=encode(event), partition=i % 4)
        producer.flush()
        producer.close()
        assert all(len(sent[p]) > resume[p] for p in range(4))
        applied_after = [f for p in range(4) for f in sent[p][resume[p] :]]
        expected = before + applied_after
        wait_for(lambda: _applied(store) == len(expected), 90, "the new events applied")
        time.sleep(1.0)
        assert _applied(store) == len(expected)
        _assert_same_model(_published(store)[1], _reference(expected))
        assert bandits.alive()
    finally:
        bandits.stop()
        broker.stop()
    assert "revoked partitions [0, 1, 2, 3]" in log.read_text()
