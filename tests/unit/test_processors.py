"""Each service's processor through the consumer runtime, on the in-memory harness.

The five consumer services (joiner, sequences, bandits, DRN, embeddings) run as
their ``SPEC`` declares them (its inputs and decoders, its runtime class) over
:class:`~tests.harness.MemoryBroker` and :class:`~tests.harness.MemoryCheckpoints`,
with in-memory stand-ins for the Redis stores they write to. Records go in as
bytes, and what comes out is checked: feedback on its topic, sequences, learner
state in the checkpoint and in what is published, restores after a crash, and
dead letters. The same services run on the real Kafka and Redis in tests/integration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgspec
import numpy as np
import pytest
import redis
import torch
from prometheus_client import CollectorRegistry

from contracts.events import (
    MAX_SLATE,
    Click,
    Feedback,
    Impression,
    SlateItem,
    decode_feedback,
    encode,
)
from contracts.params import decode_params
from services.bandits.position import ExaminationModel
from services.bandits.service import SPEC as BANDITS
from services.bandits.service import BanditsProcessor, BanditsSettings
from services.common.runtime import (
    REASON_HEADER,
    SEQ_HEADER,
    SOURCE_HEADER,
    ConsumerRuntime,
    Processor,
    Record,
)
from services.common.service import ServiceSpec
from services.common.settings import RuntimeSettings, TopicSettings
from services.drn.service import SPEC as DRN
from services.drn.service import DRNProcessor
from services.embeddings.service import SPEC as EMBEDDINGS
from services.embeddings.service import (
    EmbeddingsMetrics,
    EmbeddingsProcessor,
    EmbeddingsSettings,
)
from services.evaluation.drn import served_feedback
from services.joiner.service import SPEC as JOINER
from services.joiner.service import JoinerSettings, JoinProcessor
from services.sequences.service import SPEC as SEQUENCES
from services.sequences.service import SequencesMetrics, SequencesProcessor
from tests.harness import (
    MemoryBroker,
    MemoryCheckpoints,
    MemoryParamStore,
    MemorySequenceStore,
    MemorySnapshotPublisher,
    small_drn_settings,
)

torch.set_num_threads(1)

T0 = 1_700_000_000.0
TOPICS = TopicSettings()
IMPRESSIONS, CLICKS, FEEDBACK, DLQ = (
    TOPICS.impressions,
    TOPICS.clicks,
    TOPICS.feedback,
    TOPICS.dead_letter,
)
CONTEXT = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]  # the bandits' context_dim is 9


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker({IMPRESSIONS: 2, CLICKS: 2, FEEDBACK: 2, DLQ: 1})


class Process:
    """One service process: its processor and runtime, sharing one metrics registry."""

    def __init__(
        self,
        spec: ServiceSpec[Any],
        make: Callable[[CollectorRegistry], Processor],
        broker: MemoryBroker,
        store: MemoryCheckpoints,
    ) -> None:
        self.spec = spec
        self.registry = CollectorRegistry()
        self.processor: Any = make(self.registry)
        self.runtime: ConsumerRuntime = spec.runtime_class(
            service=spec.name,
            group=spec.name,
            inputs=spec.inputs(TOPICS),
            processor=self.processor,
            topics=TOPICS,
            settings=RuntimeSettings(checkpoint_interval_s=3600),
            registry=self.registry,
            connections=broker.connections(store),
        )
        self.runtime.open()

    def drain(self, polls: int = 4) -> None:
        for _ in range(polls):
            self.runtime.poll_once()

    def checkpoint(self) -> None:
        assert self.runtime.checkpoint(force=True)

    def crash(self) -> None:
        """What an exception in ``run`` does: leave without a checkpoint."""
        self.runtime._failed = True
        self.runtime.close()

    def sample(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def events(self, topic: str, outcome: str) -> float:
        labels = {"service": self.spec.name, "topic": topic, "outcome": outcome}
        return self.sample("streamrec_consumer_events_total", **labels)


def dead_letters(broker: MemoryBroker) -> list[dict[str, str]]:
    return [
        {name: value.decode() for name, value in m.headers} | {"value": m.value.decode()}
        for m in broker.read(DLQ)
    ]


def assert_same_arrays(got: Mapping[str, np.ndarray], expected: Mapping[str, np.ndarray]) -> None:
    assert set(got) == set(expected)
    for name, array in expected.items():
        np.testing.assert_allclose(got[name], array, rtol=1e-12, atol=1e-12, err_msg=name)


# -- joiner -------------------------------------------------------------------------


def impression(rid: str, ts: float, user: str = "u1") -> bytes:
    slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate("ab")]
    return encode(
        Impression(
            request_id=rid, user_id=user, ts=ts, policy="linucb", slate=slate, context=CONTEXT
        )
    )


def click(eid: str, item: str, ts: float, rid: str | None, user: str = "u1") -> bytes:
    return encode(Click(event_id=eid, user_id=user, item_id=item, ts=ts, request_id=rid))


def put(broker: MemoryBroker, topic: str, value: bytes, ts: float, partition: int = 0) -> int:
    """Append an event as its producer would: keyed by user, stamped with its time."""
    user = msgspec.json.decode(value)["user_id"].encode() if value.startswith(b"{") else None
    return broker.append(topic, value, partition=partition, key=user, timestamp_ms=int(ts * 1000))


def joiner(broker: MemoryBroker, store: MemoryCheckpoints) -> Process:
    settings = JoinerSettings(window_s=30, lateness_s=5, retry_horizon_s=0)
    return Process(
        JOINER, lambda registry: JoinProcessor(settings, TOPICS, registry), broker, store
    )


def joined(broker: MemoryBroker, partition: int = 0) -> list[tuple[str, str, int]]:
    return [
        (fb.request_id, fb.item_id, fb.reward)
        for fb in (decode_feedback(m.value) for m in broker.read(FEEDBACK, partition))
    ]


def test_joiner_turns_impressions_and_clicks_into_feedback_and_joins_a_duplicate_click_once(
    broker,
) -> None:
    put(broker, IMPRESSIONS, impression("r1", T0), T0)
    put(broker, CLICKS, click("c1", "a", T0 + 3, "r1"), T0 + 3)
    put(broker, CLICKS, click("c1", "a", T0 + 3, "r1"), T0 + 4)  # a client's retry
    put(broker, IMPRESSIONS, impression("r9", T0 + 1, user="u2"), T0 + 1, partition=1)
    run = joiner(broker, MemoryCheckpoints())
    run.drain()
    assert joined(broker) == [], "no window has closed yet"
    # Both streams move past r1's window (30 s) and lateness (5 s): r1 closes.
    put(broker, IMPRESSIONS, impression("r2", T0 + 40), T0 + 40)
    put(broker, CLICKS, click("c2", "b", T0 + 41, "r2"), T0 + 41)
    run.drain()
    assert joined(broker) == [("r1", "a", 1), ("r1", "b", 0)]
    assert joined(broker, 1) == [], "partition 1's window is still open"
    [first, second] = broker.read(FEEDBACK)
    assert first.key == b"u1"
    headers = [dict(m.headers) for m in (first, second)]
    assert [(h[SOURCE_HEADER], h[SEQ_HEADER]) for h in headers] == [
        (b"joiner:0", b"0"),
        (b"joiner:0", b"1"),
    ]
    fb = decode_feedback(first.value)
    assert (fb.feedback_id, fb.clicked_at, fb.context) == ("r1/a", T0 + 3, CONTEXT)
    assert run.sample("streamrec_joiner_clicks_total", outcome="duplicate") == 1
    assert run.sample("streamrec_joiner_feedback_total", reward="1") == 1
    assert run.sample("streamrec_joiner_policy_feedback_total", policy="linucb") == 2
    assert run.sample("streamrec_joiner_policy_rewards_total", policy="linucb") == 1
    assert run.events(CLICKS, "applied") == 3


def test_joiner_restarted_from_its_checkpoint_changes_nothing_downstream(broker) -> None:
    """The joiner crashes after emitting feedback it had not checkpointed; its successor
    re-reads the log from the checkpoint, emits the same feedback with the same stamps,
    and the bandits consuming ``feedback`` apply each one once."""
    store = MemoryCheckpoints()
    put(broker, IMPRESSIONS, impression("r1", T0), T0)
    put(broker, CLICKS, click("c1", "a", T0 + 3, "r1"), T0 + 3)
    put(broker, IMPRESSIONS, impression("r2", T0 + 40), T0 + 40)
    put(broker, CLICKS, click("c2", "b", T0 + 41, "r2"), T0 + 41)
    first = joiner(broker, store)
    first.drain()
    first.checkpoint()
    assert len(broker.read(FEEDBACK)) == 2
    put(broker, IMPRESSIONS, impression("r3", T0 + 45), T0 + 45)
    put(broker, IMPRESSIONS, impression("r4", T0 + 90), T0 + 90)
    put(broker, CLICKS, click("c4", "a", T0 + 90, "r4"), T0 + 90)
    first.drain()
    once = [("r1", "a", 1), ("r1", "b", 0), ("r2", "a", 0), ("r2", "b", 1)]
    once += [("r3", "a", 0), ("r3", "b", 0)]
    assert joined(broker) == once
    first.crash()

    second = joiner(broker, store)
    second.drain()
    second.checkpoint()  # refused while re-reading below the checkpoint; done by now
    out = broker.read(FEEDBACK)
    assert joined(broker) == once + once[2:], "r2 and r3 were emitted again"
    stamps: dict[tuple[bytes, bytes], bytes] = {}
    for m in out:
        h = dict(m.headers)
        assert stamps.setdefault((h[SOURCE_HEADER], h[SEQ_HEADER]), m.value) == m.value
    assert len(stamps) == 6, "a re-emission carries its original's stamp"
    assert store.load([0])[0].emit_seq == {f"{FEEDBACK}|0": 6}

    settings = BanditsSettings(policies={"linucb": {"learner": "linucb", "alpha": 0.5}})
    bandits = Process(
        BANDITS,
        lambda registry: BanditsProcessor(settings, None, registry),
        broker,
        MemoryCheckpoints(),
    )
    bandits.drain()
    assert bandits.events(FEEDBACK, "duplicate") == 4
    assert bandits.sample("streamrec_bandits_updates_total", policy="linucb") == 6
    assert bandits.sample("streamrec_bandits_rewards_total", policy="linucb") == 2


# -- sequences ----------------------------------------------------------------------


def sequences(
    broker: MemoryBroker, store: MemorySequenceStore, checkpoints: MemoryCheckpoints
) -> Process:
    return Process(
        SEQUENCES,
        lambda registry: SequencesProcessor(
            store, retries=2, metrics=SequencesMetrics(registry), sleep=lambda _s: None
        ),
        broker,
        checkpoints,
    )


def test_sequences_keeps_each_users_clicks_in_time_order(broker) -> None:
    store = MemorySequenceStore()
    put(broker, CLICKS, click("c1", "i1", T0, None), T0)
    put(broker, CLICKS, click("c2", "i2", T0 + 2, None), T0 + 2)
    put(broker, CLICKS, click("c3", "i3", T0 + 1, None), T0 + 3)  # arrives out of order
    put(broker, CLICKS, click("c2", "i2", T0 + 2, None), T0 + 4)  # a producer's retry
    put(broker, CLICKS, click("c9", "i9", T0, None, user="u2"), T0, partition=1)
    run = sequences(broker, store, MemoryCheckpoints())
    run.drain()
    assert store.items("u1") == ["i1", "i3", "i2"]
    assert store.items("u2") == ["i9"]
    assert store.users["u1"]["n"] == 3
    assert run.sample("streamrec_sequences_clicks_total", outcome="added") == 4
    assert run.sample("streamrec_sequences_clicks_total", outcome="duplicate") == 1


def test_sequences_applies_a_batch_redelivered_after_a_crash_once(broker) -> None:
    store, checkpoints = MemorySequenceStore(), MemoryCheckpoints()
    for i in range(3):
        put(broker, CLICKS, click(f"c{i}", f"i{i}", T0 + i, None), T0 + i)
    first = sequences(broker, store, checkpoints)
    first.drain()
    first.checkpoint()
    for i in range(3, 6):
        put(broker, CLICKS, click(f"c{i}", f"i{i}", T0 + i, None), T0 + i)
    first.drain()
    first.crash()  # clicks 3..5 are in the store, their offsets not in the checkpoint
    assert store.users["u1"]["n"] == 6

    second = sequences(broker, store, checkpoints)
    second.drain()
    assert second.sample("streamrec_sequences_clicks_total", outcome="redelivered") == 3
    assert second.sample("streamrec_sequences_clicks_total", outcome="added") == 0
    assert store.items("u1") == [f"i{i}" for i in range(6)]
    assert store.users["u1"]["n"] == 6
    second.checkpoint()
    assert checkpoints.load([0])[0].offsets == {CLICKS: 6}


def test_sequences_retries_a_redis_error_and_refuses_clicks_from_the_future(broker) -> None:
    store = MemorySequenceStore()
    store.failures.append(redis.ConnectionError("Connection reset by peer"))
    put(broker, CLICKS, click("c1", "i1", T0, None), T0)
    put(broker, CLICKS, click("c2", "i2", 4_000_000_000.0, None), T0 + 1)
    run = sequences(broker, store, MemoryCheckpoints())
    run.drain()
    assert store.items("u1") == ["i1"]
    assert run.sample("streamrec_sequences_redis_retries_total") == 1
    [dead] = dead_letters(broker)
    assert dead["streamrec-dlq-offset"] == "1"
    assert dead[REASON_HEADER].startswith("invalid: ts 4000000000.000 is")
    assert dead[REASON_HEADER].endswith("s in the future")


# -- bandits ------------------------------------------------------------------------

POLICIES = {
    "linucb": {"learner": "linucb", "alpha": 0.5},
    "ts": {"learner": "ts_linear", "v": 0.1},
    "ts_beta": {"learner": "ts_beta"},
}


def feedback(n: int, policy: str, reward: int) -> Feedback:
    context = [0.1 * (n % 7), *CONTEXT[1:]]
    return Feedback(
        feedback_id=f"r{n}/i{n % 5}",
        request_id=f"r{n}",
        user_id=f"u{n % 3}",
        item_id=f"i{n % 5}",
        ts=T0 + n,
        reward=reward,
        position=0,
        propensity=0.5,
        policy=policy,
        context=context,
    )


def feedback_stream(start: int, stop: int) -> list[Feedback]:
    policies = [*POLICIES, "random"]
    return [feedback(n, policies[n % 4], int(n % 3 == 0)) for n in range(start, stop)]


def part(n: int) -> int:
    """The partition of the ``n``-th feedback: every policy gets some in both."""
    return (n // 4) % 2


def bandits(broker: MemoryBroker, store: MemoryCheckpoints, params: MemoryParamStore) -> Process:
    settings = BanditsSettings(policies=POLICIES)
    return Process(
        BANDITS,
        lambda registry: BanditsProcessor(settings, params, registry),
        broker,
        store,
    )


def learner_states(processor: BanditsProcessor) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Copies of every learner's state (``state()`` may share the learner's arrays)."""
    return {
        p: {
            policy: {name: array.copy() for name, array in learner.state().items()}
            for policy, learner in learners.items()
        }
        for p, learners in processor.learners.items()
    }


