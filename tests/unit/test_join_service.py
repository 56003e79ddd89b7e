"""The joiner's processor without Kafka: record timestamps, idle markers, checkpoints."""

from __future__ import annotations

import time

import msgspec
import pytest
from prometheus_client import CollectorRegistry

from contracts.control import decode_watermark
from contracts.events import (
    Click,
    Feedback,
    Impression,
    SlateItem,
    decode_feedback,
    encode,
)
from services.common import Checkpoint, Record, TopicSettings
from services.joiner.service import (
    MAX_POLICY_LABELS,
    JoinerMetrics,
    JoinerSettings,
    JoinProcessor,
    PartitionMismatch,
    check_copartitioned,
)

T0 = 1_700_000_000.0
TOPICS = TopicSettings(impressions="imp", clicks="clk", feedback="fb", dead_letter="dlq")


class Outputs:
    """What a processor emits, in place of the runtime's context."""

    def __init__(self) -> None:
        self.feedback: list[Feedback] = []
        self.controls: list[tuple[str, int, bytes]] = []

    def emit(self, topic: str, value: bytes, *, key: bytes | None, source_partition: int) -> None:
        self.feedback.append(decode_feedback(value))

    def emit_control(self, topic: str, partition: int, value: bytes) -> None:
        self.controls.append((topic, partition, value))


def impression(rid: str, ts: float, user: str = "u1") -> Impression:
    slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate("ab")]
    return Impression(request_id=rid, user_id=user, ts=ts, policy="linucb", slate=slate)


def click(eid: str, item: str, ts: float, rid: str, user: str = "u1") -> Click:
    return Click(event_id=eid, user_id=user, item_id=item, ts=ts, request_id=rid)


def record(topic: str, offset: int, event: Impression | Click, written_at: float) -> Record:
    """A record as the runtime hands it over; ``written_at`` is its Kafka timestamp."""
    raw = encode(event)
    return Record(topic, 0, offset, event.user_id.encode(), event, int(written_at * 1000), raw)


def processor(registry: CollectorRegistry | None = None, **settings) -> JoinProcessor:
    settings = {"window_s": 30, "lateness_s": 5, **settings}
    joiner = JoinProcessor(JoinerSettings(**settings), TOPICS, registry or CollectorRegistry())
    joiner.restore(0, None)
    return joiner


def test_events_an_hour_ahead_do_not_close_everyone_elses_windows():
    registry = CollectorRegistry()
    joiner, out = processor(registry), Outputs()
    # A client whose clock is an hour ahead (the contracts accept up to an hour).
    joiner.apply(
        [
            record("imp", 0, impression("bad", T0 + 3600, user="u9"), T0),
            record("clk", 0, click("cb", "a", T0 + 3600, "bad", user="u9"), T0),
        ],
        out,
    )
    joiner.apply(
        [record("imp", 1, impression("r1", T0 + 1), T0 + 1)]
        + [record("clk", 1, click("c1", "a", T0 + 5, "r1"), T0 + 5)],
        out,
    )
    assert out.feedback == [], "r1 closed at once: the watermark jumped an hour"
    joiner.apply(
        [
            record("imp", 2, impression("r2", T0 + 40, user="u2"), T0 + 40),
            record("clk", 2, click("c2", "b", T0 + 40, "r2", user="u2"), T0 + 40),
        ],
        out,
    )
    assert {(f.request_id, f.item_id): f.reward for f in out.feedback} == {
        ("r1", "a"): 1,
        ("r1", "b"): 0,
    }
    counted = "streamrec_joiner_event_time_out_of_bounds_total"
    for topic in ("imp", "clk"):
        assert registry.get_sample_value(counted, {"topic": topic, "reason": "future"}) == 1


def test_an_event_time_far_behind_its_record_is_counted_and_kept():
    registry = CollectorRegistry()
    joiner, out = processor(registry), Outputs()
    joiner.apply([record("imp", 0, impression("r1", T0), T0 + 600)], out)
    assert joiner.joins[0].open["r1"].impression.ts == T0
    counted = "streamrec_joiner_event_time_out_of_bounds_total"
    assert registry.get_sample_value(counted, {"topic": "imp", "reason": "past"}) == 1


