"""``streamrec run joiner``: impressions + clicks (+ graded rewards) in, feedback out.

Graded rewards: with a reward rule that configures kinds besides clicks
(``STREAMREC_REWARD_WEIGHTS``, :mod:`services.common.rewards`) the joiner also
reads the rewards topic as a third stream, co-partitioned, with its own progress,
idle markers and replay mark; otherwise it does not subscribe to it.

Checkpoints stay small: per partition only the two streams' event-time
progress and the earliest offsets still needed (with the progress there). On
restore the joiner seeks back to those offsets and re-reads the log to rebuild
its open impressions, waiting clicks and remembered impression ids (the
impressions topic is re-read for the retry horizon, window + lateness +
``retry_horizon_s``); records below the checkpointed offsets are re-applied
silently (their feedback was emitted before the checkpoint). Until the re-read
has passed them, the partition is not checkpointed again: the stored checkpoint
is what describes its state. Feedback emitted after the last checkpoint may be
emitted again after a crash; it carries the same sequence numbers, so consumers
drop it.

Time: each event's time is bounded by its record's Kafka timestamp (set by the
producer, or by the broker with ``message.timestamp.type=LogAppendTime``): more
than ``max_skew_s`` ahead of it is clamped, so a record moves the watermark at
most ``max_skew_s`` past its own timestamp (see :mod:`services.joiner.clock`).

Idle streams: when a partition with open impressions gets no impressions or no
clicks for ``idle_close_s``, the joiner appends a watermark marker to that
partition of each topic: the log's time (the newest record timestamp read,
advanced by the monotonic time since) minus ``lateness_s``. This process's wall
clock plays no part; what stays clock-based is the idle timer and the
extrapolation between records (the monotonic clock), and the producers' or
broker's clocks behind the record timestamps. A marker advances only its own
topic's progress, so a replay closes windows exactly as the first run did,
however the two topics' records interleave.

Co-partitioning: clicks and impressions of a user must share a partition
number, so the two topics must have the same partition count; the joiner
refuses to start otherwise (:class:`PartitionMismatch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.control import decode_watermark, encode_watermark
from contracts.errors import StreamrecError
from contracts.events import Feedback, decode_click, decode_impression, decode_reward, encode
from services.common import (
    Checkpoint,
    ConsumerRuntime,
    Context,
    Processor,
    Record,
    Rejection,
    TopicSettings,
)
from services.common.rewards import RewardRule, RewardSettings
from services.common.service import ServiceSpec, run_service
from services.joiner.clock import LogClock
from services.joiner.join import (
    DEFAULT_MAX_OPEN_PER_USER,
    DEFAULT_MAX_REMEMBERED,
    DEFAULT_MAX_SKEW_S,
    DEFAULT_RETRY_HORIZON_S,
    PartitionJoin,
)

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
    retry_horizon_s: float = Field(DEFAULT_RETRY_HORIZON_S, ge=0)
    """``STREAMREC_JOINER_RETRY_HORIZON_S``: how long after its window a duplicate may
    still come (a client retry after a 503: the original can land up to the 120 s
    delivery timeout later, the retry meanwhile). Impression ids are remembered, and
    clicks wait for their impression, for window + lateness + this after they
    arrived, in the impression stream's event time; a restore re-reads that much of
    the impressions topic."""
    max_skew_s: float = Field(DEFAULT_MAX_SKEW_S, gt=0)
    """``STREAMREC_JOINER_MAX_SKEW_S``: an event time further than this ahead of its
    record's Kafka timestamp is clamped to it (counted, reason ``future``), so one
    client's clock moves the watermark this far at most; further behind is counted
    (``past``) and handled as late. At ``lateness_s`` or less, a skewed client can
    take no more from anyone's window than the lateness the watermark allows."""
    max_open_per_user: int = Field(DEFAULT_MAX_OPEN_PER_USER, ge=1)
    """``STREAMREC_JOINER_MAX_OPEN_PER_USER``: impressions of one user in their windows at
    once; above it the oldest is closed early and its feedback emitted (counted,
    ``closed_early``)."""
    max_remembered: int = Field(DEFAULT_MAX_REMEMBERED, ge=1)
    """``STREAMREC_JOINER_MAX_REMEMBERED``: remembered ids per topic and partition (about
    300 bytes each); above it the oldest are forgotten early (counted)."""

    def join(self, rule: RewardRule | None = None) -> PartitionJoin:
        """A fresh join of one partition with these settings and reward ``rule``."""
        return PartitionJoin(
            rule=rule,
            window_s=self.window_s,
            lateness_s=self.lateness_s,
            retry_horizon_s=self.retry_horizon_s,
            max_open_per_user=self.max_open_per_user,
            max_remembered=self.max_remembered,
            max_skew_s=self.max_skew_s,
        )