def bandits_reference(stream: list[Feedback]) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Each partition's learners, applied in process in one pass (no runtime)."""
    reference = BanditsProcessor(BanditsSettings(policies=POLICIES), None)
    for partition in (0, 1):
        reference.restore(partition, None)
    reference.apply(
        [Record(FEEDBACK, part(n), n, None, fb, 0) for n, fb in enumerate(stream)],
        None,  # type: ignore[arg-type]
    )
    return learner_states(reference)


def test_bandits_learn_each_policy_checkpoint_it_and_publish_it(broker) -> None:
    stream = feedback_stream(0, 40)
    for n, fb in enumerate(stream):
        broker.append(FEEDBACK, encode(fb), partition=part(n))
    checkpoints, params = MemoryCheckpoints(), MemoryParamStore()
    run = bandits(broker, checkpoints, params)
    run.drain()
    learners = run.processor.learners
    assert {p: learners[p]["linucb"].n_arms for p in (0, 1)} == {0: 5, 1: 5}
    assert run.sample("streamrec_bandits_updates_total", policy="linucb") == 10
    assert run.sample("streamrec_bandits_ignored_total", policy="random") == 10
    assert params.versions == {}, "nothing is published before its checkpoint"
    run.checkpoint()
    for partition in (0, 1):
        saved = decode_params(checkpoints.load([partition])[partition].state).arrays
        for policy, learner in learners[partition].items():
            got = {k.split("/", 1)[1]: v for k, v in saved.items() if k.startswith(f"{policy}/")}
            assert_same_arrays(got, learner.state())
    for policy in POLICIES:
        published = params.latest(policy)
        assert sorted(published.parts) == ["p0", "p1"]
        events = 0
        for partition in (0, 1):
            blob = decode_params(published.parts[f"p{partition}"])
            assert blob.offsets == {FEEDBACK: {partition: 20}}
            assert_same_arrays(blob.arrays, learners[partition][policy].state())
            events += blob.meta["events"]
        # Events seen (`streamrec models list`): the feedback this policy's learners applied.
        assert events == run.sample("streamrec_bandits_updates_total", policy=policy)
    assert learners[0]["linucb"].state()["counts"].sum() == 5