def test_idle_markers_follow_the_log_not_this_process_wall_clock():
    joiner, out = processor(idle_close_s=0.05), Outputs()
    written = 1_600_000_000.0  # the producers' clocks: what the log says the time is
    joiner.apply([record("imp", 0, impression("r1", written), written)], out)
    time.sleep(0.1)
    joiner.tick(written + 3600, out)  # this process's wall clock runs an hour ahead
    marks = [decode_watermark(value).watermark for _, _, value in out.controls]
    assert len(marks) == 2 and all(written - 5 < m < written + 1 - 5 for m in marks), marks


def test_no_marker_before_any_record_was_read():
    joiner, out = processor(idle_close_s=0.01), Outputs()
    time.sleep(0.02)
    joiner.tick(T0, out)
    assert out.controls == []


def test_a_checkpoint_records_where_and_with_what_progress_to_re_read():
    first = processor(retry_horizon_s=0)
    first.apply(
        [
            record("imp", 0, impression("r0", T0), T0),
            record("imp", 1, impression("r1", T0 + 40, user="u2"), T0 + 40),
            record("clk", 0, click("c1", "a", T0 + 40, "r1", user="u2"), T0 + 40),
        ],
        Outputs(),
    )
    state = msgspec.json.decode(first.snapshot(0))
    # r0 closed and was forgotten: the re-read starts at r1, with r0's progress.
    assert state["replay_from"] == {"imp": 1, "clk": 0}
    assert state["replay_progress"] == {"imp": T0, "clk": 0.0}

    restored = processor(retry_horizon_s=0)
    checkpoint = Checkpoint(offsets={"imp": 2, "clk": 1}, state=first.snapshot(0))
    assert restored.restore(0, checkpoint) == {"imp": 1, "clk": 0}
    join = restored.joins[0]
    assert (join.seen_impressions, join.seen_clicks) == (T0, 0.0)


def test_a_checkpoint_written_before_replay_progress_existed_still_restores():
    old = msgspec.json.encode(
        {"seen_impressions": T0 + 10, "seen_clicks": T0 + 9, "replay_from": {"imp": 3, "clk": 2}}
    )
    joiner = processor()
    seek = joiner.restore(0, Checkpoint(offsets={"imp": 5, "clk": 4}, state=old))
    assert seek == {"imp": 3, "clk": 2}
    join = joiner.joins[0]
    assert (join.seen_impressions, join.seen_clicks) == (0.0, 0.0)  # as before: afresh


def test_inputs_with_different_partition_counts_are_refused():
    check_copartitioned({"imp": 4, "clk": 4}, TOPICS)
    with pytest.raises(
        PartitionMismatch, match=r"'imp' \(4 partitions\) and 'clk' \(2 partitions\)"
    ):
        check_copartitioned({"imp": 4, "clk": 2}, TOPICS)


def test_a_partition_revoked_before_its_re_read_began_is_not_checkpointed():
    """A rebalance right after a restore revokes the partition before its first poll:
    the runtime's offsets are still the restored checkpoint's, but nothing was
    re-read, and checkpointing the empty join there would lose every open impression
    (seen in the joiner SIGKILL test: one partition's feedback never came)."""
    events = [
        record("imp", 0, impression("r0", T0), T0),
        record("clk", 0, click("c0", "a", T0 + 1, "r0"), T0 + 1),
    ]
    first = processor()
    first.apply(events, Outputs())
    checkpoint = Checkpoint(offsets={"imp": 1, "clk": 1}, state=first.snapshot(0))
    restored = processor()
    assert restored.restore(0, checkpoint) == {"imp": 0, "clk": 0}
    assert not restored.checkpointable(0, checkpoint.offsets)
    restored.apply(events[:1], Outputs())
    assert not restored.checkpointable(0, checkpoint.offsets), "the clicks are not re-read yet"
    restored.apply(events[1:], Outputs())
    assert restored.checkpointable(0, checkpoint.offsets)


def test_per_policy_series_name_a_bounded_number_of_policies() -> None:
    metrics = JoinerMetrics(CollectorRegistry())
    labels = [metrics.policy_label(f"p{i}") for i in range(MAX_POLICY_LABELS + 3)]
    assert labels[:MAX_POLICY_LABELS] == [f"p{i}" for i in range(MAX_POLICY_LABELS)]
    assert labels[MAX_POLICY_LABELS:] == ["other"] * 3
    assert metrics.policy_label("p0") == "p0", "a name seen before keeps its label"