class _State(msgspec.Struct):
    seen_impressions: float
    seen_clicks: float
    replay_from: dict[str, int]
    #: Each re-read topic's progress where its re-read starts (absent in older checkpoints).
    replay_progress: dict[str, float] = msgspec.field(default_factory=dict)
    #: The rewards stream's progress (graded rewards; absent in older checkpoints).
    seen_rewards: float = 0.0


class PartitionMismatch(StreamrecError):
    """Clicks and impressions do not have the same number of partitions."""


def check_copartitioned(
    partition_counts: Mapping[str, int], topics: TopicSettings, *, rewards: bool = False
) -> None:
    """Refuse input topics whose partition counts differ.

    A user's clicks and impressions (and rewards, if read) are joined only if they
    share a partition number: with different counts most clicks would silently
    find no impression.
    """
    impressions = partition_counts.get(topics.impressions)
    others = [topics.clicks] + ([topics.rewards] if rewards else [])
    for other in others:
        count = partition_counts.get(other)
        if impressions != count:
            raise PartitionMismatch(
                f"topics {topics.impressions!r} ({impressions} partitions) and {other!r} "
                f"({count} partitions) must have the same partition count: the joiner pairs "
                "a user's events by partition number (add partitions to the smaller one, "
                "or recreate both)"
            )


#: Policies named in the per-policy series; feedback of further names counts as ``other``.
MAX_POLICY_LABELS = 32
OTHER_POLICY = "other"


class JoinerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.policy_feedback = Counter(
            "streamrec_joiner_policy_feedback_total",
            "Feedback records emitted, by the policy that served the slate (the first "
            f"{MAX_POLICY_LABELS} names seen, then other): the denominator of per-policy CTR.",
            ["policy"],
            registry=registry,
        )
        self.policy_rewards = Counter(
            "streamrec_joiner_policy_rewards_total",
            "Sum of the rewards of the feedback emitted, by policy (labelled as "
            "streamrec_joiner_policy_feedback_total): the numerator of per-policy CTR.",
            ["policy"],
            registry=registry,
        )
        self._policies: set[str] = set()
        self.feedback = Counter(
            "streamrec_joiner_feedback_total",
            "Feedback records emitted, by reward (1: any positive reward, 0: none).",
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
        self.rewards = Counter(
            "streamrec_joiner_rewards_total",
            "Reward events by attribution outcome (matched, duplicate, late, unmatched, "
            "not_in_slate).",
            ["outcome"],
            registry=registry,
        )
        self.reward_sum = Counter(
            "streamrec_joiner_feedback_reward_sum_total",
            "Sum of the combined rewards of the feedback emitted.",
            registry=registry,
        )
        self.impressions = Counter(
            "streamrec_joiner_impressions_total",
            "Impressions by outcome (closed, duplicate, late, closed_early, rebuilt).",
            ["outcome"],
            registry=registry,
        )
        self.event_time = Counter(
            "streamrec_joiner_event_time_out_of_bounds_total",
            "Events whose time is more than max_skew_s from their record timestamp, by "
            "reason (future: clamped; past: kept, handled as late).",
            ["topic", "reason"],
            registry=registry,
        )
        self.evicted = Counter(
            "streamrec_joiner_remembered_evicted_total",
            "Remembered ids forgotten before their horizon because of max_remembered.",
            ["topic"],
            registry=registry,
        )
        self.remembered = Gauge(
            "streamrec_joiner_remembered_ids",
            "Impression and click ids remembered to drop duplicates.",
            ["topic"],
            registry=registry,
        )

    def policy_label(self, policy: str) -> str:
        """``policy`` as a label: itself among the first :data:`MAX_POLICY_LABELS` seen."""
        if policy not in self._policies and len(self._policies) < MAX_POLICY_LABELS:
            self._policies.add(policy)
        return policy if policy in self._policies else OTHER_POLICY


class JoinProcessor(Processor):
    """Runs one :class:`PartitionJoin` per owned partition."""

    def __init__(
        self,
        settings: JoinerSettings,
        topics: TopicSettings,
        registry: CollectorRegistry | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        rule: RewardRule | None = None,
    ) -> None:
        self.settings = settings
        self.topics = topics
        #: How signals combine into rewards (``STREAMREC_REWARD_*`` unless given).
        self.rule = rule or RewardSettings().rule()
        #: The topics joined: the rewards topic only under a graded rule.
        self.streams = (topics.impressions, topics.clicks) + (
            (topics.rewards,) if self.rule.graded else ()
        )
        self.metrics = JoinerMetrics(registry or CollectorRegistry())
        self._monotonic = monotonic
        #: The log's time, from the timestamps of the records read (for idle markers).
        self.log_clock = LogClock()
        #: Idle markers travel on every input topic.
        self.controls = {topic: decode_watermark for topic in self.streams}
        self.joins: dict[int, PartitionJoin] = {}
        #: (partition, topic) -> monotonic time of its last record.
        self._last_input: dict[tuple[int, str], float] = {}
        self._last_control: dict[int, float] = {}
        self._reported: dict[str, int] = {}
        #: partition -> the restored checkpoint's offsets of the topics re-read below them.
        self._rebuilding: dict[int, dict[str, int]] = {}
        #: (partition, topic) that delivered a record since the partition was restored.
        self._delivered: set[tuple[int, str]] = set()

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        now = self._monotonic()
        for record in records:
            join = self.joins[record.partition]
            received = record.timestamp_ms / 1000 if record.timestamp_ms >= 0 else None
            if received is not None:
                self.log_clock.observe(received, now)
            if record.topic == self.topics.impressions:
                closed = join.impression(record.value, record.offset, received)
            elif record.topic == self.topics.clicks:
                closed = join.click(record.value, record.offset, received)
            else:
                closed = join.reward(record.value, record.offset, received)
            self._emit(record, closed, ctx)
            self._last_input[(record.partition, record.topic)] = now
            self._delivered.add((record.partition, record.topic))
        self._report()
        return []

    def control(self, record: Record, ctx: Context) -> None:
        watermark = record.value.watermark
        topic = record.topic
        closed = self.joins[record.partition].advance(
            watermark,
            impressions=topic == self.topics.impressions,
            clicks=topic == self.topics.clicks,
            rewards=topic == self.topics.rewards,
        )
        self._delivered.add((record.partition, record.topic))
        self._emit(record, closed, ctx)
        self._report()

    def tick(self, now: float, ctx: Context) -> None:
        clock = self._monotonic()
        log_now = self.log_clock.now(clock)
        every = self.settings.idle_close_s
        for partition, join in self.joins.items():
            stalest = max(
                clock - self._last_input.get((partition, topic), clock) for topic in self.streams
            )
            quiet = min(stalest, clock - self._last_control.get(partition, float("-inf")))
            if join.open and quiet >= every and log_now is not None:
                # Repeated while the partition stays idle, until every window has closed.
                marker = encode_watermark(log_now - self.settings.lateness_s)
                for topic in self.streams:
                    ctx.emit_control(topic, partition, marker)
                self._last_control[partition] = clock
        if self.joins:
            oldest = min(join.watermark for join in self.joins.values())
            self.metrics.watermark_delay.set(max(0.0, now - oldest) if oldest else 0.0)

    def _emit(self, record: Record, closed: list[Feedback], ctx: Context) -> None:
        rewarded = 0
        total = 0.0
        by_policy: dict[str, list[float]] = {}
        for fb in closed:
            ctx.emit(
                self.topics.feedback,
                encode(fb),
                key=fb.user_id.encode(),
                source_partition=record.partition,
            )
            rewarded += fb.reward > 0.0
            total += fb.reward
            counts = by_policy.setdefault(fb.policy, [0, 0.0])
            counts[0] += 1
            counts[1] += fb.reward
        for policy, (n, rewards) in by_policy.items():
            label = self.metrics.policy_label(policy)
            self.metrics.policy_feedback.labels(label).inc(n)
            self.metrics.policy_rewards.labels(label).inc(rewards)
        if closed:
            self.metrics.feedback.labels("1").inc(rewarded)
            self.metrics.feedback.labels("0").inc(len(closed) - rewarded)
            self.metrics.reward_sum.inc(total)

    def _report(self) -> None:
        totals: dict[str, int] = {}
        remembered = [0, 0, 0]
        for join in self.joins.values():
            for name, value in join.stats.items():
                totals[name] = totals.get(name, 0) + value
            for i, count in enumerate((*join.remembered(), join.remembered_rewards())):
                remembered[i] += count
        for name, value in totals.items():
            delta = value - self._reported.get(name, 0)
            self._reported[name] = value
            if delta > 0:
                self._count(name, delta)
        for topic, count in zip(self.streams, remembered, strict=False):
            self.metrics.remembered.labels(topic).set(count)
        self.metrics.open.set(sum(len(join.open) for join in self.joins.values()))

    def _count(self, stat: str, delta: int) -> None:
        """Add a :class:`PartitionJoin` statistic's growth to its metric."""
        stream, _, outcome = stat.partition("_")
        topics = {
            "impressions": self.topics.impressions,
            "clicks": self.topics.clicks,
            "rewards": self.topics.rewards,
        }
        if stream == "clicks":
            self.metrics.clicks.labels(outcome).inc(delta)
        elif stream == "rewards":
            self.metrics.rewards.labels(outcome).inc(delta)
        elif stream == "impressions":
            self.metrics.impressions.labels(outcome).inc(delta)
        elif stream == "time":
            reason, _, which = outcome.partition("_")
            self.metrics.event_time.labels(topics[which], reason).inc(delta)
        elif stream == "evicted":
            self.metrics.evicted.labels(topics[outcome]).inc(delta)

    def snapshot(self, partition: int) -> bytes:
        join = self.joins[partition]
        replay: dict[str, int] = {}
        progress: dict[str, float] = {}
        marks = (*join.replay_marks(), join.reward_replay_mark() if join.graded else None)
        for topic, mark in zip(self.streams, marks, strict=False):
            if mark is not None:
                replay[topic] = mark.offset
                progress[topic] = mark.progress
        return msgspec.json.encode(
            _State(
                seen_impressions=join.seen_impressions,
                seen_clicks=join.seen_clicks,
                replay_from=replay,
                replay_progress=progress,
                seen_rewards=join.seen_rewards,
            )
        )

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        join = self.settings.join(self.rule)
        self.joins[partition] = join
        self._rebuilding.pop(partition, None)
        for topic in self.streams:
            self._last_input[(partition, topic)] = self._monotonic()
            self._delivered.discard((partition, topic))
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
            impressions_progress=state.replay_progress.get(self.topics.impressions, 0.0),
            clicks_progress=state.replay_progress.get(self.topics.clicks, 0.0),
            seen_rewards=state.seen_rewards,
            rereading_rewards=self.topics.rewards in rereading,
            rewards_progress=state.replay_progress.get(self.topics.rewards, 0.0),
        )
        if rereading:
            self._rebuilding[partition] = {t: checkpoint.offsets[t] for t in rereading}
            log.info(
                "partition %d: re-reading from %s to rebuild open impressions (was at %s)",
                partition,
                seek,
                checkpoint.offsets,
            )
        return seek

    def checkpointable(self, partition: int, offsets: Mapping[str, int]) -> bool:
        """Not while re-reading below the restored checkpoint.

        The restored state says what was emitted below the restored offsets; a
        checkpoint taken while re-reading below them would lose that. Until a
        re-read topic has delivered a record, ``offsets`` still holds the
        restored checkpoint's offsets although nothing was re-read (a rebalance
        right after the restore revokes the partition before its first poll),
        so reaching them counts only after a delivery. The re-read starts at a
        record the join applied, so that delivery always comes.
        """
        target = self._rebuilding.get(partition)
        if target is None:
            return True
        if all(
            (partition, topic) in self._delivered and offsets.get(topic, 0) >= offset
            for topic, offset in target.items()
        ):
            del self._rebuilding[partition]
            return True
        return False

    def revoke(self, partition: int) -> None:
        self._rebuilding.pop(partition, None)
        self.joins.pop(partition, None)
        for topic in self.streams:
            self._last_input.pop((partition, topic), None)
            self._delivered.discard((partition, topic))
        self._last_control.pop(partition, None)


