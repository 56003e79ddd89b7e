"""The guard service through ConsumerRuntime on the in-memory harness.

Feedback goes in as bytes on two partitions: the guarded policy ``linucb`` (a new
model version every 0.25 s) and the ``random`` policy, 100 shown items each per
second of impression time. Checked: a collapse of linucb's clicks pins the version
that served before it (by the guard, with the reason), sets the metrics, does not
fire again while the pin stands, and starts afresh after a person unpins; clean
traffic pins nothing; a crash replays to the same counts; an operator's pin is
left alone; a pin that cannot be made is counted.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry

from contracts.events import Feedback, decode_feedback, encode
from contracts.params import encode_params
from services.common.runtime import ConsumerRuntime
from services.common.settings import RuntimeSettings, TopicSettings
from services.guard.service import SPEC, GuardProcessor, GuardSettings
from services.guard.watch import PartitionCounts
from tests.harness import MemoryBroker, MemoryCheckpoints, MemoryParamStore

T0 = 1_700_000_000.0
TOPICS = TopicSettings()
FEEDBACK = TOPICS.feedback
SHOWN = 100
VERSIONS_PER_S = 4
SETTINGS = GuardSettings(
    policies=["linucb"],
    reference_s=60,
    window_s=60,
    min_clicks=100,
    rollback_margin_s=5,
    pin_check_s=1e-6,
)


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker({FEEDBACK: 2, TOPICS.dead_letter: 1})


@pytest.fixture
def store() -> MemoryParamStore:
    """linucb's versions 1..2000 (0.25 s apart from T0 in the traffic below)."""
    store = MemoryParamStore()
    for v in range(1, 2001):
        store.publish("linucb", {"p0": encode_params("linucb", 0, {"w": np.array([float(v)])})})
    return store


class Guard:
    """One guard process on the harness."""

    def __init__(
        self, broker: MemoryBroker, checkpoints: MemoryCheckpoints, store: MemoryParamStore
    ) -> None:
        self.registry = CollectorRegistry()
        self.processor = GuardProcessor(SETTINGS, store, self.registry)
        self.runtime = ConsumerRuntime(
            service=SPEC.name,
            group=SETTINGS.group,
            inputs=SPEC.inputs(TOPICS),
            processor=self.processor,
            topics=TOPICS,
            settings=RuntimeSettings(checkpoint_interval_s=3600),
            registry=self.registry,
            connections=broker.connections(checkpoints),
        )
        self.runtime.open()

    def drain(self) -> None:
        while self.runtime.poll_once():
            pass
        self.runtime.poll_once()

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def crash(self) -> None:
        self.runtime._failed = True
        self.runtime.close()


