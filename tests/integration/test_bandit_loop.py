"""Issue 3 end to end: joiner and bandits as real processes against the real broker/Redis.

The reference for every check is computed in-process from the same events: a
single LinUCB fed every feedback (for the bandits) or the pure join run over the
log (for the joiner). The published model must equal it within 1e-9, whatever
was killed, restarted or rebalanced on the way.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer
from prometheus_client import CollectorRegistry

from contracts.events import (
    Click,
    Feedback,
    Impression,
    SlateItem,
    decode_click,
    decode_feedback,
    decode_impression,
    encode,
    feedback_id,
)
from contracts.ids import item_labels
from services.bandits import LinUCB
from services.common import (
    CheckpointStore,
    ConsumerRuntime,
    KafkaSettings,
    RedisSettings,
    RuntimeSettings,
    TopicSettings,
)
from services.common.runtime import SEQ_HEADER, SOURCE_HEADER
from services.common.topics import ensure_topics
from services.joiner.join import PartitionJoin
from services.joiner.service import JoinerSettings, JoinProcessor
from services.paramstore import ModelNotFound, ParamStore
from tests.integration.processes import FAST_FAILOVER_SETTINGS, ServiceProcess, wait_for

pytestmark = pytest.mark.integration

DIM = 9
POLICIES = '{"linucb": {"learner": "linucb"}}'


def _context(rng: np.random.Generator) -> list[float]:
    return [*rng.normal(size=DIM - 1).round(6).tolist(), 1.0]


def _feedback_stream(n: int, seed: int) -> list[Feedback]:
    rng = np.random.default_rng(seed)
    base = time.time()
    return [
        Feedback(
            feedback_id=feedback_id(f"r{i}", f"i{i % 37}"),
            request_id=f"r{i}",
            user_id=f"u{i % 501}",
            item_id=f"i{i % 37}",
            ts=base + i / 1000,
            reward=int(rng.random() < 0.1),
            position=0,
            propensity=0.5,
            policy="linucb",
            context=_context(rng),
        )
        for i in range(n)
    ]


def _reference(feedback: list[Feedback]) -> dict[str, np.ndarray]:
    learner = LinUCB(DIM, alpha=0.5)
    learner.update(
        item_labels([f.item_id for f in feedback]),
        np.array([f.context for f in feedback]),
        np.array([f.reward for f in feedback], dtype=float),
    )
    return learner.state()


def _published(store: ParamStore) -> tuple[dict, dict[str, np.ndarray]] | None:
    try:
        _, header, arrays = store.latest("linucb", combine=LinUCB.merge)
    except ModelNotFound:
        return None
    return header, arrays


def _applied(store: ParamStore) -> int:
    """Feedback applied so far, from the published per-arm update counts."""
    published = _published(store)
    return 0 if published is None else int(round(published[1]["counts"].sum()))


def _assert_same_model(published: dict[str, np.ndarray], reference: dict[str, np.ndarray]):
    assert np.array_equal(published["items"], reference["items"])
    for name in ("gram", "b", "counts"):
        np.testing.assert_allclose(published[name], reference[name], rtol=1e-12, atol=1e-9)


def _env(kafka_bootstrap, redis_url, keyspace, group, **topics) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": keyspace.namespace,
        "STREAMREC_BANDITS_POLICIES": POLICIES,
        "STREAMREC_BANDITS_GROUP": group,
        "STREAMREC_JOINER_GROUP": group + "-joiner",
    }
    env |= {f"STREAMREC_TOPIC_{name.upper()}": topic for name, topic in topics.items()}
    return env


def _produce(bootstrap: str, topic: str, events, rate: float | None = None) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
    started = time.monotonic()
    for i, event in enumerate(events):
        producer.send(topic, key=event.user_id.encode(), value=encode(event))
        if rate and i % 500 == 0:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
    producer.flush()
    producer.close()


@pytest.fixture
def topics(topic_factory):
    return {
        "feedback": topic_factory("feedback", 4),
        "dead_letter": topic_factory("dlq", 1),
        "impressions": topic_factory("impressions", 4),
        "clicks": topic_factory("clicks", 4),
    }


def test_two_processes_with_a_rebalance_publish_the_single_process_model(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, topics, tmp_path
):
    feedback = _feedback_stream(40_000, seed=1)
    half = len(feedback) // 2
    _produce(kafka_bootstrap, topics["feedback"], feedback[:half])
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("bandits"), **topics)
    first = ServiceProcess("bandits", env, tmp_path / "b1.log").start()
    second = ServiceProcess("bandits", env, tmp_path / "b2.log")
    try:
        wait_for(lambda: _applied(store) == half, 60, "the first half applied by one process")
        second.start()  # joins the group midway: partitions move between the processes
        wait_for(
            lambda: (
                "assigned partitions [" in (tmp_path / "b2.log").read_text()
                and "assigned partitions []" not in (tmp_path / "b2.log").read_text()
            ),
            60,
            "the rebalance",
        )
        _produce(kafka_bootstrap, topics["feedback"], feedback[half:])
        wait_for(lambda: _applied(store) == len(feedback), 120, "all feedback applied")
        header, arrays = _published(store)
        assert len(header["parts"]) == 4
        _assert_same_model(arrays, _reference(feedback))
    finally:
        assert first.stop() == 0
        if second.popen is not None:
            assert second.stop() == 0
    assert "revoked partitions" in (tmp_path / "b1.log").read_text()


def test_bandits_sigkill_mid_stream_is_exactly_once(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, topics, tmp_path
):
    feedback = _feedback_stream(60_000, seed=2)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("bandits"), **topics)
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topics["feedback"], feedback, 6000.0)
    )
    producer.start()
    bandits = ServiceProcess("bandits", env, tmp_path / "b.log").start()
    try:
        wait_for(lambda: _applied(store) > 10_000, 60, "progress before the kill")
        bandits.kill()
        killed_at = _applied(store)
        assert killed_at < len(feedback), "the kill must land mid-stream"
        bandits.start()
        producer.join()
        wait_for(lambda: _applied(store) == len(feedback), 120, "all feedback applied")
        time.sleep(1.0)  # a double application would show in the next publish
        _assert_same_model(_published(store)[1], _reference(feedback))
    finally:
        producer.join()
        bandits.stop()


def _slates(n: int, seed: int) -> tuple[list[Impression], list[Click]]:
    """Impressions with clicks: some duplicated, some late, some before their impression."""
    rng = np.random.default_rng(seed)
    base = time.time()
    impressions, clicks = [], []
    for i in range(n):
        ts = base + i / 3500  # event time keeps pace with the ~3,500 impressions/s produced
        items = rng.choice(40, size=3, replace=False)
        imp = Impression(
            request_id=f"r{seed}-{i}",
            user_id=f"u{i % 301}",
            ts=ts,
            policy="linucb",
            context=_context(rng),
            slate=[
                SlateItem(item_id=f"i{k}", position=p, propensity=0.2) for p, k in enumerate(items)
            ],
        )
        impressions.append(imp)
        for pos in np.flatnonzero(rng.random(3) < 0.15):
            late = rng.random() < 0.1
            click = Click(
                event_id=f"c{seed}-{i}-{pos}",
                user_id=imp.user_id,
                item_id=f"i{items[pos]}",
                request_id=imp.request_id,
                position=int(pos),
                ts=ts + (2.5 if late else float(rng.uniform(0.05, 0.5))),
            )
            clicks.append(click)
            if rng.random() < 0.05:
                clicks.append(click)
    return impressions, clicks


def _join_reference(
    impressions: list[Impression], clicks: list[Click], partitions: int, partition_of
) -> list[Feedback]:
    joins = {p: PartitionJoin(window_s=2.0, lateness_s=3.0) for p in range(partitions)}
    merged = sorted(
        [(e.ts, 0, e) for e in impressions] + [(e.ts, 1, e) for e in clicks],
        key=lambda entry: (entry[0], entry[1]),
    )
    out: list[Feedback] = []
    for offset, (_, kind, event) in enumerate(merged):
        join = joins[partition_of(event.user_id)]
        out += join.impression(event, offset) if kind == 0 else join.click(event, offset)
    for join in joins.values():
        out += join.advance(float("inf"))
    return out


class SlateProducer:
    """Produces impressions and clicks in event-time order in a thread (acks=all,
    idempotent), remembering which partition each user's events went to."""

    def __init__(self, bootstrap, topics, impressions, clicks, rate: float) -> None:
        self.producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5)
        self.topics = topics
        self.events = sorted(
            [(e.ts, 0, e) for e in impressions] + [(e.ts, 1, e) for e in clicks],
            key=lambda entry: (entry[0], entry[1]),
        )
        self.rate = rate
        self.sent: dict[str, object] = {}  # user -> the future of their first impression
        self.thread = threading.Thread(target=self._run)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        started = time.monotonic()
        for i, (_, kind, event) in enumerate(self.events):
            topic = self.topics["impressions"] if kind == 0 else self.topics["clicks"]
            meta = self.producer.send(topic, key=event.user_id.encode(), value=encode(event))
            if kind == 0 and event.user_id not in self.sent:
                self.sent[event.user_id] = meta
            if i % 500 == 0:
                time.sleep(max(0.0, started + i / self.rate - time.monotonic()))
        self.producer.flush()

    def join(self, timeout: float = 180):
        """Wait until everything is acknowledged; returns user → partition."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the producer did not finish"
        self.producer.close()
        return {user: meta.get(10).partition for user, meta in self.sent.items()}.__getitem__


def test_joiner_sigkill_mid_stream_is_exactly_once_through_the_bandits(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, topics, tmp_path
):
    impressions, clicks = _slates(20_000, seed=3)
    store = ParamStore(redis_client, keys=keyspace)
    group = unique_name("loop")
    env = _env(kafka_bootstrap, redis_url, keyspace, group, **topics) | {
        "STREAMREC_JOINER_WINDOW_S": "2",
        "STREAMREC_JOINER_LATENESS_S": "3",
        # Markers (wall clock - lateness) only close the tail once the stream has
        # stopped; a short idle time could fire them while a starved producer lags.
        "STREAMREC_JOINER_IDLE_CLOSE_S": "10",
    }
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {topics["dead_letter"]: 1})
    slates = SlateProducer(kafka_bootstrap, topics, impressions, clicks, rate=5500)
    slates.start()
    joiner = ServiceProcess("joiner", env, tmp_path / "joiner.log").start()
    bandits = ServiceProcess("bandits", env, tmp_path / "bandits.log").start()
    try:
        checkpoints = [keyspace.checkpoint(group + "-joiner", p) for p in range(4)]
        wait_for(
            lambda: (
                _applied(store) > 0
                and all(redis_client.hexists(key, "state") for key in checkpoints)
            ),
            90,
            "feedback flowing and every joiner partition checkpointed before the kill",
        )
        joiner.kill()
        applied_at_kill = _applied(store)
        joiner.start()
        expected = _join_reference(impressions, clicks, 4, slates.join())
        assert sum(f.reward for f in expected) > 500
        assert applied_at_kill < len(expected) // 2, "the kill must land mid-stream"
        wait_for(lambda: _applied(store) == len(expected), 120, "all feedback applied")
        time.sleep(2.0)  # late duplicates would show up in the next publishes
        assert _applied(store) == len(expected)
        _assert_same_model(_published(store)[1], _reference(expected))
    finally:
        slates.join()
        joiner.stop()
        bandits.stop()
    assert "re-reading from" in (tmp_path / "joiner.log").read_text()


def test_a_joiner_that_crashes_while_re_reading_still_emits_each_feedback_once(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name
):
    """Crash, restart, checkpoint in the middle of the re-read, crash again, finish.

    The checkpoint asked for mid-re-read must leave the restored one in place
    (it alone says what was emitted below its offsets); the feedback topic,
    de-duplicated by source sequence number as consumers do, must then equal
    an uninterrupted join.
    """
    # 40k impressions span about 11 s of event time: windows (5 s with lateness) close mid-stream.
    impressions, clicks = _slates(40_000, seed=4)
    topics = TopicSettings(
        impressions=topic_factory("impressions"),
        clicks=topic_factory("clicks"),
        feedback=topic_factory("feedback"),
        dead_letter=topic_factory("dlq"),
    )
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5)
    for _, kind, event in sorted(
        [(e.ts, 0, e) for e in impressions] + [(e.ts, 1, e) for e in clicks],
        key=lambda entry: (entry[0], entry[1]),
    ):
        producer.send(topics.impressions if kind == 0 else topics.clicks, value=encode(event))
    producer.flush()
    producer.close()
    settings = JoinerSettings(group=unique_name("joiner"), window_s=2, lateness_s=3, idle_close_s=1)
    store = CheckpointStore(redis_client, keyspace, settings.group)

    def joiner() -> ConsumerRuntime:
        runtime = ConsumerRuntime(
            service="joiner",
            group=settings.group,
            inputs={topics.impressions: decode_impression, topics.clicks: decode_click},
            processor=JoinProcessor(settings, topics, CollectorRegistry()),
            kafka=KafkaSettings(
                bootstrap_servers=kafka_bootstrap,
                **FAST_FAILOVER_SETTINGS,
                max_partition_fetch_bytes=16 * 1024,
            ),
            redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
            topics=topics,
            settings=RuntimeSettings(checkpoint_interval_s=3600, max_batch=200),
            registry=CollectorRegistry(),
        )
        runtime.open()
        return runtime

    def crash(runtime: ConsumerRuntime) -> None:
        runtime._failed = True  # what an exception in run() sets: close() skips the checkpoint
        runtime.close()

    def position(runtime: ConsumerRuntime) -> int:
        owned = runtime._owned.get(0)
        return owned.offsets.get(topics.impressions, 0) if owned else 0

    first = joiner()
    while position(first) < 30_000:
        first.poll_once()
    assert first.checkpoint(force=True)
    stored = store.load([0])[0]
    crash(first)
    restored_at = stored.offsets[topics.impressions]

    second = joiner()
    while not 0 < position(second) < restored_at:  # until the re-read has begun
        second.poll_once()
    for _ in range(10):
        second.poll_once()
    assert 0 < position(second) < restored_at, "mid-re-read"
    assert second.checkpoint(force=True)
    again = store.load([0])[0]
    assert (again.offsets, again.state, again.emit_seq) == (
        stored.offsets,
        stored.state,
        stored.emit_seq,
    )
    crash(second)

    third = joiner()
    expected = _join_reference(impressions, clicks, 1, lambda user: 0)
    consumer = KafkaConsumer(
        topics.feedback, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
    )
    applied: dict[str, Feedback] = {}
    last_seq: dict[bytes, int] = {}
    deadline = time.monotonic() + 90
    try:
        while len(applied) < len(expected) and time.monotonic() < deadline:
            third.poll_once()
            for batch in consumer.poll(timeout_ms=50).values():
                for record in batch:
                    headers = dict(record.headers)
                    source, seq = headers[SOURCE_HEADER], int(headers[SEQ_HEADER])
                    if seq > last_seq.get(source, -1):
                        last_seq[source] = seq
                        fb = decode_feedback(record.value)
                        assert fb.feedback_id not in applied, "emitted twice past de-duplication"
                        applied[fb.feedback_id] = fb
    finally:
        consumer.close()
        third.close()
    assert {k: f.reward for k, f in applied.items()} == {f.feedback_id: f.reward for f in expected}


# -- Issue 11: bounded arms through the real service -----------------------------------

CAP = 64


def _flooded_stream(n: int, seed: int) -> list[Feedback]:
    """Feedback over 3,000 items with a heavy tail, so 64-arm learners evict all the time."""
    rng = np.random.default_rng(seed)
    base = time.time()
    items = rng.zipf(1.3, size=n) % 3000
    return [
        Feedback(
            feedback_id=feedback_id(f"r{i}", f"i{item}"),
            request_id=f"r{i}",
            user_id=f"u{i % 501}",
            item_id=f"i{item}",
            ts=base + i / 1000,
            reward=int(rng.random() < 0.1),
            position=0,
            propensity=0.5,
            policy="linucb",
            context=_context(rng),
        )
        for i, item in enumerate(items.tolist())
    ]


def _produce_in_order(bootstrap: str, topic: str, events, rate: float) -> None:
    """Event ``i`` to partition ``i % 4``, in order (one request in flight: no reordering)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=5, max_in_flight_requests_per_connection=1
    )
    started = time.monotonic()
    for i, event in enumerate(events):
        producer.send(topic, value=encode(event), partition=i % 4)
        if i % 500 == 0:
            time.sleep(max(0.0, started + i / rate - time.monotonic()))
    producer.flush()
    producer.close()


