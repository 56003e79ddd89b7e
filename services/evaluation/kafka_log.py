"""Read a bounded range of the feedback topic, and the impressions it refers to, from Kafka.

The range is on the feedback topic: from ``--since`` (record timestamp, via
``offsets_for_times``) or ``--from-offset`` (one offset for every partition,
or ``partition:offset,...``), else the beginning of the retained log; up to
``--until`` / ``--to-offset`` (exclusive), else the end offsets when reading
starts, so a read always terminates however fast the topic grows.
Impressions are read from ``lookback`` seconds before the earliest feedback
record's timestamp (an impression precedes its feedback by at most the
joiner's attribution window) up to the impressions topic's end offsets at the
start. Records that do not decode are counted by topic, never fatal.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TypeVar

from kafka import KafkaConsumer, TopicPartition

from contracts.events import EventError, Feedback, Impression, decode_feedback, decode_impression
from services.common import clients
from services.common.settings import KafkaSettings, TopicSettings

T = TypeVar("T")
#: One offset for every partition, or an offset per partition.
Offsets = int | dict[int, int]

#: Give up when a partition makes no progress towards its end offset for this long.
STALL_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class LogRange:
    """Which feedback records to read; see the module docstring."""

    since: float | None = None
    until: float | None = None
    from_offset: Offsets | None = None
    to_offset: Offsets | None = None
    #: Seconds before the first feedback record to start reading impressions at.
    lookback: float = 3600.0


@dataclass
class KafkaLog:
    """The records read, with where they came from."""

    impressions: list[Impression]
    feedback: list[Feedback]
    #: topic -> {partition: [start, end)} actually read.
    ranges: dict[str, dict[int, list[int]]] = field(default_factory=dict)
    #: topic -> records that did not decode.
    invalid: dict[str, int] = field(default_factory=dict)


def parse_offsets(value: str) -> Offsets:
    """``"120"`` (every partition) or ``"0:120,1:98"`` (per partition).

    >>> parse_offsets("0:120,1:98")
    {0: 120, 1: 98}
    """
    try:
        if ":" not in value:
            number = int(value)
            if number < 0:
                raise ValueError
            return number
        offsets = {}
        for pair in value.split(","):
            partition, _, offset = pair.partition(":")
            offsets[int(partition)] = int(offset)
        if any(v < 0 for v in offsets.values()) or any(p < 0 for p in offsets):
            raise ValueError
        return offsets
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected OFFSET or PARTITION:OFFSET,..., non-negative, got {value!r}"
        ) from None


def parse_time(value: str) -> float:
    """Seconds since the epoch, or an ISO 8601 time (UTC unless it says otherwise)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected seconds since the epoch or an ISO 8601 time, got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def add_range_arguments(parser: argparse.ArgumentParser) -> None:
    """The Kafka connection and range options shared by ``evaluate`` and ``export-log``."""
    parser.add_argument(
        "--kafka", metavar="HOST:PORT", help="bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS)"
    )
    parser.add_argument(
        "--feedback-topic", help="feedback topic (default: STREAMREC_TOPIC_FEEDBACK)"
    )
    parser.add_argument(
        "--impressions-topic", help="impressions topic (default: STREAMREC_TOPIC_IMPRESSIONS)"
    )
    parser.add_argument(
        "--since", type=parse_time, help="first feedback record time (epoch seconds or ISO 8601)"
    )
    parser.add_argument("--until", type=parse_time, help="feedback record time to stop at")
    parser.add_argument(
        "--from-offset",
        type=parse_offsets,
        metavar="OFFSET|P:OFFSET,...",
        help="first feedback offset (all partitions, or per partition)",
    )
    parser.add_argument(
        "--to-offset",
        type=parse_offsets,
        metavar="OFFSET|P:OFFSET,...",
        help="feedback offset to stop before (default: the end offsets at start)",
    )
    parser.add_argument(
        "--lookback",
        type=float,
        default=3600.0,
        help="seconds of impressions to read before the first feedback (default 3600)",
    )


def range_from_args(args: argparse.Namespace) -> LogRange:
    """The :class:`LogRange` the parsed options describe; ValueError if they conflict."""
    if args.since is not None and args.from_offset is not None:
        raise ValueError("give --since or --from-offset, not both")
    if args.until is not None and args.to_offset is not None:
        raise ValueError("give --until or --to-offset, not both")
    return LogRange(
        since=args.since,
        until=args.until,
        from_offset=args.from_offset,
        to_offset=args.to_offset,
        lookback=args.lookback,
    )


