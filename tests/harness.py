"""An in-memory broker and checkpoint store for millisecond unit tests of the runtime.

:class:`MemoryBroker` keeps each topic partition as a list of records and hands
out consumers and producers with the parts of kafka-python's interface that
:class:`~services.common.runtime.ConsumerRuntime` uses (subscribe with a
rebalance listener, poll, seek, pause, high watermarks, send futures, flush).
:class:`MemoryCheckpoints` behaves as :class:`~services.common.checkpoint.CheckpointStore`
does in Redis: claims bump epochs, saves are all-or-nothing and fenced, and
checkpoints round-trip through the same JSON. Faults are injected on purpose:
a poll that raises, a topic that refuses records, a log whose start moved
(retention) or that was cut short.

Stand-ins for the Redis-backed stores the service processors write to, with only
the methods those processors call: :class:`MemorySequenceStore` (the sequences
service's :class:`~services.sequences.store.SequenceStore`), :class:`MemoryParamStore`
(:class:`~services.paramstore.ParamStore`'s ``publish``, for bandits and DRN, and its
pins and history, for the guard) and
:class:`MemorySnapshotPublisher` (the embeddings service's
:class:`~services.embeddings.service.SnapshotPublisher`). They keep the semantics
the processors rely on (offset marks, fencing tokens), not the Redis protocol.

This is for pure-logic tests; integration tests run on the real Kafka and Redis.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
from kafka import TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError

from contracts.params import verify_params
from services.common.checkpoint import Checkpoint, Fenced
from services.common.runtime import Connections, Record
from services.drn.settings import DRNSettings
from services.paramstore import ModelNotFound, Pin, StalePublish, VersionInfo
from services.sequences import store as sequence_store

_json = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Message:
    """A consumed record, shaped as kafka-python's ConsumerRecord where the runtime reads it."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


@dataclass
class Log:
    """One partition: its records by offset, and the first offset still kept."""

    records: list[Message] = field(default_factory=list)
    start: int = 0

    @property
    def end(self) -> int:
        return len(self.records)


class MemoryBroker:
    """Topics, consumer groups and injected faults; one per test."""

    def __init__(self, topics: Mapping[str, int]) -> None:
        self.logs: dict[TopicPartition, Log] = {
            TopicPartition(topic, p): Log() for topic, count in topics.items() for p in range(count)
        }
        self.clock_ms = 1_700_000_000_000
        self.groups: dict[str, list[MemoryConsumer]] = defaultdict(list)
        #: Exceptions the next polls of any consumer raise, in order.
        self.poll_failures: list[Exception] = []
        #: Topics whose sends fail (as Kafka refusing a record too large, say).
        self.refusing: dict[str, KafkaError] = {}
        self.commits: dict[str, dict[TopicPartition, int]] = defaultdict(dict)

    # -- the log ------------------------------------------------------------------

    def partitions(self, topic: str) -> set[int]:
        return {tp.partition for tp in self.logs if tp.topic == topic}

    def append(
        self,
        topic: str,
        value: bytes,
        *,
        partition: int = 0,
        key: bytes | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
        timestamp_ms: int | None = None,
    ) -> int:
        """Append one record; returns its offset."""
        log = self.logs[TopicPartition(topic, partition)]
        self.clock_ms += 1
        offset = log.end
        log.records.append(
            Message(topic, partition, offset, timestamp_ms or self.clock_ms, key, value, [*headers])
        )
        return offset

    def read(self, topic: str, partition: int = 0) -> list[Message]:
        log = self.logs[TopicPartition(topic, partition)]
        return log.records[log.start :]

    def delete_records(self, topic: str, partition: int, before: int) -> None:
        """Move the log start (what retention does): records below ``before`` are gone."""
        self.logs[TopicPartition(topic, partition)].start = before

    def truncate(self, topic: str, partition: int, end: int) -> None:
        """Cut the log short (a lost tail, or a topic deleted and created again)."""
        log = self.logs[TopicPartition(topic, partition)]
        log.records = log.records[:end]
        log.start = min(log.start, end)

    # -- clients ------------------------------------------------------------------

    def connections(self, checkpoints: MemoryCheckpoints) -> Connections:
        return Connections(
            consumer=lambda group: MemoryConsumer(self, group),
            producer=lambda: MemoryProducer(self),
            checkpoints=checkpoints,
        )

    def rebalance(self, group: str) -> None:
        """Range-assign every subscribed partition over the group's open members."""
        members = [m for m in self.groups[group] if not m.closed]
        if not members:
            return
        topics = sorted({t for m in members for t in m.topics})
        numbers = sorted({p for t in topics for p in self.partitions(t)})
        share, extra = divmod(len(numbers), len(members))
        at = 0
        for i, member in enumerate(members):
            n = share + (1 if i < extra else 0)
            mine = numbers[at : at + n]
            at += n
            member.pending = {TopicPartition(t, p) for t in member.topics for p in mine}