def test_bandits_restored_after_a_crash_apply_each_feedback_once(broker) -> None:
    stream = feedback_stream(0, 60)
    checkpoints, params = MemoryCheckpoints(), MemoryParamStore()
    for n, fb in enumerate(stream[:40]):
        broker.append(FEEDBACK, encode(fb), partition=part(n))
    first = bandits(broker, checkpoints, params)
    first.drain()
    first.checkpoint()
    at_checkpoint = learner_states(first.processor)
    for n, fb in enumerate(stream[40:], start=40):
        broker.append(FEEDBACK, encode(fb), partition=part(n))
    first.drain()
    first.crash()

    # What the runtime checkpointed restores the learners as they were at the checkpoint.
    restored = BanditsProcessor(BanditsSettings(policies=POLICIES), None)
    for partition, checkpoint in checkpoints.load([0, 1]).items():
        assert restored.restore(partition, checkpoint) is None, "resume at its offsets"
    for partition in (0, 1):
        for policy in POLICIES:
            assert_same_arrays(
                learner_states(restored)[partition][policy], at_checkpoint[partition][policy]
            )

    second = bandits(broker, checkpoints, params)
    second.drain()
    expected = bandits_reference(stream)
    for partition in (0, 1):
        for policy in POLICIES:
            assert_same_arrays(
                learner_states(second.processor)[partition][policy], expected[partition][policy]
            )
    second.checkpoint()
    assert params.fences[("linucb", "p0")] == ("bandits", 2), "published under the new epoch"
    published = params.latest("linucb").parts
    events = sum(decode_params(published[f"p{p}"]).meta["events"] for p in (0, 1))
    assert events == sum(fb.policy == "linucb" for fb in stream), "counted once across the crash"
    assert params.latest("linucb").version == 2