def _consumed(store: ParamStore, topic: str) -> int:
    """Feedback consumed into the published model, from the offsets its parts carry."""
    published = _published(store)
    return 0 if published is None else sum(published[0]["offsets"].get(topic, {}).values())


def test_capped_learners_sigkilled_mid_stream_publish_the_uninterrupted_model(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, topics, tmp_path
):
    """Eviction is a function of each partition's log: a SIGKILL (restore from the
    checkpoint, re-read) must not change which arms are evicted, so the published model
    equals capped learners fed each partition without interruption."""
    feedback = _flooded_stream(40_000, seed=5)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("bandits"), **topics) | {
        "STREAMREC_BANDITS_MAX_ARMS": str(CAP)
    }
    producer = threading.Thread(
        target=_produce_in_order, args=(kafka_bootstrap, topics["feedback"], feedback, 6000.0)
    )
    producer.start()
    bandits = ServiceProcess("bandits", env, tmp_path / "b.log").start()
    try:
        wait_for(lambda: _consumed(store, topics["feedback"]) > 8000, 60, "progress")
        bandits.kill()
        assert _consumed(store, topics["feedback"]) < len(feedback), "mid-stream"
        bandits.start()
        producer.join()
        wait_for(lambda: _consumed(store, topics["feedback"]) == len(feedback), 120, "all consumed")
        published = _published(store)[1]
    finally:
        producer.join()
        bandits.stop()
    parts = []
    for partition in range(4):
        learner = LinUCB(DIM)
        learner.limit_arms(CAP, admit_after=2)
        mine = feedback[partition::4]
        learner.update(
            item_labels([f.item_id for f in mine]),
            np.array([f.context for f in mine]),
            np.array([f.reward for f in mine], dtype=float),
        )
        assert learner.drain_evictions(), "the stream must make every partition evict"
        parts.append(learner.state())
    assert len(published["items"]) <= 4 * CAP
    _assert_same_model(published, LinUCB.merge(parts))


