"""The one consumer loop every service runs: poll → decode → apply → checkpoint → commit.

A service is a :class:`Processor`: a function from a batch of decoded records to
state changes, plus how to snapshot and restore its state per partition number.
The runtime owns everything else:

* decoding and validation (bad records go to the dead-letter topic with a reason
  and their source topic/partition/offset; the service goes on);
* checkpoints: every ``checkpoint_interval_s`` the processor's state, the consumed
  offsets and the de-duplication marks are written to Redis in one transaction,
  then offsets are committed to Kafka (for lag tooling only: Redis is the truth);
* restore on assignment: the checkpoint is loaded and the consumer seeks to its
  offsets, so a redelivered record is never applied twice;
* rebalances (checkpoint on revoke), graceful stop (finish the batch,
  checkpoint, leave the group), Prometheus metrics and consumer lag.

Exactly-once across services: a processor that emits records (the joiner emits
feedback) does so through :meth:`Context.emit`, which stamps each record with its
source (group and partition) and a sequence number that is checkpointed with the
source's state. A consumer drops records whose sequence number it has already
applied, so a re-emission after a crash changes nothing downstream, provided the
emitting processor is deterministic given its input (see docs/decisions.md).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kafka import ConsumerRebalanceListener, TopicPartition
from kafka.errors import KafkaError, OffsetOutOfRangeError
from kafka.producer.future import FutureRecordMetadata
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from contracts.errors import StreamrecError
from contracts.events import EventError
from services.common import clients
from services.common.checkpoint import Checkpoint, CheckpointStore, Fenced
from services.common.metrics import ConsumerMetrics
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings

log = logging.getLogger(__name__)

SOURCE_HEADER = "streamrec-src"
SEQ_HEADER = "streamrec-seq"
CONTROL_HEADER = "streamrec-control"
REASON_HEADER = "streamrec-dlq-reason"

Decoder = Callable[[bytes], Any]


@dataclass(slots=True)
class Record:
    """A decoded record and where it came from."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    timestamp_ms: int
    #: The bytes as consumed, dead-lettered verbatim if the processor refuses the record.
    raw: bytes = b""


@dataclass(frozen=True, slots=True)
class Rejection:
    """A record the processor refuses (e.g. features of the wrong size): dead-lettered."""

    record: Record
    reason: str


class SendFailed(StreamrecError):
    """Records this process emitted or dead-lettered were not acknowledged by Kafka.

    Raised before a checkpoint: the batches that produced them are not
    checkpointed, so a restart re-reads them and emits them again (with the same
    sequence numbers, so consumers that already have them drop the repeats).
    """


class Context:
    """What a processor may do besides changing its own state: emit records."""

    def __init__(self, runtime: ConsumerRuntime) -> None:
        self._runtime = runtime

    def emit(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        source_partition: int,
        partition: int | None = None,
        headers: Sequence[tuple[str, bytes]] = (),
    ) -> None:
        """Produce a record, stamped for downstream de-duplication.

        ``source_partition`` is the input partition number whose state produced
        it; the sequence number is part of that partition's checkpoint.
        """
        self._runtime._emit(topic, value, key, source_partition, partition, headers)

    def emit_control(self, topic: str, partition: int, value: bytes) -> None:
        """Append a control record (e.g. a watermark) to a partition of an input topic.

        A control record that fails to reach Kafka is only logged: state changes
        when a control record is consumed, not when it is sent, so nothing is lost.
        """
        self._runtime._producer().send(
            topic, value=value, partition=partition, headers=[(CONTROL_HEADER, b"1")]
        ).add_errback(lambda exc: log.warning("control record to %s failed: %s", topic, exc))

    def request_checkpoint(self) -> None:
        """Ask for a checkpoint after the current batch (e.g. before publishing)."""
        self._runtime._checkpoint_requested = True


