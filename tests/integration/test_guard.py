"""The guard on the real Kafka and Redis: a collapse of a policy's reward after an update
pins the earlier version in Redis (and serving's reads return it) and sets the metric;
clean feedback pins nothing.

The guard runs as its ``SPEC`` builds it (``build_runtime``), in this process, over a
fresh feedback topic with 2 partitions; the model's versions are real publishes to
the parameter store.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from kafka import KafkaProducer
from prometheus_client import CollectorRegistry

from contracts.params import encode_params
from services.common.runtime import ConsumerRuntime
from services.common.service import build_runtime
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings
from services.guard.service import SPEC, GuardSettings
from services.paramstore import ParamStore
from tests.integration.processes import FAST_FAILOVER_SETTINGS
from tests.unit.test_guard_service import SETTINGS, clean, collapse_at, traffic

pytestmark = pytest.mark.integration

VERSIONS = 700  # 0.25 s apart in the traffic's model_version: 175 s


@pytest.fixture
def store(redis_client, keyspace) -> ParamStore:
    store = ParamStore(redis_client, keys=keyspace)
    for v in range(VERSIONS):
        store.publish("linucb", {"p0": encode_params("linucb", 0, {"w": np.array([float(v)])})})
    return store


def _guard(
    kafka_bootstrap: str, redis_url: str, keyspace, topics: TopicSettings, group: str
) -> tuple[ConsumerRuntime, CollectorRegistry]:
    registry = CollectorRegistry()
    runtime = build_runtime(
        SPEC,
        registry,
        GuardSettings(**(SETTINGS.model_dump() | {"group": group})),
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap, **FAST_FAILOVER_SETTINGS),
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        topics=topics,
        runtime=RuntimeSettings(checkpoint_interval_s=1.0),
    )
    runtime.open()
    return runtime, registry


def _produce(kafka_bootstrap: str, topic: str, ctr: Callable[[int], float], seed: int) -> int:
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    count = 0
    for partition, value in traffic(range(0, 150), ctr=ctr, seed=seed):
        producer.send(topic, value=value, partition=partition)
        count += 1
    producer.flush()
    producer.close()
    return count


def _run_until_consumed(runtime: ConsumerRuntime, topic: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runtime.poll_once()
        consumed = sum(c.offsets.get(topic, 0) for c in runtime._owned.values())
        if consumed >= count:
            runtime.poll_once()
            return
    raise AssertionError(f"the guard did not consume {count} records in {timeout} s")


def test_a_collapse_after_an_update_pins_the_earlier_version_in_redis(
    kafka_bootstrap, redis_url, keyspace, topic_factory, unique_name, store
):
    topics = TopicSettings(feedback=topic_factory("feedback", 2), dead_letter=topic_factory("dlq"))
    count = _produce(kafka_bootstrap, topics.feedback, collapse_at(100), seed=21)
    runtime, registry = _guard(kafka_bootstrap, redis_url, keyspace, topics, unique_name("guard"))
    try:
        _run_until_consumed(runtime, topics.feedback, count, timeout=120)
    finally:
        runtime.close()
    pin = store.pin_of("linucb")
    assert pin is not None and pin.by == "guard", pin
    # The drop began at 100 s (version 401): the pin is a version from before it, at least
    # the margin (5 s) before, within the window of candidate change points (60 s).
    assert 4 * 40 < pin.version <= 4 * 95 + 1, pin.version
    assert "threshold" in pin.reason
    assert store.head("linucb")[0] == pin.version  # what serving's reads now get
    assert store.current_version("linucb") == VERSIONS
    assert registry.get_sample_value("streamrec_guard_tripped", {"policy": "linucb"}) == 1
    assert registry.get_sample_value("streamrec_guard_alarms_total", {"policy": "linucb"}) == 1


def test_clean_feedback_pins_nothing(
    kafka_bootstrap, redis_url, keyspace, topic_factory, unique_name, store
):
    topics = TopicSettings(feedback=topic_factory("feedback", 2), dead_letter=topic_factory("dlq"))
    count = _produce(kafka_bootstrap, topics.feedback, clean, seed=22)
    runtime, registry = _guard(kafka_bootstrap, redis_url, keyspace, topics, unique_name("guard"))
    try:
        _run_until_consumed(runtime, topics.feedback, count, timeout=120)
    finally:
        runtime.close()
    assert store.pin_of("linucb") is None
    assert store.head("linucb")[0] == VERSIONS
    assert registry.get_sample_value("streamrec_guard_tripped", {"policy": "linucb"}) == 0
    assert registry.get_sample_value("streamrec_guard_alarms_total", {"policy": "linucb"}) == 0
    statistic = registry.get_sample_value("streamrec_guard_statistic", {"policy": "linucb"})
    assert statistic is not None and statistic < SETTINGS.threshold