def test_the_catalog_published_for_serving_protects_its_arms_in_the_bandits_service(
    redis_client, keyspace
):
    from prometheus_client import CollectorRegistry as Registry

    from services.bandits.service import BanditsProcessor, CatalogLabels
    from services.bandits.settings import BanditsSettings
    from services.catalog import publish_catalog
    from services.common import Record

    catalog = CatalogLabels(redis_client, keyspace, refresh_s=0.01)
    assert len(catalog.labels()) == 0, "no catalog published yet"
    real = [f"i{k}" for k in range(40)]
    publish_catalog(redis_client, keyspace, real, np.zeros((len(real), 8)))
    time.sleep(0.02)
    settings = BanditsSettings(policies={"linucb": {"learner": "linucb"}}, max_arms=100)
    bandits = BanditsProcessor(settings, None, Registry(), catalog)
    bandits.restore(0, None)
    rng = np.random.default_rng(6)

    def fb(item: str, n: int) -> Record:
        event = Feedback(
            feedback_id=f"r{n}/{item}",
            request_id=f"r{n}",
            user_id="u1",
            item_id=item,
            ts=time.time(),
            reward=0,
            position=0,
            propensity=0.5,
            policy="linucb",
            context=_context(rng),
        )
        return Record("feedback", 0, n, None, event, 0)

    bandits.apply([fb(item, n) for n, item in enumerate(real)], None)
    # Each flooded id arrives twice: past probation, so only the catalog protects real arms.
    flood = [fb(f"spam-{n // 2}", n) for n in range(10_000)]
    for lo in range(0, len(flood), 1000):
        bandits.apply(flood[lo : lo + 1000], None)
    held = set(bandits.learners[0]["linucb"].state()["items"].tolist())
    assert set(item_labels(real).tolist()) <= held