class MemoryConsumer:
    """A group member with an eager rebalance protocol: revoke everything, assign anew."""

    def __init__(self, broker: MemoryBroker, group: str) -> None:
        self.broker = broker
        self.group = group
        self.topics: list[str] = []
        self.listener: Any = None
        self.assigned: set[TopicPartition] = set()
        self.pending: set[TopicPartition] | None = None
        self.positions: dict[TopicPartition, int] = {}
        self.paused: set[TopicPartition] = set()
        self.fetched: dict[TopicPartition, int] = {}
        self.closed = False

    def partitions_for_topic(self, topic: str) -> set[int]:
        return self.broker.partitions(topic)

    def subscribe(self, topics: list[str], listener: Any) -> None:
        self.topics, self.listener = list(topics), listener
        self.broker.groups[self.group].append(self)
        self.broker.rebalance(self.group)

    def poll(self, timeout_ms: int = 0, max_records: int = 500) -> dict[TopicPartition, list]:
        if self.broker.poll_failures:
            raise self.broker.poll_failures.pop(0)
        if self.pending is not None:
            new, self.pending = self.pending, None
            self.listener.on_partitions_revoked(sorted(self.assigned))
            self.assigned = set(new)
            self.positions = {tp: p for tp, p in self.positions.items() if tp in new}
            self.listener.on_partitions_assigned(sorted(new))
        out: dict[TopicPartition, list] = {}
        budget = max_records
        for tp in sorted(self.assigned - self.paused):
            log = self.broker.logs[tp]
            position = self.positions[tp]
            if position < log.start or position > log.end:
                raise OffsetOutOfRangeError({tp: position})
            batch = log.records[position : position + budget]
            self.fetched[tp] = log.end
            if batch:
                out[tp] = batch
                self.positions[tp] = position + len(batch)
                budget -= len(batch)
            if not budget:
                break
        return out

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.positions[tp] = offset

    def seek_to_beginning(self, *tps: TopicPartition) -> None:
        for tp in tps:
            self.positions[tp] = self.broker.logs[tp].start

    def beginning_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.broker.logs[tp].start for tp in tps}

    def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        return {tp: self.broker.logs[tp].end for tp in tps}

    def pause(self, *tps: TopicPartition) -> None:
        self.paused.update(tps)

    def resume(self, *tps: TopicPartition) -> None:
        self.paused.difference_update(tps)

    def assignment(self) -> set[TopicPartition]:
        return set(self.assigned)

    def highwater(self, tp: TopicPartition) -> int | None:
        return self.fetched.get(tp)

    def commit_async(self, offsets: Mapping[TopicPartition, Any]) -> None:
        self.broker.commits[self.group].update({tp: o.offset for tp, o in offsets.items()})

    def close(self, autocommit: bool = False) -> None:
        self.closed = True
        self.broker.rebalance(self.group)


class SendFuture:
    """A send's outcome, as kafka-python's FutureRecordMetadata exposes it."""

    def __init__(self, error: KafkaError | None) -> None:
        self.error = error

    def succeeded(self) -> bool:
        return self.error is None

    def get(self, timeout: float | None = None) -> None:
        if self.error is not None:
            raise self.error

    def add_callback(self, callback: Callable[..., Any], *args: Any) -> SendFuture:
        if self.error is None:
            callback(*args, None)
        return self

    def add_errback(self, callback: Callable[..., Any], *args: Any) -> SendFuture:
        if self.error is not None:
            callback(*args, self.error)
        return self


