"""The consumer runtime on the in-memory harness: its batch path in milliseconds.

Exactly-once restore, dead letters, the producer stamp and its de-duplication,
poison headers and control records, fencing, checkpoints only after Kafka
acknowledged the output, retried polls, and offsets Kafka no longer has. The
same behaviours run against the real broker and Redis in tests/integration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import pytest
import redis
from kafka import TopicPartition
from kafka.errors import KafkaConnectionError, MessageSizeTooLargeError
from prometheus_client import CollectorRegistry

from contracts.events import EventError
from services.common.checkpoint import Checkpoint
from services.common.runtime import (
    CONTROL_HEADER,
    REASON_HEADER,
    SEQ_HEADER,
    SOURCE_HEADER,
    ConsumerRuntime,
    Context,
    Processor,
    Record,
    Rejection,
    SendFailed,
)
from services.common.settings import RuntimeSettings, TopicSettings
from tests.harness import MemoryBroker, MemoryCheckpoints

IN, OUT, DLQ = "numbers", "doubled", "dead"


def decode_number(raw: bytes) -> int:
    try:
        value = json.loads(raw)
    except ValueError:
        raise EventError("malformed: not JSON") from None
    if not isinstance(value, int):
        raise EventError("invalid: not an integer")
    return value


def decode_mark(raw: bytes) -> float:
    value = decode_number(raw)
    if not 0 <= value <= 10**6:
        raise EventError(f"invalid: mark {value} out of range")
    return float(value)


class Tally(Processor):
    """Counts and sums numbers per partition; refuses 13; optionally emits each one doubled."""

    def __init__(self, emit: bool = False, controls: Mapping[str, object] | None = None) -> None:
        self.emit = emit
        self.state: dict[int, list[int]] = {}
        self.calls: list[tuple[str, object]] = []
        if controls is not None:
            self.controls = controls  # type: ignore[assignment]

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        refused = []
        for record in records:
            if record.value == 13:
                refused.append(Rejection(record, "unlucky: 13"))
                continue
            self.calls.append(("apply", record.value))
            tally = self.state[record.partition]
            tally[0] += 1
            tally[1] += record.value
            if self.emit:
                value = json.dumps(2 * record.value).encode()
                ctx.emit(OUT, value, key=None, source_partition=record.partition)
        return refused

    def control(self, record: Record, ctx: Context) -> None:
        self.calls.append(("control", record.value))

    def snapshot(self, partition: int) -> bytes:
        return json.dumps(self.state[partition]).encode()

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> None:
        state = checkpoint.state if checkpoint and checkpoint.state else b"[0, 0]"
        self.state[partition] = json.loads(state)

    def revoke(self, partition: int) -> None:
        del self.state[partition]


def runtime(
    broker: MemoryBroker,
    store: MemoryCheckpoints,
    processor: Processor,
    *,
    topic: str = IN,
    group: str = "g",
    **settings,
) -> ConsumerRuntime:
    made = ConsumerRuntime(
        service="tally",
        group=group,
        inputs={topic: decode_number},
        processor=processor,
        topics=TopicSettings(dead_letter=DLQ),
        settings=RuntimeSettings(checkpoint_interval_s=3600, **settings),
        registry=CollectorRegistry(),
        connections=broker.connections(store),
    )
    made.open()
    return made


def drain(runtime: ConsumerRuntime, polls: int = 5) -> None:
    for _ in range(polls):
        runtime.poll_once()


def crash(runtime: ConsumerRuntime) -> None:
    """What an exception in ``run`` does: close without a checkpoint."""
    runtime._failed = True
    runtime.close()


def dead_letters(broker: MemoryBroker) -> list[tuple[int, str]]:
    return [
        (
            int(dict(m.headers)["streamrec-dlq-offset"]),
            dict(m.headers)[REASON_HEADER].decode(),
        )
        for m in broker.read(DLQ)
    ]


def sample(run: ConsumerRuntime, name: str, **labels: str) -> float:
    return run.registry.get_sample_value(name, {"service": "tally", **labels}) or 0.0


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker({IN: 2, OUT: 2, DLQ: 1})


def test_a_restart_resumes_at_the_checkpoint_and_applies_each_record_once(broker) -> None:
    store = MemoryCheckpoints()
    for i in range(10):
        broker.append(IN, b"%d" % i, partition=i % 2)
    first = runtime(broker, store, Tally())
    drain(first)
    assert first.checkpoint(force=True)
    for i in range(10, 16):
        broker.append(IN, b"%d" % i, partition=i % 2)
    drain(first)
    crash(first)  # the last six were applied but not checkpointed
    second = runtime(broker, store, Tally())
    drain(second)
    assert second.processor.state == {0: [8, 56], 1: [7, 64 - 13]}  # 13 is refused


def test_bad_values_and_refusals_are_dead_lettered_with_reason_and_offset(broker) -> None:
    for raw in (b"1", b"not json", b"2", b"13", b'"three"', b"4"):
        broker.append(IN, raw)
    run = runtime(broker, MemoryCheckpoints(), Tally())
    drain(run)
    assert run.processor.state[0] == [3, 7]
    assert sorted(dead_letters(broker)) == [
        (1, "malformed: not JSON"),
        (3, "unlucky: 13"),
        (4, "invalid: not an integer"),
    ]
    assert sample(run, "streamrec_consumer_events_total", topic=IN, outcome="applied") == 3


def _stamped(source: bytes, seq: bytes) -> list[tuple[str, bytes]]:
    return [(SOURCE_HEADER, source), (SEQ_HEADER, seq)]


def test_re_emissions_after_a_crash_are_dropped_downstream(broker) -> None:
    """The emitter crashes after emitting, re-emits from its checkpoint with the same
    sequence numbers, and the consumer of its output applies each value once."""
    store, downstream_store = MemoryCheckpoints(), MemoryCheckpoints()
    for i in range(6):
        broker.append(IN, b"%d" % i)
    emitter = runtime(broker, store, Tally(emit=True))
    drain(emitter)
    crash(emitter)
    emitter = runtime(broker, store, Tally(emit=True))
    drain(emitter)
    assert emitter.checkpoint(force=True)
    assert len(broker.read(OUT)) == 12, "everything was emitted twice"
    consumer = runtime(broker, downstream_store, Tally(), topic=OUT, group="down")
    drain(consumer)
    assert consumer.processor.state[0] == [6, 30]
    duplicates = sample(consumer, "streamrec_consumer_events_total", topic=OUT, outcome="duplicate")
    assert duplicates == 6


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        ([(SOURCE_HEADER, b"joiner:0")], "streamrec-seq must be a non-negative integer"),
        (_stamped(b"joiner:0", b"seven"), "streamrec-seq must be a non-negative integer"),
        (_stamped(b"joiner:0", b"-1"), "streamrec-seq must be a non-negative integer"),
        (_stamped(b"joiner:\xff", b"1"), "streamrec-src must be 'group:partition'"),
        (_stamped(b"\xc3\x28:0", b"1"), "streamrec-src must be 'group:partition'"),
        ([(SEQ_HEADER, b"1")], "streamrec-src must be 'group:partition'"),
    ],
)
def test_malformed_stamps_are_dead_lettered_and_the_service_goes_on(
    broker, headers, reason
) -> None:
    broker.append(IN, b"1")
    broker.append(IN, b"2", headers=headers)
    broker.append(IN, b"3")
    run = runtime(broker, MemoryCheckpoints(), Tally())
    drain(run)
    assert run.processor.state[0] == [2, 4]
    assert dead_letters(broker) == [(1, f"invalid header: {reason}")]


def test_a_spoofed_huge_sequence_number_does_not_silence_the_real_source(broker) -> None:
    for seq in (b"0", b"1", b"999999999999", b"2", b"3"):
        broker.append(IN, seq, headers=_stamped(b"joiner:0", seq))
    run = runtime(broker, MemoryCheckpoints(), Tally())
    drain(run)
    assert run.processor.state[0] == [4, 6], "the real 0..3 are all applied"
    [(offset, reason)] = dead_letters(broker)
    assert offset == 2 and reason.startswith("sequence gap: joiner:0 sent 999999999999 after 1")


def test_control_records_are_applied_in_log_order_only_where_expected(broker) -> None:
    broker.append(IN, b"1")
    broker.append(IN, b"5", headers=[(CONTROL_HEADER, b"1")])
    broker.append(IN, b"2")
    run = runtime(broker, MemoryCheckpoints(), Tally(controls={IN: decode_mark}))
    drain(run)
    assert run.processor.calls == [("apply", 1), ("control", 5.0), ("apply", 2)]


def test_a_control_record_on_a_topic_without_them_or_out_of_range_is_dead_lettered(
    broker,
) -> None:
    broker.append(IN, b"1", headers=[(CONTROL_HEADER, b"1")])
    broker.append(IN, b"2")
    unexpected = runtime(broker, MemoryCheckpoints(), Tally())
    drain(unexpected)
    assert unexpected.processor.calls == [("apply", 2)]
    assert dead_letters(broker) == [(0, "unexpected control record: tally reads none from numbers")]

    broker = MemoryBroker({IN: 1, DLQ: 1})
    broker.append(IN, b"%d" % 10**300, headers=[(CONTROL_HEADER, b"1")])
    huge = runtime(broker, MemoryCheckpoints(), Tally(controls={IN: decode_mark}))
    drain(huge)
    assert huge.processor.calls == []
    [(_, reason)] = dead_letters(broker)
    assert reason.startswith("invalid control record: invalid: mark 1000")


def test_output_kafka_refuses_is_never_checkpointed_past(broker) -> None:
    store = MemoryCheckpoints()
    broker.append(IN, b"1")
    broker.append(IN, b"13")
    broker.append(IN, b"2")
    broker.refusing[DLQ] = MessageSizeTooLargeError("too large for the topic")
    first = runtime(broker, store, Tally())
    drain(first)
    with pytest.raises(SendFailed, match="1 records were not acknowledged"):
        first.checkpoint(force=True)
    crash(first)
    assert store.load([0]) == {}
    assert sample(first, "streamrec_consumer_send_failures_total") == 1
    del broker.refusing[DLQ]
    second = runtime(broker, store, Tally())
    drain(second)
    assert second.checkpoint(force=True)
    assert dead_letters(broker) == [(1, "unlucky: 13")]
    assert store.load([0])[0].offsets == {IN: 3}


def test_a_poll_that_fails_on_an_unreachable_broker_is_counted_and_retried(broker) -> None:
    broker.append(IN, b"1")
    run = runtime(broker, MemoryCheckpoints(), Tally(), poll_timeout_ms=1)
    broker.poll_failures += [KafkaConnectionError("111 ECONNREFUSED")] * 2
    drain(run)
    assert run.processor.state[0] == [1, 1]
    assert sample(run, "streamrec_consumer_poll_errors_total") == 2


def test_a_frozen_owner_is_fenced_by_the_process_that_took_its_partitions(broker) -> None:
    store = MemoryCheckpoints()
    for i in range(4):
        broker.append(IN, b"%d" % i, partition=i % 2)
    frozen = runtime(broker, store, Tally())
    drain(frozen)
    assert frozen.checkpoint(force=True)
    broker.append(IN, b"10", partition=0)
    drain(frozen)  # applied, not checkpointed yet: then it freezes
    successor = runtime(broker, store, Tally())  # joins: the group rebalances
    broker.groups["g"].remove(frozen._consumer)  # the frozen one misses the rebalance
    broker.rebalance("g")
    drain(successor)
    assert successor.processor.state == {0: [3, 12], 1: [2, 4]}
    assert successor.checkpoint(force=True)
    assert not frozen.checkpoint(force=True), "its write is refused"
    assert frozen.processor.state == {}, "and it dropped the partitions it lost"
    assert store.load([0])[0].state == b"[3, 12]"


def test_positions_below_the_log_start_resume_there_and_count_what_was_lost(broker) -> None:
    store = MemoryCheckpoints()
    for i in range(10):
        broker.append(IN, b"%d" % i)
    first = runtime(broker, store, Tally())
    drain(first)
    assert first.checkpoint(force=True)
    first.close()
    for i in range(10, 20):
        broker.append(IN, b"%d" % i)
    broker.delete_records(IN, 0, before=15)  # retention took 10..14 before they were read
    second = runtime(broker, store, Tally())
    drain(second)
    assert second.processor.state[0] == [15, sum(range(10)) + sum(range(15, 20))]
    assert sample(second, "streamrec_consumer_records_skipped_total", topic=IN) == 5
    out_of_range = "streamrec_consumer_offsets_out_of_range_total"
    assert sample(second, out_of_range, topic=IN, where="behind") == 1


@pytest.mark.parametrize(
    ("policy", "applied", "paused"),
    [("pause", [10, 45], 1), ("earliest", [14, 51], 0), ("latest", [10, 45], 0)],
)
def test_positions_past_the_log_end_follow_the_configured_policy(
    broker, policy, applied, paused
) -> None:
    store = MemoryCheckpoints()
    for i in range(10):
        broker.append(IN, b"%d" % i)
    first = runtime(broker, store, Tally())
    drain(first)
    assert first.checkpoint(force=True)
    first.close()
    broker.truncate(IN, 0, end=0)  # the topic was deleted and created again
    for i in range(4):
        broker.append(IN, b"%d" % i)
    second = runtime(broker, store, Tally(), offset_reset=policy)
    drain(second)
    assert second.processor.state[0] == applied
    assert sample(second, "streamrec_consumer_paused_partitions") == paused
    out_of_range = "streamrec_consumer_offsets_out_of_range_total"
    assert sample(second, out_of_range, topic=IN, where="ahead") == 1
    if policy == "latest":
        broker.append(IN, b"7")
        drain(second)
        assert second.processor.state[0] == [11, 52]
    assert TopicPartition(IN, 0) in second._consumer.paused or not paused


class Publisher(Tally):
    """A Tally that publishes after each checkpoint, to a store that can fail like Redis."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.published: list[dict[int, list[int]]] = []

    def after_checkpoint(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        if self.down:
            raise redis.TimeoutError("Timeout reading from socket")
        self.published.append({p: json.loads(c.state) for p, c in checkpoints.items()})


def test_a_publish_that_fails_after_its_checkpoint_is_retried_by_the_next_one(broker) -> None:
    """Redis may go away between the checkpoint and the publish that follows it: the
    service goes on, counts the failure, and the next checkpoint publishes again."""
    store = MemoryCheckpoints()
    for i in range(6):
        broker.append(IN, b"%d" % i, partition=i % 2)
    run = runtime(broker, store, Publisher())
    processor = run.processor
    assert isinstance(processor, Publisher)
    drain(run)
    processor.down = True
    assert not run.checkpoint()
    assert sample(run, "streamrec_consumer_checkpoint_failures_total") == 1
    processor.down = False
    assert run.checkpoint()  # nothing new was read: the failed publish alone makes it due
    assert processor.published == [{0: [3, 6], 1: [3, 9]}]