def read_from_args(args: argparse.Namespace) -> KafkaLog:
    """Read the log the parsed ``add_range_arguments`` options describe."""
    kafka = KafkaSettings(**({"bootstrap_servers": args.kafka} if args.kafka else {}))
    topics = TopicSettings()
    return read_log(
        kafka,
        feedback_topic=args.feedback_topic or topics.feedback,
        impressions_topic=args.impressions_topic or topics.impressions,
        log_range=range_from_args(args),
    )


def read_log(
    kafka: KafkaSettings,
    *,
    feedback_topic: str,
    impressions_topic: str,
    log_range: LogRange,
) -> KafkaLog:
    """Read ``log_range`` of ``feedback_topic`` and the impressions it may refer to."""
    consumer = clients.consumer(kafka, None, auto_offset_reset="earliest")
    try:
        tps = _partitions(consumer, feedback_topic)
        start = _bound(consumer, tps, log_range.since, log_range.from_offset, begin=True)
        end = _bound(consumer, tps, log_range.until, log_range.to_offset, begin=False)
        feedback, bad_feedback, first_ms = _read(consumer, start, end, decode_feedback)
        log = KafkaLog([], feedback, invalid={feedback_topic: bad_feedback} if bad_feedback else {})
        log.ranges[feedback_topic] = {tp.partition: [start[tp], end[tp]] for tp in tps}
        if first_ms is None:
            return log
        imp_tps = _partitions(consumer, impressions_topic)
        imp_start = _bound(
            consumer, imp_tps, first_ms / 1000.0 - log_range.lookback, None, begin=True
        )
        imp_end = consumer.end_offsets(imp_tps)
        impressions, bad, _ = _read(consumer, imp_start, imp_end, decode_impression)
        log.impressions = impressions
        if bad:
            log.invalid[impressions_topic] = bad
        log.ranges[impressions_topic] = {
            tp.partition: [imp_start[tp], imp_end[tp]] for tp in imp_tps
        }
        return log
    finally:
        consumer.close()


def _partitions(consumer: KafkaConsumer, topic: str) -> list[TopicPartition]:
    partitions = consumer.partitions_for_topic(topic)
    if not partitions:
        raise ValueError(f"topic {topic!r} does not exist (or has no partitions)")
    return [TopicPartition(topic, p) for p in sorted(partitions)]


def _bound(
    consumer: KafkaConsumer,
    tps: list[TopicPartition],
    seconds: float | None,
    offsets: Offsets | None,
    *,
    begin: bool,
) -> dict[TopicPartition, int]:
    first = consumer.beginning_offsets(tps)
    last = consumer.end_offsets(tps)
    if seconds is not None:
        found = consumer.offsets_for_times({tp: max(0, int(seconds * 1000)) for tp in tps})
        return {tp: found[tp].offset if found.get(tp) else last[tp] for tp in tps}
    if offsets is None:
        return first if begin else last
    if isinstance(offsets, int):
        chosen = dict.fromkeys(tps, offsets)
    else:
        unknown = sorted(set(offsets) - {tp.partition for tp in tps})
        if unknown:
            raise ValueError(f"{tps[0].topic!r} has no partitions {unknown}")
        default = first if begin else last
        chosen = {tp: offsets.get(tp.partition, default[tp]) for tp in tps}
    return {tp: min(max(chosen[tp], first[tp]), last[tp]) for tp in tps}


def _read(
    consumer: KafkaConsumer,
    start: Mapping[TopicPartition, int],
    end: Mapping[TopicPartition, int],
    decode: Callable[[bytes], T],
) -> tuple[list[T], int, int | None]:
    """Records in ``[start, end)`` per partition: (decoded, undecodable, first timestamp ms)."""
    pending = [tp for tp in start if start[tp] < end[tp]]
    events: list[T] = []
    invalid = 0
    first_ms: int | None = None
    if not pending:
        return events, invalid, first_ms
    consumer.assign(pending)
    for tp in pending:
        consumer.seek(tp, start[tp])
    progress = time.monotonic()
    while pending:
        batches = consumer.poll(timeout_ms=500)
        for tp, records in batches.items():
            for record in records:
                if record.offset >= end[tp]:
                    break
                progress = time.monotonic()
                first_ms = record.timestamp if first_ms is None else min(first_ms, record.timestamp)
                try:
                    events.append(decode(record.value or b""))
                except EventError:
                    invalid += 1
        done = [tp for tp in pending if consumer.position(tp) >= end[tp]]
        if done:
            consumer.pause(*done)
            pending = [tp for tp in pending if tp not in done]
        if pending and time.monotonic() - progress > STALL_TIMEOUT_S:
            behind = {f"{tp.topic}[{tp.partition}]": end[tp] for tp in pending}
            raise ValueError(f"reading stalled before the end offsets {behind}")
    consumer.unsubscribe()
    return events, invalid, first_ms