class JoinerRuntime(ConsumerRuntime):
    """The consumer runtime, refusing inputs that are not co-partitioned.

    It reads the rewards topic only when the processor's reward rule is graded.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        processor = self.processor
        if isinstance(processor, JoinProcessor) and not processor.rule.graded:
            self.inputs.pop(self.topics.rewards, None)

    def open(self) -> None:
        """Learn the input topics' partition counts, then refuse a mismatch.

        :meth:`ConsumerRuntime.open` subscribes, but the group is only joined at
        the first poll, so refusing here assigns nothing and moves nothing.
        """
        super().open()
        try:
            check_copartitioned(
                self.partition_counts, self.topics, rewards=self.topics.rewards in self.inputs
            )
        except PartitionMismatch:
            self.close()
            raise


SPEC = ServiceSpec(
    name="joiner",
    settings=JoinerSettings,
    inputs=lambda topics: {
        topics.impressions: decode_impression,
        topics.clicks: decode_click,
        topics.rewards: decode_reward,
    },
    make_processor=lambda wiring: JoinProcessor(wiring.settings, wiring.topics, wiring.registry),
    # Small fetches make each poll carry both topics of a partition.
    kafka_defaults=lambda settings: {
        "max_partition_fetch_bytes": settings.max_partition_fetch_bytes
    },
    runtime_class=JoinerRuntime,
)


def main() -> int:
    return run_service(SPEC)


if __name__ == "__main__":
    raise SystemExit(main())