class MemoryProducer:
    """Appends at once, or fails the send if the topic refuses records."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker
        self.sent = 0

    def send(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        partition: int | None = None,
        headers: Iterable[tuple[str, bytes]] = (),
    ) -> SendFuture:
        self.sent += 1
        if (error := self.broker.refusing.get(topic)) is not None:
            return SendFuture(error)
        self.broker.append(topic, value, partition=partition or 0, key=key, headers=headers)
        return SendFuture(None)

    def partitions_for(self, topic: str) -> set[int]:
        return self.broker.partitions(topic)

    def flush(self, timeout: float | None = None) -> None:
        """Sends complete at once here."""

    def close(self, timeout: float | None = None) -> None:
        """Nothing to release."""


class MemoryCheckpoints:
    """:class:`~services.common.checkpoint.CheckpointStore` in a dict: same claims,
    same fencing, checkpoints stored as the same JSON (so nothing aliases)."""

    def __init__(self) -> None:
        self.epochs: dict[int, int] = {}
        self.stored: dict[int, bytes] = {}
        self.saves = 0

    def claim(self, partitions: Iterable[int]) -> tuple[dict[int, Checkpoint], dict[int, int]]:
        numbers = list(partitions)
        for number in numbers:
            self.epochs[number] = self.epochs.get(number, 0) + 1
        return self.load(numbers), {n: self.epochs[n] for n in numbers}

    def save(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        fenced = [p for p, c in checkpoints.items() if self.epochs.get(p, c.epoch) != c.epoch]
        if fenced:
            raise Fenced(fenced)
        self.saves += 1
        now = time.time()  # as the Redis store stamps each checkpoint it writes
        for partition, ckpt in checkpoints.items():
            ckpt.written_at = now
            self.stored[partition] = _json.encode(ckpt)

    def load(self, partitions: Iterable[int]) -> dict[int, Checkpoint]:
        return {
            p: msgspec.json.decode(self.stored[p], type=Checkpoint)
            for p in partitions
            if p in self.stored
        }


class MemorySequenceStore:
    """:class:`~services.sequences.store.SequenceStore`'s ``append`` over dicts: each
    user's clicks as members scored by event time, capped at ``max_len``, with one
    applied-offset mark per (user, input partition), so a redelivered record is skipped
    and a click sent twice (same event and item) is one member, as the Lua script does.

    ``failures`` are raised by the next appends, in order (a Redis error mid-batch).
    """

    def __init__(self, max_len: int = sequence_store.DEFAULT_MAX_LEN) -> None:
        self.max_len = max_len
        #: user -> member -> score (event time in integer microseconds).
        self.sequences: dict[str, dict[str, int]] = defaultdict(dict)
        #: user -> field -> value: ``n`` (clicks added) and the ``o:<topic>:<partition>`` marks.
        self.users: dict[str, dict[str, int]] = defaultdict(dict)
        self.failures: list[Exception] = []
        self.calls = 0

    def append(self, records: Iterable[Record]) -> sequence_store.AppendStats:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        total = applied = added = 0
        for record in records:
            click = record.value
            total += 1
            user = self.users[click.user_id]
            field_ = sequence_store.mark_field(record.topic, record.partition)
            if record.offset <= user.get(field_, -1):
                continue
            applied += 1
            user[field_] = record.offset
            sequence = self.sequences[click.user_id]
            name = sequence_store.member(click.item_id, click.event_id)
            if name not in sequence:
                sequence[name] = sequence_store.score_of(click.ts)
                added += 1
                user["n"] = user.get("n", 0) + 1
            for dropped in sorted(sequence, key=lambda m: (sequence[m], m))[: -self.max_len]:
                del sequence[dropped]
        return sequence_store.AppendStats(applied=applied, added=added, redelivered=total - applied)

    def items(self, user_id: str) -> list[str]:
        """The user's clicked item ids, oldest first (what the reader returns, reversed)."""
        sequence = self.sequences.get(user_id, {})
        ordered = sorted(sequence, key=lambda m: (sequence[m], m))
        return [sequence_store.item_of(m) for m in ordered]