class Processor(ABC):
    """A service's logic. State is kept per partition number (all input topics).

    A processor whose state is one global model rather than per-partition
    statistics (DRN) sets ``checkpoint_all_owned``: every checkpoint then writes
    all owned partitions together, so the stored model always matches the
    stored offsets of every partition.
    """

    checkpoint_all_owned: bool = False
    #: Input topics that carry control records for this processor, with their decoder;
    #: a control record on any other topic is dead-lettered.
    controls: Mapping[str, Decoder] = MappingProxyType({})

    @abstractmethod
    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        """Apply a batch of valid records; return the ones refused, with reasons."""

    @abstractmethod
    def snapshot(self, partition: int) -> bytes:
        """This partition's state, to be checkpointed together with its offsets."""

    @abstractmethod
    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        """Take ownership of ``partition``, from its checkpoint if there is one.

        Return the offsets to seek to per topic, or None to resume at the
        checkpoint's offsets (a processor that rebuilds state by re-reading the
        log, like the joiner, returns earlier offsets).
        """

    @abstractmethod
    def revoke(self, partition: int) -> None:
        """Drop the state of a partition this process no longer owns."""

    def control(self, record: Record, ctx: Context) -> None:  # noqa: B027 - optional hook
        """A control record (header ``streamrec-control``) from one of :attr:`controls`'
        topics; ``record.value`` is what that topic's control decoder returned."""

    def tick(self, now: float, ctx: Context) -> None:  # noqa: B027 - optional hook
        """Called after every poll, also when it returned nothing."""

    def after_checkpoint(self, checkpoints: Mapping[int, Checkpoint]) -> None:  # noqa: B027
        """Called after these partitions' checkpoints were written (e.g. to publish)."""

    def checkpointable(self, partition: int, offsets: Mapping[str, int]) -> bool:
        """Whether ``partition``'s state may be checkpointed at these offsets.

        A processor that seeks back on restore to rebuild state (the joiner)
        returns False until it has re-read past the restored checkpoint: a
        checkpoint in between would record offsets below the state it restored.
        The stored checkpoint is then kept as it is.
        """
        return True

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the processor holds (threads, files) when its process stops."""


class _Rebalance(ConsumerRebalanceListener):
    def __init__(self, runtime: ConsumerRuntime) -> None:
        self.runtime = runtime

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.runtime._on_revoked(revoked)
        self.runtime._hold_rejoin()

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.runtime._on_assigned(assigned)

    def on_partitions_lost(self, lost: list[TopicPartition]) -> None:
        self.runtime._on_lost(lost)


#: Producer sources one consumed partition keeps sequence marks for; a record from a
#: further source is dead-lettered (bounds the checkpoint against spoofed sources).
MAX_SOURCES = 1024
_SOURCE = re.compile(r"[A-Za-z0-9._-]{1,128}:[0-9]{1,6}")


def _check_stamp(
    tp: TopicPartition, headers: Mapping[str, Any], dedupe: dict[str, int]
) -> tuple[str, str | None]:
    """Check a record's producer stamp (source, sequence number) against the marks.

    Returns the outcome (``ok``: apply it; ``duplicate``; ``dead_letter``) and, for a
    dead letter, the reason. An emitter numbers the records it sends to one
    partition 0, 1, 2, ... and re-sends from its checkpoint after a crash, so a
    sequence number at or below the mark is a re-emission, the next one is new,
    and a jump is not something an emitter does: it is dead-lettered without
    moving the mark (a spoofed huge number must not silence the real source).
    """
    source, raw_seq = headers.get(SOURCE_HEADER), headers.get(SEQ_HEADER)
    if source is None and raw_seq is None:
        return "ok", None
    if not isinstance(source, bytes) or not _SOURCE.fullmatch(source.decode("latin-1")):
        return "dead_letter", f"invalid header: {SOURCE_HEADER} must be 'group:partition'"
    if not isinstance(raw_seq, bytes) or not raw_seq.isdigit() or len(raw_seq) > 18:
        return "dead_letter", f"invalid header: {SEQ_HEADER} must be a non-negative integer"
    seq = int(raw_seq)
    mark = f"{tp.topic}|{tp.partition}|{source.decode()}"
    last = dedupe.get(mark)
    if last is None and len(dedupe) >= MAX_SOURCES:
        return "dead_letter", f"invalid header: more than {MAX_SOURCES} producer sources"
    if last is not None and seq <= last:
        return "duplicate", None
    if last is not None and seq != last + 1:
        return "dead_letter", (
            f"sequence gap: {source.decode()} sent {seq} after {last} (emitters number "
            "records one by one; a jump is a spoofed or damaged stamp)"
        )
    dedupe[mark] = seq
    return "ok", None


def _reason_category(reason: str) -> str:
    return reason.split(":", 1)[0].strip().replace(" ", "_")[:32] or "unknown"


@dataclass
class Connections:
    """What a runtime talks to: a Kafka consumer and producer, and a checkpoint store.

    :meth:`kafka_and_redis` builds the real ones from settings; unit tests inject
    an in-memory broker and store with the same interfaces (tests/harness.py).
    """

    #: Makes the group's consumer (subscribe, poll, seek, pause, commit_async, ...).
    consumer: Callable[[str], Any]
    #: Makes the producer of emitted, dead-lettered and control records.
    producer: Callable[[], Any]
    #: The group's checkpoints: ``claim``, ``save``, ``load`` as :class:`CheckpointStore`.
    checkpoints: Any
    close: Callable[[], None] = lambda: None

    @classmethod
    def kafka_and_redis(
        cls, kafka: KafkaSettings, redis_settings: RedisSettings, group: str
    ) -> Connections:
        client = clients.redis_client(redis_settings)
        return cls(
            consumer=lambda name: clients.consumer(kafka, name),
            producer=lambda: clients.producer(kafka),
            checkpoints=CheckpointStore(client, redis_settings.keys(), group),
            close=client.close,
        )


class ConsumerRuntime:
    """Runs a :class:`Processor` over Kafka topics with Redis checkpoints."""

    def __init__(
        self,
        *,
        service: str,
        group: str,
        inputs: Mapping[str, Decoder],
        processor: Processor,
        topics: TopicSettings,
        kafka: KafkaSettings | None = None,
        redis_settings: RedisSettings | None = None,
        settings: RuntimeSettings | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
        connections: Connections | None = None,
    ) -> None:
        self.service = service
        self.group = group
        self.inputs = dict(inputs)
        self.processor = processor
        self.kafka = kafka or KafkaSettings()
        self.topics = topics
        self.settings = settings or RuntimeSettings()
        self.registry = registry or CollectorRegistry()
        self.metrics = ConsumerMetrics(self.registry, service)
        self.clock = clock
        self.connections = connections or Connections.kafka_and_redis(
            self.kafka, redis_settings or RedisSettings(), group
        )
        self.store = self.connections.checkpoints
        self.stopping = threading.Event()
        self.ctx = Context(self)
        self._consumer: Any = None
        self._producer_client: Any = None
        self._owned: dict[int, Checkpoint] = {}
        self._positions: dict[TopicPartition, int] = {}
        self._dirty: set[int] = set()
        self._checkpoint_requested = False
        self._last_checkpoint = self.clock()
        self._last_lag = 0.0
        self._failed = False
        self.partition_counts: dict[str, int] = {}
        #: Records emitted or dead-lettered since the last checkpoint, until Kafka acks them.
        self._sends: list[FutureRecordMetadata] = []
        self._sources: dict[int, bytes] = {}  # source partition -> its header value
        #: Partitions paused because their offset is past the log end (offset_reset=pause).
        self._paused: set[TopicPartition] = set()

    # -- lifecycle -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish its batch, checkpoint and return."""
        self.stopping.set()

    def run(self) -> None:
        """Consume until :meth:`stop`; always checkpoints and closes on the way out."""
        self.open()
        try:
            while not self.stopping.is_set():
                self.poll_once()
        except BaseException:
            # The failed batch may be half applied: no checkpoint may record it.
            self._failed = True
            log.exception("%s failed; exiting without checkpointing the failed batch", self.service)
            raise
        finally:
            self.close()

    def open(self) -> None:
        """Join the consumer group (what :meth:`run` starts with; a caller that
        drives :meth:`poll_once` itself calls this, then :meth:`close`)."""
        self._consumer = self.connections.consumer(self.group)
        # Known partitions before joining: a group leader without them assigns none
        # and only notices at its next metadata refresh (minutes later).
        self.partition_counts = {topic: self._partitions_of(topic) for topic in self.inputs}
        self._consumer.subscribe(list(self.inputs), listener=_Rebalance(self))
        log.info("%s consuming %s as group %s", self.service, list(self.inputs), self.group)

    def _partitions_of(self, topic: str, timeout_s: float = 30.0) -> int:
        """The partition count of an input topic; an error if it does not appear in time."""
        assert self._consumer is not None
        deadline = time.monotonic() + timeout_s
        while not (parts := self._consumer.partitions_for_topic(topic)):
            if time.monotonic() > deadline:
                raise KafkaError(
                    f"input topic {topic!r} does not exist (create it: streamrec topics)"
                )
            time.sleep(0.1)
        return len(parts)

    def poll_once(self) -> int:
        """One iteration of the loop; returns the number of records polled."""
        assert self._consumer is not None
        try:
            polled = self._consumer.poll(
                timeout_ms=self.settings.poll_timeout_ms, max_records=self.settings.max_batch
            )
        except OffsetOutOfRangeError as exc:
            positions = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
            self._out_of_range(positions)
            polled = {}
        except KafkaError as exc:
            if not exc.retriable:
                raise
            # The broker is unreachable (restarting, failing over): nothing was consumed,
            # so nothing is lost by polling again after a pause.
            self.metrics.poll_errors.labels(self.service).inc()
            log.warning("poll failed (will retry): %s", exc)
            self.stopping.wait(self.settings.poll_timeout_ms / 1000)
            polled = {}
        count = sum(len(batch) for batch in polled.values())
        if count:
            started = time.perf_counter()
            self._process(polled)
            self.metrics.batch_seconds.labels(self.service).observe(time.perf_counter() - started)
            self.metrics.batch_records.labels(self.service).observe(count)
        now = self.clock()
        self.processor.tick(now, self.ctx)
        if (
            self._checkpoint_requested
            or now - self._last_checkpoint >= self.settings.checkpoint_interval_s
        ):
            self.checkpoint()
        if now - self._last_lag >= self.settings.lag_interval_s:
            self._update_lag()
            self._last_lag = now
        return count

    def close(self) -> None:
        """Checkpoint what is owned (unless a batch failed), leave the group, disconnect."""
        try:
            if self._owned and not self._failed:
                self.checkpoint(force=True)
        finally:
            if self._consumer is not None:
                self._consumer.close(autocommit=False)
            if self._producer_client is not None:
                self._producer_client.close(timeout=10)
            self.connections.close()
            log.info("%s stopped", self.service)

    # -- the batch path --------------------------------------------------------

    def _process(self, polled: Mapping[TopicPartition, list[Any]]) -> None:
        good: list[Record] = []
        outcomes: dict[tuple[str, str], int] = defaultdict(int)
        for tp, raw_records in polled.items():
            if tp.partition not in self._owned:
                continue
            decode = self.inputs[tp.topic]
            ckpt = self._owned[tp.partition]
            dedupe = ckpt.dedupe
            for raw in raw_records:
                if raw.headers:
                    headers = dict(raw.headers)
                    if CONTROL_HEADER in headers:
                        # In log order: what precedes the control record is applied first.
                        self._apply(good, outcomes)
                        good = []
                        outcome = self._control(raw)
                        outcomes[(tp.topic, outcome)] += 1
                        continue
                    outcome, reason = _check_stamp(tp, headers, dedupe)
                    if reason is not None:
                        self._dead_letter(self._record(raw, None), reason)
                    if outcome != "ok":
                        outcomes[(tp.topic, outcome)] += 1
                        continue
                try:
                    good.append(self._record(raw, decode(raw.value)))
                except EventError as exc:
                    self._dead_letter(self._record(raw, None), exc.reason)
                    outcomes[(tp.topic, "dead_letter")] += 1
            self._positions[tp] = raw_records[-1].offset + 1
            ckpt.offsets[tp.topic] = raw_records[-1].offset + 1
            self._dirty.add(tp.partition)
        self._apply(good, outcomes)
        for (topic, outcome), n in outcomes.items():
            if n:
                self.metrics.events.labels(self.service, topic, outcome).inc(n)

    def _control(self, raw: Any) -> str:
        """Hand a control record to the processor if its topic carries control records
        for it and it decodes; dead-letter it otherwise. Returns the outcome."""
        decode = self.processor.controls.get(raw.topic)
        if decode is None:
            reason = f"unexpected control record: {self.service} reads none from {raw.topic}"
        else:
            try:
                self.processor.control(self._record(raw, decode(raw.value)), self.ctx)
                return "control"
            except EventError as exc:
                reason = f"invalid control record: {exc.reason}"
        self._dead_letter(self._record(raw, None), reason)
        return "dead_letter"

    def _apply(self, good: list[Record], outcomes: dict[tuple[str, str], int]) -> None:
        if not good:
            return
        rejected = self.processor.apply(good, self.ctx)
        for rejection in rejected:
            self._dead_letter(rejection.record, rejection.reason)
            outcomes[(rejection.record.topic, "dead_letter")] += 1
            outcomes[(rejection.record.topic, "applied")] -= 1
        for record in good:
            outcomes[(record.topic, "applied")] += 1

    @staticmethod
    def _record(raw: Any, value: Any) -> Record:
        return Record(
            raw.topic, raw.partition, raw.offset, raw.key, value, raw.timestamp, raw.value
        )

    # -- output ----------------------------------------------------------------

    def _producer(self) -> Any:
        if self._producer_client is None:
            self._producer_client = self.connections.producer()
        return self._producer_client

    def _emit(
        self,
        topic: str,
        value: bytes,
        key: bytes | None,
        source_partition: int,
        partition: int | None,
        headers: Sequence[tuple[str, bytes]],
    ) -> None:
        ckpt = self._owned[source_partition]
        if partition is None:
            partition = source_partition % self._partition_count(topic)
        slot = f"{topic}|{partition}"
        seq = ckpt.emit_seq.get(slot, 0)
        ckpt.emit_seq[slot] = seq + 1
        self._dirty.add(source_partition)
        source = self._sources.get(source_partition)
        if source is None:
            source = self._sources[source_partition] = f"{self.group}:{source_partition}".encode()
        stamp = [(SOURCE_HEADER, source), (SEQ_HEADER, b"%d" % seq)]
        self._send(topic, value=value, key=key, partition=partition, headers=[*headers, *stamp])

    def _send(self, topic: str, **record: Any) -> None:
        self._sends.append(self._producer().send(topic, **record))

    def _await_sends(self) -> None:
        """Block until Kafka has acknowledged every record sent since the last checkpoint
        (each fails after ``delivery_timeout_ms`` at most); raise :class:`SendFailed`
        if any failed, so that no checkpoint covers the input that produced them."""
        if not self._sends:
            return
        assert self._producer_client is not None
        deadline = time.monotonic() + self.kafka.delivery_timeout_ms / 1000 + 5
        try:
            # Bounded: with the broker gone for good, a batch whose leader is unknown may
            # never expire on its own, and an unbounded flush would hang the service.
            self._producer_client.flush(timeout=deadline - time.monotonic())
        except KafkaError as exc:  # each record's own outcome decides, below
            log.warning("flush before checkpoint: %s", exc)
        failed: list[KafkaError] = []
        for future in self._sends:
            try:
                future.get(timeout=max(0.0, deadline - time.monotonic()))
            except KafkaError as exc:
                failed.append(exc)
        self._sends = []
        if failed:
            self.metrics.send_failures.labels(self.service).inc(len(failed))
            raise SendFailed(
                f"{len(failed)} records were not acknowledged by Kafka "
                f"(first: {failed[0]}); not checkpointing their input"
            )

    def _partition_count(self, topic: str) -> int:
        parts = self._producer().partitions_for(topic)
        if not parts:
            raise KafkaError(f"topic {topic!r} has no partitions")
        return len(parts)

    def _dead_letter(self, raw: Any, reason: str) -> None:
        """Send the original bytes to the dead-letter topic with reason and source."""
        self.metrics.dead_letters.labels(self.service, _reason_category(reason)).inc()
        log.warning("dead-letter %s[%d]@%d: %s", raw.topic, raw.partition, raw.offset, reason[:200])
        self._send(
            self.topics.dead_letter,
            key=raw.key,
            value=raw.value if isinstance(raw.value, bytes) else raw.raw,
            headers=[
                (REASON_HEADER, reason.encode()[:1024]),
                ("streamrec-dlq-topic", raw.topic.encode()),
                ("streamrec-dlq-partition", str(raw.partition).encode()),
                ("streamrec-dlq-offset", str(raw.offset).encode()),
                ("streamrec-dlq-service", self.service.encode()),
            ],
        )

    # -- checkpoints -----------------------------------------------------------

    def checkpoint(self, force: bool = False, partitions: Sequence[int] | None = None) -> bool:
        """Flush output, then write state + offsets of owned partitions atomically."""
        self._checkpoint_requested = False
        self._last_checkpoint = self.clock()
        targets = list(partitions if partitions is not None else self._owned)
        if not self._dirty.intersection(targets) and not force:
            return True
        if not force and not self.processor.checkpoint_all_owned:
            targets = [p for p in targets if p in self._dirty]
        targets = [p for p in targets if self.processor.checkpointable(p, self._owned[p].offsets)]
        if not targets:
            return True
        started = time.perf_counter()
        # Emitted and dead-lettered records must be in Kafka before the offsets that
        # produced them are checkpointed: otherwise a crash would lose them.
        self._await_sends()
        for partition in targets:
            self._owned[partition].state = self.processor.snapshot(partition)
        try:
            self.store.save({p: self._owned[p] for p in targets})
        except Fenced as exc:
            self._fenced(exc.partitions)
            return False
        except clients.REDIS_ERRORS as exc:
            self.metrics.checkpoint_failures.labels(self.service).inc()
            log.error("checkpoint failed (will retry): %s", exc)
            return False
        self._dirty.difference_update(targets)
        self.metrics.checkpoint_seconds.labels(self.service).observe(time.perf_counter() - started)
        self.metrics.checkpoint_timestamp.labels(self.service).set(time.time())
        self._commit(targets)
        try:
            self.processor.after_checkpoint({p: self._owned[p] for p in targets})
        except clients.REDIS_ERRORS as exc:
            # The checkpoint is written, what the processor publishes from it is not (Redis
            # went away in between). Dirty again: the next checkpoint rewrites the same
            # state and publishes it, instead of the service exiting on a Redis error.
            self._dirty.update(targets)
            self.metrics.checkpoint_failures.labels(self.service).inc()
            log.error("publish after checkpoint failed (will retry): %s", exc)
            return False
        return True

    def _commit(self, partitions: Sequence[int]) -> None:
        assert self._consumer is not None
        offsets = {
            tp: OffsetAndMetadata(pos, "", -1)
            for tp, pos in self._positions.items()
            if tp.partition in partitions
        }
        if offsets:
            try:
                self._consumer.commit_async(offsets=offsets)
            except KafkaError as exc:
                log.warning("offset commit failed (Redis checkpoint is authoritative): %s", exc)

    # -- rebalance -------------------------------------------------------------

    def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        numbers = sorted({tp.partition for tp in revoked} & set(self._owned))
        self.metrics.rebalances.labels(self.service, "revoked").inc()
        if not numbers:
            return
        if not self._failed:
            self.checkpoint(force=True, partitions=numbers)
        self._drop(numbers)
        log.info("revoked partitions %s", numbers)

    def _hold_rejoin(self) -> None:
        """Keep the rebalance that is starting wanted until it completes.

        kafka-python (3.0) may start a rebalance because the topic metadata it
        assigned from changed, without marking a rejoin as needed; as the leader
        assigns, that mismatch disappears, and if the join had not completed
        within one ``poll`` the next ``poll`` no longer awaits it: the member
        keeps no partitions and sends no heartbeats, and the broker drops it from
        the group for good. Requesting the rejoin here (every rebalance notifies
        the listener first) keeps ``poll`` driving the join until it completes.
        """
        coordinator = getattr(self._consumer, "_coordinator", None)
        if coordinator is not None:
            coordinator.request_rejoin()

    def _drop(self, numbers: Sequence[int]) -> None:
        for number in numbers:
            if self._owned.pop(number, None) is not None:
                self.processor.revoke(number)
            self._dirty.discard(number)
        for tp in [tp for tp in self._positions if tp.partition in numbers]:
            del self._positions[tp]
        self.metrics.assigned.labels(self.service).set(len(self._owned))

    def _on_lost(self, lost: list[TopicPartition]) -> None:
        """Evicted from the group (e.g. frozen past the session timeout): another
        process may already own these partitions, so their in-memory state is
        dropped without a checkpoint or a publish; the new owner restores from
        the last checkpoint, which is consistent."""
        numbers = sorted({tp.partition for tp in lost} & set(self._owned))
        self.metrics.rebalances.labels(self.service, "lost").inc()
        self._drop(numbers)
        if numbers:
            log.warning("lost partitions %s (evicted from the group); state dropped", numbers)

    def _fenced(self, numbers: list[int]) -> None:
        """Another process claimed these partitions (this one was frozen or evicted
        and has not heard yet): drop them like lost ones and stop fetching them
        until the group hands them out again."""
        self.metrics.rebalances.labels(self.service, "fenced").inc()
        log.warning("partitions %s were claimed by another process; state dropped", numbers)
        self._drop(numbers)
        if self._consumer is not None:
            self._consumer.pause(
                *(tp for tp in self._consumer.assignment() if tp.partition in numbers)
            )

    def _on_assigned(self, assigned: list[TopicPartition]) -> None:
        assert self._consumer is not None
        self.metrics.rebalances.labels(self.service, "assigned").inc()
        numbers = sorted({tp.partition for tp in assigned} - set(self._owned))
        found, epochs = self.store.claim(numbers)
        for number in numbers:
            ckpt = found.get(number)
            seek = self.processor.restore(number, ckpt)
            self._owned[number] = ckpt if ckpt is not None else Checkpoint()
            self._owned[number].epoch = epochs[number]
            start = dict(seek) if seek is not None else dict(self._owned[number].offsets)
            for tp in (tp for tp in assigned if tp.partition == number):
                if tp.topic in start:
                    self._consumer.seek(tp, start[tp.topic])
                    self._positions[tp] = start[tp.topic]
                else:
                    self._consumer.seek_to_beginning(tp)
        self._consumer.resume(*assigned)  # partitions paused when fenced are owned again
        self._paused.difference_update(assigned)
        self.metrics.paused.labels(self.service).set(len(self._paused))
        self.metrics.assigned.labels(self.service).set(len(self._owned))
        log.info("assigned partitions %s (restored %s)", numbers, sorted(found))

    # -- offsets out of range ----------------------------------------------------

    def _out_of_range(self, positions: Mapping[TopicPartition, int]) -> None:
        """Kafka no longer has the records at these positions: decide, count and say so.

        Below the log start (retention deleted records this service had not read
        yet), resuming at the log start applies nothing twice; the records in
        between are gone and counted. Past the log end (the log was truncated,
        or the topic deleted and created again, after the checkpoint), whether
        the records there were applied cannot be told from here, so
        ``STREAMREC_RUNTIME_OFFSET_RESET`` decides: ``pause`` the partition until
        an operator acts (the default), re-read from the ``earliest`` record, or
        skip to the ``latest``.
        """
        assert self._consumer is not None
        for tp, offset in positions.items():
            start = self._consumer.beginning_offsets([tp])[tp]
            end = self._consumer.end_offsets([tp])[tp]
            where = "behind" if offset < start else "ahead"
            self.metrics.out_of_range.labels(self.service, tp.topic, where).inc()
            if where == "behind":
                self.metrics.skipped.labels(self.service, tp.topic).inc(start - offset)
                log.error(
                    "%s[%d]: offset %d is below the log start %d: %d records were deleted "
                    "before %s read them; resuming at %d",
                    tp.topic, tp.partition, offset, start, start - offset, self.service, start,
                )  # fmt: skip
                self._seek(tp, start)
                continue
            policy = self.settings.offset_reset
            log.error(
                "%s[%d]: checkpointed offset %d is past the log end %d (log truncated, or "
                "topic recreated); STREAMREC_RUNTIME_OFFSET_RESET=%s",
                tp.topic, tp.partition, offset, end, policy,
            )  # fmt: skip
            if policy == "earliest":
                self._seek(tp, start)
            elif policy == "latest":
                self._seek(tp, end)
            else:
                self._consumer.pause(tp)
                self._paused.add(tp)
                self.metrics.paused.labels(self.service).set(len(self._paused))

    def _seek(self, tp: TopicPartition, offset: int) -> None:
        assert self._consumer is not None
        self._consumer.seek(tp, offset)
        self._positions[tp] = offset

    # -- lag -------------------------------------------------------------------

    def _update_lag(self) -> None:
        """Lag of each partition consumed so far, from the high watermark its last fetch
        response carried: no request of its own (``end_offsets`` would send a
        ListOffsets request per call)."""
        if self._consumer is None:
            return
        assigned = self._consumer.assignment()
        for tp, position in self._positions.items():
            end = self._consumer.highwater(tp) if tp in assigned else None
            if end is None:
                continue  # no fetch answered for it yet
            self.metrics.lag.labels(self.service, tp.topic, str(tp.partition)).set(end - position)
