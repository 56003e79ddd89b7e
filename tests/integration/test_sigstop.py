"""SIGSTOP of a lone consumer past its session timeout, then SIGCONT: the joiner and sequences.

A frozen process still holds its TCP connections and its in-memory state, but
the broker stops hearing its heartbeats and, after the session timeout (3 s in
the tests, see processes.FAST_FAILOVER), removes it from the group. On SIGCONT
the process must notice it was evicted (the runtime logs "lost partitions" and
drops their state without checkpointing), rejoin, restore from its last
checkpoint and go on; whatever it re-applies or re-emits must change nothing.
Kill -9 of the same services is tested next to each of them (test_bandit_loop,
test_sequences), and a frozen bandits process with a second one taking over in
test_faults; here no other process is there to take over, so nothing but the
eviction and the rejoin happens around the frozen one.

Each case is exact against a reference computed in-process from the same events
(the helpers of the SIGKILL tests): every click is rewarded exactly once through
the bandits, and every user's capped click sequence and distinct-click count
are exactly those of the stream.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient

from contracts.keys import KeySpace
from services.paramstore import ParamStore
from services.sequences.reader import Sequences
from services.sequences.store import TOTAL_FIELD
from services.stack.servers import free_port
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import (
    SlateProducer,
    _applied,
    _assert_same_model,
    _env,
    _join_reference,
    _produce,
    _published,
    _reference,
    _slates,
)
from tests.integration.test_disk_full import _metric
from tests.integration.test_faults import _assignments
from tests.integration.test_sequences import MAX_LEN, _expected, _stream, _totals

pytestmark = pytest.mark.integration

LOST = "streamrec_consumer_rebalances_total"


class _Fixtures:
    def __init__(self, **fixtures: object) -> None:
        self.__dict__.update(fixtures)

    kafka_bootstrap: str
    redis_url: str
    redis_client: redis.Redis
    keyspace: KeySpace
    topic_factory: Callable[..., str]
    unique_name: Callable[[str], str]
    tmp_path: Path


def _metrics_on(port: int) -> dict[str, str]:
    return {"STREAMREC_RUNTIME_METRICS_PORT": str(port)}


class _Case:
    """A service to freeze: its process, group and metrics port, its progress, and what
    exact means."""

    process: ServiceProcess
    group: str
    port: int

    def start(self) -> None:
        """Start the processes, then the stream once they own their partitions."""
        raise NotImplementedError

    def applied(self) -> int:
        """Input applied downstream so far."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Far enough for the freeze: output flowing and every partition checkpointed."""
        raise NotImplementedError

    def check(self) -> int:
        """Wait for the whole stream and check it exactly; returns the total applied."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class _JoinerThroughBandits(_Case):
    """Impressions and clicks into the joiner, its feedback into the bandits."""

    def __init__(self, fx: _Fixtures) -> None:
        self.fx = fx
        topics = {
            "feedback": fx.topic_factory("feedback", 4),
            "dead_letter": fx.topic_factory("dlq", 1),
            "impressions": fx.topic_factory("impressions", 4),
            "clicks": fx.topic_factory("clicks", 4),
        }
        self.topics = topics
        loop = fx.unique_name("loop")
        env = _env(fx.kafka_bootstrap, fx.redis_url, fx.keyspace, loop, **topics) | {
            "STREAMREC_JOINER_WINDOW_S": "2",
            "STREAMREC_JOINER_LATENESS_S": "3",
            # Longer than the freeze: a thawed joiner must not take the freeze for an
            # idle stream and close windows ahead of the records waiting for it.
            "STREAMREC_JOINER_IDLE_CLOSE_S": "10",
        }
        self.group = f"{loop}-joiner"
        self.port = free_port()
        self.process = ServiceProcess(
            "joiner", env | _metrics_on(self.port), fx.tmp_path / "joiner.log"
        )
        self.bandits = ServiceProcess("bandits", env, fx.tmp_path / "bandits.log")
        self.store = ParamStore(fx.redis_client, keys=fx.keyspace)
        self.slates: SlateProducer | None = None
        self.partition_of: Callable[[str], int] | None = None

    def start(self) -> None:
        self.process.start()
        self.bandits.start()
        wait_for(
            lambda: all(_assignments(p.log) for p in (self.process, self.bandits)),
            90,
            "the joiner and the bandits to own their partitions",
        )
        # ~34,000 events at 3,000/s: ~11 s of stream, event time a little behind it.
        self.impressions, self.clicks = _slates(24_000, seed=7)
        self.slates = SlateProducer(
            self.fx.kafka_bootstrap, self.topics, self.impressions, self.clicks, rate=3000
        )
        self.slates.start()

    def applied(self) -> int:
        return _applied(self.store)

    def ready(self) -> bool:
        keys = [self.fx.keyspace.checkpoint(self.group, p) for p in range(4)]
        return self.applied() > 0 and all(self.fx.redis_client.hexists(k, "state") for k in keys)

    def check(self) -> int:
        assert self.slates is not None
        self.partition_of = self.slates.join()
        expected = _join_reference(self.impressions, self.clicks, 4, self.partition_of)
        assert sum(f.reward for f in expected) > 500
        wait_for(lambda: self.applied() == len(expected), 120, "all feedback applied")
        time.sleep(2.0)  # late duplicates would show up in the next publishes
        assert self.applied() == len(expected)
        published = _published(self.store)
        assert published is not None
        _assert_same_model(published[1], _reference(expected))
        assert "re-reading from" in self.process.log.read_text()
        return len(expected)

    def stop(self) -> None:
        if self.slates is not None and self.partition_of is None:
            self.slates.join()
        self.process.stop()
        self.bandits.stop()


class _SequencesService(_Case):
    """Clicks (some late, some resent) into the sequences service."""

    def __init__(self, fx: _Fixtures) -> None:
        self.fx = fx
        self.topic = fx.topic_factory("clicks", 4)
        self.group = fx.unique_name("sequences")
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": fx.kafka_bootstrap,
            "REDIS_URL": fx.redis_url,
            "REDIS_NAMESPACE": fx.keyspace.namespace,
            "STREAMREC_TOPIC_CLICKS": self.topic,
            "STREAMREC_TOPIC_DEAD_LETTER": fx.topic_factory("dlq", 1),
            "STREAMREC_SEQUENCES_GROUP": self.group,
            "STREAMREC_SEQUENCES_MAX_LEN": str(MAX_LEN),
            "STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S": "0.2",
            "STREAMREC_RUNTIME_MAX_BATCH": "500",
        }
        self.port = free_port()
        self.process = ServiceProcess(
            "sequences", env | _metrics_on(self.port), fx.tmp_path / "sequences.log"
        )
        self.clicks = _stream(users=500, n=30_000, seed=43)
        self.expected = _expected(self.clicks, MAX_LEN)
        self.users = sorted(self.expected)
        self.total = sum(n for _, n in self.expected.values())
        self.producer = threading.Thread(
            target=_produce, args=(fx.kafka_bootstrap, self.topic, self.clicks, 3000.0)
        )

    def start(self) -> None:
        self.process.start()
        wait_for(lambda: bool(_assignments(self.process.log)), 90, "sequences to own partitions")
        self.producer.start()  # ~10 s of stream

    def applied(self) -> int:
        return _totals(self.fx.redis_client, self.fx.keyspace, self.users)

    def ready(self) -> bool:
        keys = [self.fx.keyspace.checkpoint(self.group, p) for p in range(4)]
        checkpointed = all(self.fx.redis_client.exists(k) for k in keys)
        return checkpointed and self.applied() > self.total // 10

    def check(self) -> int:
        self.producer.join()
        wait_for(lambda: self.applied() >= self.total, 60, "all clicks")
        time.sleep(1.0)  # a double application would show in what is written after
        assert self.applied() == self.total
        got = Sequences(self.fx.redis_client, keys=self.fx.keyspace).get_many(
            self.users, n=MAX_LEN + 5
        )
        counts = [
            int(self.fx.redis_client.hget(self.fx.keyspace.user_features(u), TOTAL_FIELD) or 0)
            for u in self.users
        ]
        found = {u: (got[u], n) for u, n in zip(self.users, counts, strict=True)}
        wrong = [u for u in self.users if found[u] != self.expected[u]]
        assert not wrong, f"{len(wrong)} users differ, e.g. {wrong[0]}"
        return self.total

    def stop(self) -> None:
        if self.producer.is_alive():
            self.producer.join()
        self.process.stop()


def _members(admin: KafkaAdminClient, group: str) -> int:
    """Members of ``group`` as its coordinator sees them."""
    return len(admin.describe_groups([group])[group]["members"])


def _thawed_and_rejoined(log: Path) -> bool:
    """The process logged that it was evicted, and was assigned partitions after that."""
    text = log.read_text()
    lost = text.find("lost partitions")
    return lost >= 0 and "assigned partitions [0, 1, 2, 3]" in text[lost:]


@pytest.mark.parametrize(
    "make", [_JoinerThroughBandits, _SequencesService], ids=["joiner", "sequences"]
)
def test_a_service_frozen_past_its_session_timeout_rejoins_and_stays_exactly_once(
    make: Callable[[_Fixtures], _Case],
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory: Callable[..., str],
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    """SIGSTOP mid-stream until the broker evicts the process, SIGCONT, then exact output."""
    case = make(
        _Fixtures(
            kafka_bootstrap=kafka_bootstrap,
            redis_url=redis_url,
            redis_client=redis_client,
            keyspace=keyspace,
            topic_factory=topic_factory,
            unique_name=unique_name,
            tmp_path=tmp_path,
        )
    )
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)

    def lost() -> float:
        return _metric(case.port, LOST, absent=0.0, service=case.process.name, kind="lost")

    frozen = False
    try:
        case.start()
        wait_for(case.ready, 90, "output flowing and every partition checkpointed")
        popen = case.process.popen
        assert popen is not None
        lost_before = lost()
        popen.send_signal(signal.SIGSTOP)
        frozen = True
        applied_when_frozen = case.applied()
        assert _members(admin, case.group) == 1, "the frozen process is still a member"
        # Evicted a session timeout (3 s) after the last heartbeat it sent; thawed well
        # before the joiner's idle close (10 s).
        wait_for(lambda: _members(admin, case.group) == 0, 8, "the broker to evict it")
        popen.send_signal(signal.SIGCONT)
        frozen = False
        wait_for(
            lambda: _thawed_and_rejoined(case.process.log),
            60,
            "the thawed process to find itself evicted and rejoin",
        )
        assert lost() == lost_before + 1, "the eviction is counted"
        total = case.check()
        assert applied_when_frozen < total // 2, "the freeze must land mid-stream"
        assert case.process.alive(), case.process.log.read_text()[-3000:]
    finally:
        if frozen and case.process.popen is not None:
            case.process.popen.send_signal(signal.SIGCONT)
        case.stop()
        admin.close()