def test_a_position_aware_policy_learns_from_the_random_slates_through_kafka(
    kafka_bootstrap, redis_url, redis_client, keyspace, unique_name, topics, tmp_path
):
    """STREAMREC_BANDITS_POSITION_AWARE end to end (docs/decisions.md §23): the random
    policy's slates (one user, so one partition, in order) show θ_1 = 0.5, and the linucb
    feedback after them, all at position 1, is learnt as rows examined with probability 0.5."""
    rng = np.random.default_rng(7)
    base = time.time()

    def shown(i: int, policy: str, position: int, reward: int) -> Feedback:
        return Feedback(
            feedback_id=feedback_id(f"r{i}", f"i{i % 11}"),
            request_id=f"r{i}",
            user_id="u0",
            item_id=f"i{i % 11}",
            ts=base + i / 1000,
            reward=reward,
            position=position,
            propensity=0.5,
            policy=policy,
            context=_context(rng),
        )

    randomised = [shown(i, "random", i % 2, int(i % 2 == 0 or i % 4 == 1)) for i in range(400)]
    learnt = [shown(i, "linucb", 1, int(rng.random() < 0.2)) for i in range(400, 1400)]
    _produce(kafka_bootstrap, topics["feedback"], randomised + learnt)
    store = ParamStore(redis_client, keys=keyspace)
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("bandits"), **topics) | {
        "STREAMREC_BANDITS_POSITION_AWARE": '["linucb"]',
        "STREAMREC_BANDITS_EXAMINATION_PRIOR_SHOWS": "0",
    }
    bandits = ServiceProcess("bandits", env, tmp_path / "b.log").start()
    try:
        wait_for(lambda: _applied(store) == len(learnt), 60, "the linucb feedback applied")
        header, arrays = _published(store)
    finally:
        assert bandits.stop() == 0
    reference = LinUCB(DIM, alpha=0.5)
    reference.update(
        item_labels([f.item_id for f in learnt]),
        np.array([f.context for f in learnt]),
        np.array([f.reward for f in learnt], dtype=float),
        np.full(len(learnt), 0.5),
    )
    _assert_same_model(arrays, reference.state())