def traffic(
    seconds: range, *, ctr: Any, seed: int, random_ctr: float = 0.1
) -> Iterator[tuple[int, bytes]]:
    """(partition, feedback) for each second: SHOWN items of linucb (click rate ``ctr(t)``)
    and of random, in impression-time order."""
    rng = np.random.default_rng(seed)
    n = 0
    for t in seconds:
        for k in range(SHOWN):
            ts = T0 + t + k / SHOWN
            for policy, rate in (("linucb", ctr(t)), ("random", random_ctr)):
                n += 1
                fb = Feedback(
                    feedback_id=f"r{seed}-{n}/i1",
                    request_id=f"r{seed}-{n}",
                    user_id=f"u{(n // 2) % 50}",
                    item_id="i1",
                    ts=ts,
                    reward=int(rng.random() < rate),
                    position=k % 5,
                    propensity=1.0,
                    policy=policy,
                    model_version=1 + int((ts - T0) * VERSIONS_PER_S) if policy == "linucb" else 0,
                )
                yield (n // 2) % 2, encode(fb)  # by user, as producers key it


def feed(broker: MemoryBroker, records: Iterator[tuple[int, bytes]]) -> None:
    for partition, value in records:
        broker.append(FEEDBACK, value, partition=partition)


def clean(t: int) -> float:
    return 0.2


def collapse_at(when: int) -> Any:
    return lambda t: 0.2 if t < when else 0.04


def test_a_collapse_pins_the_version_before_it_once_until_a_person_unpins(broker, store):
    guard = Guard(broker, MemoryCheckpoints(), store)
    feed(broker, traffic(range(0, 150), ctr=collapse_at(100), seed=1))
    guard.drain()
    pin = store.pin_of("linucb")
    assert pin is not None and pin.by == "guard"
    # The drop began at 100 s (version 401): the pin is a version from before it, at least
    # the margin (5 s) before, within the window of candidate change points (60 s).
    assert 4 * 40 < pin.version <= 4 * 95 + 1, pin.version
    assert "linucb's lift over random fell from" in pin.reason
    assert "threshold 14.50" in pin.reason
    assert guard.sample("streamrec_guard_tripped", policy="linucb") == 1
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 1
    assert guard.sample("streamrec_guard_statistic", policy="linucb") >= 0
    assert guard.sample("streamrec_guard_threshold") == 14.5

    # Still collapsed (the learner goes on publishing): the pin stands, no second alarm.
    feed(broker, traffic(range(150, 260), ctr=collapse_at(100), seed=2))
    guard.drain()
    assert store.pin_of("linucb") == pin
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 1

    # A person unpins; the test starts afresh with a new reference: a steady policy,
    # even at its low rate, raises nothing, and the gauge is back to 0.
    store.unpin("linucb")
    guard.runtime.poll_once()
    assert guard.sample("streamrec_guard_tripped", policy="linucb") == 0
    feed(broker, traffic(range(260, 400), ctr=lambda t: 0.04, seed=3))
    guard.drain()
    assert store.pin_of("linucb") is None
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 1

    # A fresh collapse after the reset is caught again.
    feed(broker, traffic(range(400, 560), ctr=lambda t: 0.2 if t < 500 else 0.01, seed=4))
    guard.drain()
    again = store.pin_of("linucb")
    assert again is not None and again.by == "guard" and 4 * 480 < again.version < 4 * 500
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 2


def test_clean_traffic_pins_nothing(broker, store):
    guard = Guard(broker, MemoryCheckpoints(), store)
    feed(broker, traffic(range(0, 400), ctr=clean, seed=5))
    guard.drain()
    assert store.pin_of("linucb") is None
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 0
    assert guard.sample("streamrec_guard_tripped", policy="linucb") == 0
    assert guard.sample("streamrec_guard_statistic", policy="linucb") < SETTINGS.threshold


def _buckets(processor: GuardProcessor) -> dict[int, Any]:
    return {p: c.buckets for p, c in sorted(processor.partitions.items())}


def test_a_restart_counts_every_feedback_once(broker, store):
    checkpoints = MemoryCheckpoints()
    feed(broker, traffic(range(0, 40), ctr=clean, seed=6))
    first = Guard(broker, checkpoints, store)
    first.drain()
    assert first.runtime.checkpoint(force=True)
    feed(broker, traffic(range(40, 80), ctr=clean, seed=7))
    first.drain()
    first.crash()  # what it counted after the checkpoint is lost, and read again
    second = Guard(broker, checkpoints, store)
    second.drain()

    # The same records counted in one pass, each once.
    one_pass = GuardProcessor(SETTINGS, store)
    for partition in (0, 1):
        one_pass.restore(partition, None)
        for message in broker.read(FEEDBACK, partition):
            fb = decode_feedback(message.value)
            one_pass.watch.add(
                one_pass.partitions[partition],
                fb.policy,
                ts=fb.ts,
                reward=fb.reward,
                version=fb.model_version,
            )
    assert _buckets(second.processor) == _buckets(one_pass)
    total = sum(
        row[0]
        for c in second.processor.partitions.values()
        for b in c.buckets.values()
        for row in b.values()
    )
    assert total == 80 * SHOWN * 2


def test_the_checkpoint_round_trips_counts_and_reset_points():
    counts = PartitionCounts()
    for i in range(10):
        counts.add("linucb", ts=T0 + i, reward=i % 2, version=i, lateness_s=2, bucket_s=1)
    restored, floors = PartitionCounts.decode(counts.encode({"linucb": 42}))
    assert restored == counts and floors == {"linucb": 42}
    # A feedback for a bucket already closed in its partition is not counted.
    assert not counts.add("linucb", ts=T0, reward=1, version=0, lateness_s=2, bucket_s=1)


def test_an_operator_pin_is_left_alone(broker, store):
    store.pin("linucb", 7, reason="investigating", by="operator")
    guard = Guard(broker, MemoryCheckpoints(), store)
    feed(broker, traffic(range(0, 150), ctr=collapse_at(100), seed=8))
    guard.drain()
    pin = store.pin_of("linucb")
    assert pin is not None and (pin.version, pin.by) == (7, "operator")
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 0
    assert guard.sample("streamrec_guard_tripped", policy="linucb") == 0


def test_a_pin_that_fails_on_redis_is_counted_and_tried_again_at_the_next_bucket(broker, store):
    guard = Guard(broker, MemoryCheckpoints(), store)
    feed(broker, traffic(range(0, 101), ctr=clean, seed=9))
    guard.drain()
    store.failures = [redis.ConnectionError("gone")]
    feed(broker, traffic(range(101, 160), ctr=collapse_at(101), seed=10))
    guard.drain()
    assert guard.sample("streamrec_guard_pin_failures_total", policy="linucb") == 1
    # The next bucket was tested against the same reference and, the drop persisting,
    # alarmed again; the alarm that pinned is the one counted.
    pin = store.pin_of("linucb")
    assert pin is not None and pin.by == "guard"
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 1


def test_an_alarm_without_a_retained_version_is_counted_and_restarts_the_test(broker, store):
    guard = Guard(broker, MemoryCheckpoints(), store)
    store.versions["linucb"] = store.versions["linucb"][500:]  # retention dropped v1..v500
    feed(broker, traffic(range(0, 150), ctr=collapse_at(100), seed=11))
    guard.drain()
    assert store.pin_of("linucb") is None
    assert guard.sample("streamrec_guard_pin_failures_total", policy="linucb") == 1
    assert guard.sample("streamrec_guard_alarms_total", policy="linucb") == 1


def test_settings_refuse_a_reference_that_is_also_guarded():
    with pytest.raises(ValueError, match="also a guarded policy"):
        GuardSettings(policies=["linucb", "random"])
    with pytest.raises(ValueError, match="empty"):
        GuardSettings(policies=[])