@dataclass
class Published:
    """One version a :class:`MemoryParamStore` made: the blobs of every part."""

    version: int
    parts: dict[str, bytes]


class MemoryParamStore:
    """:class:`~services.paramstore.ParamStore`'s ``publish`` in a dict: blobs must verify
    and name the model; a part whose fencing token is below the highest its owner
    published is skipped, and :class:`~services.paramstore.StalePublish` is raised if
    every part was; parts not named keep their earlier blobs.

    Pins and history as the guard uses them: ``pin`` refuses a version not retained
    (every published version is, unless a test removes it from ``versions``), ``unpin``
    returns the pin removed. ``failures`` are raised by the next pin calls, in order."""

    def __init__(self) -> None:
        self.versions: dict[str, list[Published]] = defaultdict(list)
        self.fences: dict[tuple[str, str], tuple[str, int]] = {}
        self.fenced: list[tuple[str, str]] = []
        self.pins: dict[str, Pin] = {}
        self.failures: list[Exception] = []

    def publish(
        self,
        model: str,
        parts: Mapping[str, bytes],
        *,
        fence: Mapping[str, int] | None = None,
        owner: str = "",
    ) -> int:
        for part, blob in parts.items():
            if verify_params(bytes(blob))["model"] != model:
                raise ValueError(f"part {part!r} was not encoded for model {model!r}")
        fence = fence or {}
        accepted = {}
        for part, blob in parts.items():
            held = self.fences.get((model, part))
            token = fence.get(part)
            if token is not None and held is not None and held[0] == owner and token < held[1]:
                self.fenced.append((model, part))
                continue
            if token is not None:
                self.fences[(model, part)] = (owner, token)
            accepted[part] = bytes(blob)
        if not accepted:
            raise StalePublish(model, sorted(parts))
        history = self.versions[model]
        merged = {**(history[-1].parts if history else {}), **accepted}
        if history and merged == history[-1].parts:
            return history[-1].version
        history.append(Published(len(history) + 1, merged))
        return len(history)

    def latest(self, model: str) -> Published:
        return self.versions[model][-1]

    def pin(self, model: str, version: int, *, reason: str, by: str = "operator") -> Pin:
        if self.failures:
            raise self.failures.pop(0)
        if version not in {p.version for p in self.versions.get(model, [])}:
            raise ModelNotFound(model, f"version {version} is not retained")
        self.pins[model] = Pin(version, reason, by, time.time())
        return self.pins[model]

    def unpin(self, model: str) -> Pin | None:
        return self.pins.pop(model, None)

    def pin_of(self, model: str) -> Pin | None:
        return self.pins.get(model)

    def history(self, model: str) -> list[VersionInfo]:
        pinned = self.pins.get(model)
        return [
            VersionInfo(
                version=p.version,
                published_at=0.0,
                digests={},
                size_bytes=sum(len(b) for b in p.parts.values()),
                offsets={},
                events=None,
                pinned=pinned is not None and pinned.version == p.version,
            )
            for p in self.versions.get(model, [])
        ]


class MemorySnapshotPublisher:
    """The embeddings service's :class:`~services.embeddings.service.SnapshotPublisher` as
    its processor uses it (``metrics``, ``submit``, ``close``): jobs are kept, in order,
    instead of being built into an index and published on a background thread."""

    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.jobs: list[Any] = []
        self.closed = False

    def submit(self, job: Any) -> None:
        self.jobs.append(job)

    def close(self, timeout: float = 120.0) -> None:
        self.closed = True


def small_drn_settings() -> DRNSettings:
    """A small DRN without scheduled or drift-triggered major updates, so that a run is a
    pure function of the slate order (wall-clock never matters)."""
    return DRNSettings(
        embedding_dim=4,
        n_context=3,
        windows_s=(60.0, 600.0, 3600.0),
        interest_columns=0,
        hidden=(16,),
        buffer_capacity=3000,
        max_next_actions=3,
        verdict_window=4,
        return_window_s=40,
        major_interval_s=0,
        drift_detection=False,
        seed=5,
    )
