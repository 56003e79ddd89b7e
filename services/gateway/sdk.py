"""A small producer SDK for services that write events to Kafka directly.

Events are validated exactly as the gateway and the consumers validate them
(encode, then decode with the contracts' limits) before they are sent, keyed by
user so that clicks and impressions of one user share a partition.

Kafka outages are bounded here rather than in each caller:

- **Memory.** kafka-python 3 has no ``buffer.memory``: its accumulator keeps
  every record handed to it until the broker acknowledges it or
  ``delivery_timeout_ms`` expires, so a long outage would grow the process
  without bound. :class:`EventProducer` counts the bytes of unacknowledged
  records (key, value and :data:`RECORD_OVERHEAD`) and refuses a send that
  would exceed ``buffer_memory`` with :class:`KafkaUnavailable` at once,
  instead of blocking the caller as Java's producer does: every caller here
  is a request path that would rather answer now.
- **Time.** ``max_block_ms`` bounds the metadata wait of a send.
  :meth:`EventProducer.produce_batch` bounds the whole batch by one deadline
  and fails fast while Kafka is known to be failing (see :class:`_Health`).
- **Startup.** ``background=True`` returns at once and connects in a thread,
  so a service can start, and answer, while Kafka is down; sends fail with
  :class:`KafkaUnavailable` until the connection is made.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from contracts.errors import StreamrecError
from contracts.events import (
    Click,
    EventError,
    Impression,
    Reward,
    decode_click,
    decode_impression,
    decode_reward,
    encode,
)
from services.common import clients
from services.common.rewards import RewardRule, RewardSettings
from services.common.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)

#: Java's ``buffer.memory`` default: unacknowledged bytes one producer may hold.
DEFAULT_BUFFER_MEMORY = 32 * 1024 * 1024
#: What a buffered record costs besides its key and value: its headers in the
#: batch and, mostly, the client's future and bookkeeping objects (tracemalloc
#: measures about 600 bytes a record in kafka-python 3.0), so that the budget
#: bounds the memory an outage holds, not only the payload.
RECORD_OVERHEAD = 600
#: How long one background connection attempt waits for a broker to answer.
_CONNECT_ATTEMPT_MS = 5_000
_CONNECT_BACKOFF_MAX_S = 5.0


class KafkaUnavailable(StreamrecError, KafkaError):
    """Kafka cannot take records now: not connected yet, failing, or the buffer is full.

    Retriable: the same records may be sent again later.
    """

    retriable = True


class BatchNotAccepted(KafkaUnavailable):
    """A batch that was not acknowledged as a whole.

    ``appended`` is how many of its records, a prefix in order, were handed to
    the Kafka client before the failure. Those may still reach the log (the
    idempotent producer retries them until ``delivery_timeout_ms``); the others
    never will. With ``appended == 0`` nothing of the batch is or will be in Kafka.
    """

    def __init__(self, reason: str, *, appended: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.appended = appended


class BatchTooLarge(StreamrecError, ValueError):
    """A batch bigger than the whole buffer: it can never be accepted, so it is not retriable."""


class _Budget:
    """Bytes of records handed to the client and not yet acknowledged or failed."""

    def __init__(self, capacity: int) -> None:
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"buffer_memory must be a positive number of bytes, got {capacity!r}")
        self.capacity = int(capacity)
        self.used = 0
        self._lock = threading.Lock()

    def take(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.capacity:
                return False
            self.used += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.used -= size


class _Health:
    """Whether Kafka is taking our records, learnt from their outcomes; a circuit breaker.

    A retriable failure (a delivery or acknowledgement timeout, no broker, no
    metadata) marks Kafka down. While it is down, :meth:`admit` refuses batches
    at once, except one probe at a time every ``retry_after_s``: a probe's
    success (or any record delivered meanwhile) marks Kafka up again. Without
    this, every request of an outage would wait its full timeout and add its
    records to the client's buffer. Transitions are logged, once each, so an
    outage is one warning and one recovery line however many requests it fails.
    """

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = float(retry_after_s)
        self._lock = threading.Lock()
        self._up = True
        self._since = 0.0
        self._next_probe = 0.0
        self._probing = False
        self.error = ""

    @property
    def up(self) -> bool:
        return self._up

    def admit(self) -> bool:
        """Whether a batch may be sent now (Kafka up, or this batch is the next probe)."""
        with self._lock:
            if self._up:
                return True
            now = time.monotonic()
            if self._probing or now < self._next_probe:
                return False
            self._probing = True
            return True

    def finish_probe(self) -> None:
        """End a probe that learnt nothing about Kafka (e.g. the buffer was full)."""
        with self._lock:
            self._probing = False

    def record(self, error: BaseException | None, *, probe_done: bool = False) -> None:
        """Note an outcome: ``None`` is a success; only retriable errors mark Kafka down."""
        with self._lock:
            if probe_done:
                self._probing = False
            now = time.monotonic()
            if error is None:
                if not self._up:
                    log.info("Kafka takes records again after %.1f s", now - self._since)
                self._up = True
                return
            if not (isinstance(error, KafkaError) and error.retriable):
                return
            self.error = f"{type(error).__name__}: {error}"
            self._next_probe = now + self.retry_after_s
            if self._up:
                self._up = False
                self._since = now
                log.warning(
                    "Kafka is not taking records (%s); failing fast, probing every %.1f s",
                    self.error,
                    self.retry_after_s,
                )


class EventProducer:
    """Validates and produces Click and Impression events (``acks=all``, idempotent).

    Args:
        kafka: how to reach Kafka.
        topics: topic names.
        producer: a ready client to use instead of building one.
        buffer_memory: bytes of unacknowledged records this producer may hold
            (see the module doc); a send beyond it raises :class:`KafkaUnavailable`.
        max_block_ms: the client's ``max_block_ms``: how long a send may wait for
            topic metadata (kafka-python's default is 60 s).
        retry_after_s: while Kafka is failing, how often a batch may probe it.
        background: connect in a background thread (retrying until it works or
            :meth:`close`) instead of in the constructor, which waits up to 30 s
            and raises when no broker answers.
    """

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        topics: TopicSettings | None = None,
        *,
        producer: KafkaProducer | None = None,
        buffer_memory: int = DEFAULT_BUFFER_MEMORY,
        max_block_ms: int | None = None,
        retry_after_s: float = 2.0,
        background: bool = False,
    ) -> None:
        self.topics = topics or TopicSettings()
        self._kafka = kafka or KafkaSettings()
        self._options: dict[str, Any] = {}
        if max_block_ms is not None:
            self._options["max_block_ms"] = int(max_block_ms)
        self._budget = _Budget(buffer_memory)
        self._health = _Health(retry_after_s)
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._connector: threading.Thread | None = None
        self._producer = producer
        if self._producer is None:
            if background:
                self._connector = threading.Thread(
                    target=self._connect, name="event-producer-connect", daemon=True
                )
                self._connector.start()
            else:
                self._producer = clients.producer(self._kafka, **self._options)

    # -- state ---------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Whether the client is connected (always, unless built with ``background``)."""
        return self._producer is not None

    @property
    def pending_bytes(self) -> int:
        """Bytes of records handed to the client and not yet acknowledged or failed."""
        return self._budget.used

    # -- sending -------------------------------------------------------------------

    def send_click(self, click: Click) -> FutureRecordMetadata:
        """Validate and send one click; raises ``EventError`` if it is invalid."""
        raw = encode(click)
        decode_click(raw)
        return self._send(self.topics.clicks, click.user_id.encode(), raw)

    def send_impression(
        self, impression: Impression, *, validate: bool = True
    ) -> FutureRecordMetadata:
        """Validate and send one impression; raises ``EventError`` if it is invalid.

        ``validate=False`` skips the decode round trip for an impression the caller
        built from checked parts (serving's own slates).
        """
        raw = encode(impression)
        if validate:
            decode_impression(raw)
        return self._send(self.topics.impressions, impression.user_id.encode(), raw)

    def send_reward(self, reward: Reward, rule: RewardRule | None = None) -> FutureRecordMetadata:
        """Validate and send one graded reward; raises ``EventError`` if it is invalid
        or its kind is not one ``rule`` (``STREAMREC_REWARD_*`` unless given) accepts."""
        raw = encode(reward)
        decode_reward(raw)
        if (refusal := (rule or RewardSettings().rule()).refusal(reward.kind)) is not None:
            raise EventError(refusal)
        return self._send(self.topics.rewards, reward.user_id.encode(), raw)

    def send_raw(self, topic: str, user_id: str, raw: bytes) -> FutureRecordMetadata:
        """Send bytes already validated by the caller."""
        return self._send(topic, user_id.encode(), raw)

    def produce_batch(
        self, topic: str, records: Sequence[tuple[bytes, bytes]], timeout_s: float
    ) -> None:
        """Produce ``(key, value)`` records and wait until Kafka acknowledged every one.

        All or nothing from the caller's point of view: it returns only when every
        record is acknowledged, and otherwise raises :class:`BatchNotAccepted`, whose
        ``appended`` says how many records were handed to the client (those may
        still land). Checks that cost nothing come first, so that while Kafka is
        down, or the buffer is full, a batch fails at once with ``appended == 0``:
        the client must be connected, Kafka not known to be failing (else only one
        probe per ``retry_after_s`` goes through), the topic's partitions known
        (a wait of at most ``max_block_ms``, so no send below waits for metadata),
        and the whole batch must fit in the buffer. The acknowledgement wait ends
        ``timeout_s`` after the call began.

        Raises :class:`BatchTooLarge` for a batch larger than the whole buffer.
        """
        deadline = time.monotonic() + timeout_s
        producer = self._producer
        if producer is None:
            raise BatchNotAccepted("not connected to Kafka yet", appended=0)
        sizes = [len(key) + len(value) + RECORD_OVERHEAD for key, value in records]
        total = sum(sizes)
        if total > self._budget.capacity:
            raise BatchTooLarge(
                f"{total} bytes of records exceed the producer buffer of {self._budget.capacity}"
            )
        if not self._health.admit():
            raise BatchNotAccepted(f"Kafka is failing ({self._health.error})", appended=0)
        futures: list[FutureRecordMetadata] = []
        try:
            try:
                producer.partitions_for(topic)
            except KafkaError as exc:
                raise BatchNotAccepted(f"no metadata for topic {topic}: {exc}", appended=0) from exc
            if not self._budget.take(total):
                raise BatchNotAccepted(self._full(total), appended=0)
            try:
                for (key, value), size in zip(records, sizes, strict=True):
                    futures.append(self._append(producer, topic, key, value, size))
            except Exception as exc:
                self._budget.release(sum(sizes[len(futures) :]))
                raise BatchNotAccepted(
                    f"send failed after {len(futures)} of {len(records)} records: {exc!r}",
                    appended=len(futures),
                ) from exc
            for future in futures:
                try:
                    future.get(timeout=max(0.0, deadline - time.monotonic()))
                except Exception as exc:
                    raise BatchNotAccepted(
                        f"not acknowledged within {timeout_s:g} s: {exc!r}", appended=len(futures)
                    ) from exc
        except BatchNotAccepted as exc:
            # A Kafka error says something about Kafka; a full buffer or a bad record does not.
            if isinstance(exc.__cause__, KafkaError):
                self._health.record(exc.__cause__, probe_done=True)
            else:
                self._health.finish_probe()
            raise
        self._health.record(None, probe_done=True)

    def wait(self, futures: Iterable[FutureRecordMetadata], timeout: float = 30.0) -> None:
        """Block until every send is acknowledged; raises the first Kafka error.

        ``timeout`` bounds the whole wait, not each future.
        """
        deadline = time.monotonic() + timeout
        for future in futures:
            future.get(timeout=max(0.0, deadline - time.monotonic()))

    def connected(self) -> bool:
        """Whether Kafka takes records: connected, not failing, and the clicks topic known."""
        producer = self._producer
        if producer is None or not self._health.up:
            return False
        try:
            return bool(producer.partitions_for(self.topics.clicks))
        except KafkaError:
            return False

    def flush(self, timeout: float = 30.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is buffered (up to ``timeout``), stop connecting, close the client."""
        self._closed.set()
        if self._connector is not None:
            self._connector.join(_CONNECT_ATTEMPT_MS / 1000 + timeout)
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            producer.close(timeout=timeout)

    # -- internals -----------------------------------------------------------------

    def _send(self, topic: str, key: bytes, value: bytes) -> FutureRecordMetadata:
        producer = self._producer
        if producer is None:
            raise KafkaUnavailable("not connected to Kafka yet")
        size = len(key) + len(value) + RECORD_OVERHEAD
        if not self._budget.take(size):
            raise KafkaUnavailable(self._full(size))
        try:
            return self._append(producer, topic, key, value, size)
        except BaseException as exc:
            self._budget.release(size)
            self._health.record(exc)
            raise

    def _append(
        self, producer: KafkaProducer, topic: str, key: bytes, value: bytes, size: int
    ) -> FutureRecordMetadata:
        """Hand one record whose ``size`` is already taken from the budget to the client."""
        future = producer.send(topic, key=key, value=value)
        future.add_callback(self._delivered, size)
        future.add_errback(self._undelivered, size)
        return future

    def _delivered(self, size: int, _metadata: object) -> None:
        self._budget.release(size)
        self._health.record(None)

    def _undelivered(self, size: int, error: BaseException) -> None:
        self._budget.release(size)
        self._health.record(error)

    def _full(self, size: int) -> str:
        return (
            f"producer buffer full: {self._budget.used} of {self._budget.capacity} bytes"
            f" await acknowledgement, {size} more do not fit"
        )

    def _connect(self) -> None:
        """Build the client, retrying with backoff until it connects or :meth:`close`."""
        delay, attempts = 0.5, 0
        while not self._closed.is_set():
            attempts += 1
            try:
                producer = clients.producer(
                    self._kafka, bootstrap_timeout_ms=_CONNECT_ATTEMPT_MS, **self._options
                )
            except Exception as exc:  # noqa: BLE001 - any failure to connect is retried
                if attempts == 1:
                    log.warning("Kafka unreachable (%r); connecting in the background", exc)
                else:
                    log.debug("Kafka connection attempt %d failed: %r", attempts, exc)
                self._closed.wait(delay)
                delay = min(delay * 2, _CONNECT_BACKOFF_MAX_S)
                continue
            with self._lock:
                if not self._closed.is_set():
                    self._producer = producer
                    log.info("connected to Kafka after %d attempt(s)", attempts)
                    return
            producer.close(timeout=0)
            return


__all__ = [
    "DEFAULT_BUFFER_MEMORY",
    "RECORD_OVERHEAD",
    "BatchNotAccepted",
    "BatchTooLarge",
    "EventProducer",
    "KafkaUnavailable",
]
