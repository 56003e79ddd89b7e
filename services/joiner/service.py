"""``streamrec run joiner``: impressions + clicks in, feedback out.

Checkpoints stay small: per partition only the two streams' event-time
progress and the earliest offsets still needed. On restore the joiner seeks
back to those offsets and re-reads the log to rebuild its open impressions;
records below the checkpointed offsets are re-applied silently (their feedback
was emitted before the checkpoint). Until the re-read has passed them, the
partition is not checkpointed again: the stored checkpoint is what describes its
state. Feedback emitted after the last checkpoint may be emitted again after a
crash; it carries the same sequence numbers, so consumers drop it.

Idle streams: when a partition with open impressions gets no impressions or no
clicks for ``idle_close_s``, the joiner appends a watermark marker (event time =
now - lateness) to that partition of each topic. A marker advances only its own
topic's progress, so a replay closes windows exactly as the first run did,
however the two topics' records interleave.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import Feedback, decode_click, decode_impression, encode
from services.common import (
    Checkpoint,
    ConsumerRuntime,
    Context,
    KafkaSettings,
    Processor,
    Record,
    RedisSettings,
    Rejection,
    RuntimeSettings,
    TopicSettings,
)
from services.common.process import run_consumer_service
from services.joiner.join import PartitionJoin

log = logging.getLogger(__name__)


class JoinerSettings(BaseSettings):
    """Joiner settings (``STREAMREC_JOINER_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_JOINER_", env_file=".env", extra="ignore"
    )

    group: str = "joiner"
    """``STREAMREC_JOINER_GROUP``: consumer group and checkpoint namespace."""
    window_s: float = Field(30.0, gt=0)
    """``STREAMREC_JOINER_WINDOW_S``: a click within this long after the impression counts."""
    lateness_s: float = Field(5.0, ge=0)
    """``STREAMREC_JOINER_LATENESS_S``: how far behind the watermark events may still arrive."""
    idle_close_s: float = Field(2.0, gt=0)
    """``STREAMREC_JOINER_IDLE_CLOSE_S``: processing time before an idle partition is advanced."""
    max_partition_fetch_bytes: int = Field(256 * 1024, ge=1024)
    """``STREAMREC_JOINER_MAX_PARTITION_FETCH_BYTES``: per-partition fetch size."""


class _State(msgspec.Struct):
    seen_impressions: float
    seen_clicks: float
    replay_from: dict[str, int]


class JoinerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.feedback = Counter(
            "streamrec_joiner_feedback_total",
            "Feedback records emitted, by reward.",
            ["reward"],
            registry=registry,
        )
        self.clicks = Counter(
            "streamrec_joiner_clicks_total",
            "Clicks by attribution outcome (matched, duplicate, late, unmatched, not_in_slate).",
            ["outcome"],
            registry=registry,
        )
        self.open = Gauge(
            "streamrec_joiner_open_impressions",
            "Impressions waiting for their attribution window to close.",
            registry=registry,
        )
        self.watermark_delay = Gauge(
            "streamrec_joiner_watermark_delay_seconds",
            "Wall-clock time minus the oldest partition watermark.",
            registry=registry,
        )