def positioned(n: int, policy: str, position: int, reward: int) -> Feedback:
    """Feedback ``n`` of ``policy`` for item ``i1`` shown at ``position``."""
    return msgspec.structs.replace(
        feedback(n, policy, reward), item_id="i1", feedback_id=f"r{n}/i1", position=position
    )


def position_stream(start: int, stop: int) -> list[Feedback]:
    """Random slates clicked always at the top and every other time at position 1 (in
    each partition), interleaved with linucb feedback at position 1."""
    out = []
    for n in range(start, stop):
        m = n // 2
        if n % 2 == 0:
            out.append(positioned(n, "random", m % 2, int(m % 2 == 0 or (m // 4) % 2 == 0)))
        else:
            out.append(positioned(n, "linucb", 1, int(n % 3 == 0)))
    return out


def test_bandits_learn_position_aware_from_the_random_slates_and_checkpoint_the_model(
    broker,
) -> None:
    aware = BanditsSettings(
        policies={"linucb": POLICIES["linucb"]},
        position_aware=["linucb"],
        examination_prior_shows=0.0,
    )
    stream = position_stream(0, 80)
    checkpoints, params = MemoryCheckpoints(), MemoryParamStore()
    for n, fb in enumerate(stream[:40]):
        broker.append(FEEDBACK, encode(fb), partition=part(n))

    def process() -> Process:
        return Process(BANDITS, lambda r: BanditsProcessor(aware, params, r), broker, checkpoints)

    first = process()
    first.drain()
    assert first.sample("streamrec_bandits_examination_updates_total") == 20
    first.checkpoint()
    assert decode_params(params.latest("linucb").parts["p0"]).meta["position_aware"] is True
    for n, fb in enumerate(stream[40:], start=40):
        broker.append(FEEDBACK, encode(fb), partition=part(n))
    first.drain()
    first.crash()

    # Restored from the checkpoint (examination model included), the second process ends
    # where one pass over the whole log does.
    second = process()
    second.drain()
    reference = BanditsProcessor(aware, None)
    for partition in (0, 1):
        reference.restore(partition, None)
    records = [Record(FEEDBACK, part(n), n, None, fb, 0) for n, fb in enumerate(stream)]
    reference.apply(records, None)  # type: ignore[arg-type]
    for partition in (0, 1):
        assert reference.examination[partition].theta()[:2].tolist() == [1.0, 0.5]
        assert_same_arrays(
            second.processor.examination[partition].state(),
            reference.examination[partition].state(),
        )
        assert_same_arrays(
            learner_states(second.processor)[partition]["linucb"],
            learner_states(reference)[partition]["linucb"],
        )
        # Each linucb feedback enters the regression as θ x, θ estimated from the random
        # slates before it in its partition: Gram Σ θ² x xᵀ, b Σ θ r x.
        model = ExaminationModel(MAX_SLATE, prior_shows=0.0)
        gram, b = np.zeros((9, 9)), np.zeros(9)
        for n, fb in enumerate(stream):
            if part(n) != partition:
                continue
            if fb.policy == "random":
                model.observe_one(fb.position, fb.reward)
            else:
                x = model.examination(np.array([fb.position]))[0] * np.array(fb.context)
                gram += np.outer(x, x)
                b += fb.reward * x
        state = reference.learners[partition]["linucb"].state()
        np.testing.assert_allclose(state["gram"][0], gram, rtol=1e-12)
        np.testing.assert_allclose(state["b"][0], b, rtol=1e-12)
        assert state["b"][0][-1] < 0.9 * sum(  # the blind sum of rewards (last feature 1)
            fb.reward for n, fb in enumerate(stream) if part(n) == partition and n % 2
        )


def test_position_aware_policies_must_be_configured_and_able_to_learn_positions() -> None:
    with pytest.raises(ValueError, match="no configured policy"):
        BanditsProcessor(BanditsSettings(policies=POLICIES, position_aware=["nope"]), None)
    egreedy = {"egreedy": {"learner": "egreedy"}}
    with pytest.raises(ValueError, match="cannot learn position-aware"):
        BanditsProcessor(BanditsSettings(policies=egreedy, position_aware=["egreedy"]), None)


# -- DRN ----------------------------------------------------------------------------


def drn(broker: MemoryBroker, store: MemoryCheckpoints, params: MemoryParamStore) -> Process:
    return Process(
        DRN,
        lambda registry: DRNProcessor(small_drn_settings(), params, registry),
        broker,
        store,
    )


def test_drn_trains_on_the_slates_and_a_restart_continues_where_the_checkpoint_was(
    broker,
) -> None:
    settings = small_drn_settings()
    stream = served_feedback(settings, 24, k=4)
    checkpoints, params = MemoryCheckpoints(), MemoryParamStore()
    for fb in stream[:48]:
        broker.append(FEEDBACK, encode(fb), key=fb.user_id.encode())
    first = drn(broker, checkpoints, params)
    first.drain()
    first.checkpoint()
    assert first.processor.applied == 48
    assert first.processor.trainer.counters["slates"] == 11, "the 12th slate is still open"
    stored = checkpoints.load([0, 1])
    assert stored[1].state == b"" and stored[1].offsets == {}, "one model, in partition 0"
    assert stored[0].offsets == {FEEDBACK: 48}
    for fb in stream[48:]:
        broker.append(FEEDBACK, encode(fb), key=fb.user_id.encode())
    first.drain()
    first.crash()

    second = drn(broker, checkpoints, params)
    second.drain()
    assert second.processor.applied == len(stream) == 96
    reference = DRNProcessor(settings, None)  # one uninterrupted pass, no runtime
    reference.restore(0, None)
    reference.apply(
        [
            Record(FEEDBACK, 0, n, None, decode_feedback(encode(fb)), 0)
            for n, fb in enumerate(stream)
        ],
        None,  # type: ignore[arg-type]
    )
    trainer = second.processor.trainer
    counters = trainer.counters
    assert counters == reference.trainer.counters
    assert counters["slates"] == 23 and counters["credited"] > 0
    assert counters["minor_updates"] >= 1 and counters["transitions"] > 0
    arrays, meta = trainer.state()
    expected_arrays, expected_meta = reference.trainer.state()
    assert meta == expected_meta
    for name, array in expected_arrays.items():
        np.testing.assert_array_equal(arrays[name], array, err_msg=name)

    second.checkpoint()
    published = decode_params(params.latest("drn").parts["main"])
    assert published.meta["applied"] == 96
    assert published.offsets == {FEEDBACK: {0: 96}}
    assert published.meta["explore_version"] == trainer.learner.explore_version
    for name, array in trainer.learner.weights().items():
        np.testing.assert_array_equal(published.arrays[f"W/{name}"], array)


# -- embeddings ---------------------------------------------------------------------


def embeddings(
    broker: MemoryBroker, store: MemoryCheckpoints
) -> tuple[Process, MemorySnapshotPublisher]:
    settings = EmbeddingsSettings(dim=8, window=3, negatives=2, popular_n=3, fresh_n=10)
    publishers: list[MemorySnapshotPublisher] = []

    def make(registry: CollectorRegistry) -> EmbeddingsProcessor:
        publishers.append(MemorySnapshotPublisher(EmbeddingsMetrics(registry)))
        return EmbeddingsProcessor(settings, publishers[-1])

    return Process(EMBEDDINGS, make, broker, store), publishers[0]


SESSIONS = {
    "u1": ["a", "b", "c", "a"],
    "u2": ["a", "b", "d"],
    "u3": ["e", "f"],
}


def test_embeddings_learn_item_vectors_from_clicks_and_publish_after_the_checkpoint(
    broker,
) -> None:
    for u, (user, items) in enumerate(SESSIONS.items()):
        for n, item in enumerate(items):
            ts = T0 + 10 * n + u
            put(broker, CLICKS, click(f"{user}-{n}", item, ts, None, user=user), ts, u % 2)
    store = MemoryCheckpoints()
    run, publisher = embeddings(broker, store)
    run.drain()
    model = run.processor.model
    assert sorted(model.item_ids) == ["a", "b", "c", "d", "e", "f"]
    # A click pairs with the user's earlier clicks in the window (3): u1 1+2+3 pairs,
    # one of them a with a (not counted), u2 1+2, u3 1; each trains both directions.
    assert run.sample("streamrec_embeddings_pairs_total") == 2 * (5 + 3 + 1)
    assert publisher.jobs == [], "nothing is published before its checkpoint"
    run.checkpoint()
    [job] = publisher.jobs
    assert sorted(job.item_ids) == sorted(model.item_ids)
    np.testing.assert_allclose(np.linalg.norm(job.vectors, axis=1), 1.0, rtol=1e-5)
    assert list(job.popular)[0] == "a", "clicked three times, the others at most twice"
    assert set(job.fresh) == set(model.item_ids)
    stored = store.load([0, 1])
    assert stored[1].state == b"", "the one model lives in the lowest partition's checkpoint"
    assert stored[0].offsets == {CLICKS: 6} and stored[1].offsets == {CLICKS: 3}
    run.runtime.close()

    again, _ = embeddings(broker, store)
    again.runtime.poll_once()  # joins the group: restores from the checkpoints
    ids, vectors = again.processor.model.vectors()
    expected_ids, expected = model.vectors()
    assert ids == expected_ids
    np.testing.assert_array_equal(vectors, expected)
    assert again.processor.stats.popular(3) == run.processor.stats.popular(3)


# -- dead letters, for every service ------------------------------------------------


def _bandits(registry: CollectorRegistry) -> Processor:
    return BanditsProcessor(BanditsSettings(policies=POLICIES), MemoryParamStore(), registry)


SERVICES: dict[
    str, tuple[ServiceSpec[Any], Callable[[CollectorRegistry], Processor], str, bytes]
] = {
    "joiner": (
        JOINER,
        lambda registry: JoinProcessor(JoinerSettings(), TOPICS, registry),
        CLICKS,
        click("c1", "a", T0, "r1"),
    ),
    "sequences": (
        SEQUENCES,
        lambda registry: SequencesProcessor(MemorySequenceStore()),
        CLICKS,
        click("c1", "a", T0, None),
    ),
    "bandits": (BANDITS, _bandits, FEEDBACK, encode(feedback(0, "linucb", 1))),
    "drn": (
        DRN,
        lambda registry: DRNProcessor(small_drn_settings(), None, registry),
        FEEDBACK,
        encode(feedback(0, "ts", 1)),
    ),
    "embeddings": (
        EMBEDDINGS,
        lambda registry: EmbeddingsProcessor(EmbeddingsSettings(dim=4), None, registry),
        CLICKS,
        click("c1", "a", T0, None),
    ),
}


@pytest.mark.parametrize("service", list(SERVICES))
def test_an_undecodable_record_is_dead_lettered_with_its_reason_and_source(broker, service) -> None:
    spec, make, topic, good = SERVICES[service]
    broker.append(topic, good)
    broker.append(topic, b'{"user_id": ')
    broker.append(topic, b'{"surprise": true}')
    broker.append(topic, good)
    store = MemoryCheckpoints()
    run = Process(spec, make, broker, store)
    run.drain()
    run.checkpoint()
    assert [
        (d["streamrec-dlq-offset"], d[REASON_HEADER].split(":")[0]) for d in dead_letters(broker)
    ] == [
        ("1", "malformed"),
        ("2", "invalid"),
    ]
    for dead in dead_letters(broker):
        assert dead["streamrec-dlq-topic"] == topic
        assert dead["streamrec-dlq-partition"] == "0"
        assert dead["streamrec-dlq-service"] == spec.name
    assert dead_letters(broker)[0]["value"] == '{"user_id": '
    assert run.events(topic, "dead_letter") == 2
    assert run.events(topic, "applied") == 2
    assert store.load([0])[0].offsets[topic] == 4, "the service went on past them"


@pytest.mark.parametrize(
    ("service", "reason"),
    [
        ("bandits", "invalid: context has 3 features, expected 9"),
        ("drn", "invalid: context has 3 values, the DRN state has 32"),
    ],
)
def test_feedback_of_the_wrong_shape_is_refused_by_the_learner_and_dead_lettered(
    broker, service, reason
) -> None:
    spec, make, topic, _ = SERVICES[service]
    policy = "linucb" if service == "bandits" else "drn"
    short = msgspec.structs.replace(feedback(1, policy, 1), context=[0.1, 0.2, 0.3])
    broker.append(topic, encode(feedback(0, "linucb", 1)))
    broker.append(topic, encode(short))
    run = Process(spec, make, broker, MemoryCheckpoints())
    run.drain()
    [dead] = dead_letters(broker)
    assert (dead["streamrec-dlq-offset"], dead[REASON_HEADER]) == ("1", reason)
    assert decode_feedback(dead["value"].encode()) == short, "dead-lettered as it was consumed"
    assert run.events(topic, "dead_letter") == 1
    assert run.events(topic, "applied") == 1