class JoinProcessor(Processor):
    """Runs one :class:`PartitionJoin` per owned partition."""

    def __init__(
        self,
        settings: JoinerSettings,
        topics: TopicSettings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        self.metrics = JoinerMetrics(registry or CollectorRegistry())
        self.joins: dict[int, PartitionJoin] = {}
        #: (partition, topic) -> monotonic time of its last record.
        self._last_input: dict[tuple[int, str], float] = {}
        self._last_control: dict[int, float] = {}
        self._reported: dict[str, int] = {}
        #: partition -> the restored checkpoint's offsets, while re-reading up to them.
        self._rebuilding: dict[int, dict[str, int]] = {}

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        now = time.monotonic()
        for record in records:
            join = self.joins[record.partition]
            if record.topic == self.topics.impressions:
                closed = join.impression(record.value, record.offset)
            else:
                closed = join.click(record.value, record.offset)
            self._emit(record, closed, ctx)
            self._last_input[(record.partition, record.topic)] = now
        self._report()
        return []

    def control(self, record: Record, ctx: Context) -> None:
        watermark = float(msgspec.json.decode(record.raw).get("watermark", 0.0))
        is_impressions = record.topic == self.topics.impressions
        closed = self.joins[record.partition].advance(
            watermark, impressions=is_impressions, clicks=not is_impressions
        )
        self._emit(record, closed, ctx)
        self._report()

    def tick(self, now: float, ctx: Context) -> None:
        clock = time.monotonic()
        every = self.settings.idle_close_s
        for partition, join in self.joins.items():
            stalest = max(
                clock - self._last_input.get((partition, topic), clock)
                for topic in (self.topics.impressions, self.topics.clicks)
            )
            quiet = min(stalest, clock - self._last_control.get(partition, float("-inf")))
            if join.open and quiet >= every:
                # Repeated while the partition stays idle, until every window has closed.
                marker = msgspec.json.encode({"watermark": now - self.settings.lateness_s})
                for topic in (self.topics.impressions, self.topics.clicks):
                    ctx.emit_control(topic, partition, marker)
                self._last_control[partition] = clock
        if self.joins:
            oldest = min(join.watermark for join in self.joins.values())
            self.metrics.watermark_delay.set(max(0.0, now - oldest) if oldest else 0.0)

    def _emit(self, record: Record, closed: list[Feedback], ctx: Context) -> None:
        rewarded = 0
        for fb in closed:
            ctx.emit(
                self.topics.feedback,
                encode(fb),
                key=fb.user_id.encode(),
                source_partition=record.partition,
            )
            rewarded += fb.reward
        if closed:
            self.metrics.feedback.labels("1").inc(rewarded)
            self.metrics.feedback.labels("0").inc(len(closed) - rewarded)

    def _report(self) -> None:
        totals: dict[str, int] = {}
        for join in self.joins.values():
            for name, value in join.stats.items():
                totals[name] = totals.get(name, 0) + value
        for name, value in totals.items():
            if name.startswith("clicks_"):
                delta = value - self._reported.get(name, 0)
                if delta > 0:
                    self.metrics.clicks.labels(name.removeprefix("clicks_")).inc(delta)
            self._reported[name] = value
        self.metrics.open.set(sum(len(join.open) for join in self.joins.values()))

    def snapshot(self, partition: int) -> bytes:
        join = self.joins[partition]
        impressions, clicks = join.replay_from()
        replay = {}
        if impressions is not None:
            replay[self.topics.impressions] = impressions
        if clicks is not None:
            replay[self.topics.clicks] = clicks
        return msgspec.json.encode(
            _State(
                seen_impressions=join.seen_impressions,
                seen_clicks=join.seen_clicks,
                replay_from=replay,
            )
        )

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        join = PartitionJoin(window_s=self.settings.window_s, lateness_s=self.settings.lateness_s)
        self.joins[partition] = join
        self._rebuilding.pop(partition, None)
        for topic in (self.topics.impressions, self.topics.clicks):
            self._last_input[(partition, topic)] = time.monotonic()
        if checkpoint is None or not checkpoint.state:
            return None
        state = msgspec.json.decode(checkpoint.state, type=_State)
        seek = dict(checkpoint.offsets)
        for topic, offset in state.replay_from.items():
            seek[topic] = min(offset, seek.get(topic, offset))
        rereading = {t for t, offset in seek.items() if offset < checkpoint.offsets.get(t, 0)}
        join.resume_after(
            state.seen_impressions,
            state.seen_clicks,
            checkpoint.offsets.get(self.topics.impressions, 0),
            rereading_impressions=self.topics.impressions in rereading,
            rereading_clicks=self.topics.clicks in rereading,
        )
        if seek != checkpoint.offsets:
            self._rebuilding[partition] = dict(checkpoint.offsets)
            log.info(
                "partition %d: re-reading from %s to rebuild open impressions (was at %s)",
                partition,
                seek,
                checkpoint.offsets,
            )
        return seek

    def checkpointable(self, partition: int, offsets: Mapping[str, int]) -> bool:
        # The restored state says what was emitted below the restored offsets; a
        # checkpoint taken while re-reading below them would lose that.
        target = self._rebuilding.get(partition)
        if target is None:
            return True
        if all(offsets.get(topic, 0) >= offset for topic, offset in target.items()):
            del self._rebuilding[partition]
            return True
        return False

    def revoke(self, partition: int) -> None:
        self._rebuilding.pop(partition, None)
        self.joins.pop(partition, None)
        for topic in (self.topics.impressions, self.topics.clicks):
            self._last_input.pop((partition, topic), None)
        self._last_control.pop(partition, None)


def build_runtime(
    registry: CollectorRegistry,
    settings: JoinerSettings | None = None,
    runtime: RuntimeSettings | None = None,
) -> ConsumerRuntime:
    settings = settings or JoinerSettings()
    topics = TopicSettings()
    return ConsumerRuntime(
        service="joiner",
        group=settings.group,
        inputs={topics.impressions: decode_impression, topics.clicks: decode_click},
        processor=JoinProcessor(settings, topics, registry),
        # Small fetches make each poll carry both topics of a partition.
        kafka=KafkaSettings(max_partition_fetch_bytes=settings.max_partition_fetch_bytes),
        redis_settings=RedisSettings(),
        topics=topics,
        settings=runtime,
        registry=registry,
    )


def main() -> int:
    return run_consumer_service("joiner", build_runtime)


if __name__ == "__main__":
    raise SystemExit(main())
