"""Reward attribution: join impressions and clicks of one partition into feedback.

Pure logic, no Kafka or Redis. An impression stays open until the partition's
event-time watermark passes ``impression.ts + window_s + lateness_s``; then one
:class:`Feedback` per shown item is emitted, reward 1 if that item was clicked
within ``window_s`` of the impression.

The watermark is the smaller of the two streams' progress (the largest event
time seen among impressions, and among clicks): a window closes only once the
click stream itself has moved past it, however far ahead the impressions were
read. Windows close record by record, in the order of their close keys, so the
output depends only on each topic's order in the log, not on how the two topics
were interleaved or batched, provided each topic is in event-time order up to
``lateness_s``. Every rule below keeps that property:

* **Event time** is bounded by the record's timestamp (:func:`bound_time`): at
  most ``max_skew_s`` ahead of it, so one client with a clock an hour ahead
  moves the watermark by ``max_skew_s`` at most, not by an hour.
* **Duplicates**: an impression's ``request_id`` is remembered for
  ``horizon = window_s + lateness_s + retry_horizon_s`` after it arrived (in
  the impression stream's own progress), at most ``max_remembered`` of them
  (oldest first out, counted): a retry arriving after its original's window
  closed is dropped, not joined again with reward 0. Clicks with a
  ``request_id`` wait for their impression for the same horizon. A click's
  ``event_id`` is remembered for ``window_s + lateness_s`` after it arrived: a
  later copy is out of order, and an out-of-order click can reward nothing
  twice (an impression rewards each item once, and a click without request id
  that is out of order is not matched), so a longer memory would only change
  which counter it lands in.
* **Late impressions** (their window already over in the impression stream's
  own time) are still joined with the clicks waiting for them; their close is
  keyed by the impression stream's progress, so it lands in the same place
  whatever the interleaving.
* **Clicks without a request id** go to the user's latest open impression that
  showed the item, at or before the click, and whose window holds it: one
  bisection of the user's index sorted by (item, time), once the impression
  stream has passed ``click.ts + lateness_s`` (so every candidate has been read,
  however the topics interleave). Closing removes an impression's entries by
  bisection too; no list of the user's impressions is scanned.
* **Per-user bound**: a user with more than ``max_open_per_user`` impressions in
  their windows (by the impression stream's time) has the oldest closed early:
  its window ends at the current impression progress minus ``lateness_s`` and
  its feedback is emitted when the watermark reaches that progress (counted as
  ``impressions_closed_early``).

Restore: :meth:`PartitionJoin.replay_marks` says from which offset (and with
which progress) each topic must be re-read to rebuild this state exactly,
including the remembered ids; :meth:`PartitionJoin.resume_after` restores the
checkpointed progress, and closes that were emitted before the checkpoint are
rebuilt silently.

>>> from contracts.events import Click, Impression, SlateItem
>>> join = PartitionJoin(window_s=30, lateness_s=5)
>>> slate = [SlateItem(item_id="a", position=0, propensity=1.0)]
>>> join.impression(Impression(request_id="r", user_id="u", ts=1e9, policy="p", slate=slate), 0)
[]
>>> join.click(Click(event_id="c", user_id="u", item_id="a", ts=1e9 + 3, request_id="r"), 0)
[]
>>> [(f.item_id, f.reward) for f in join.advance(1e9 + 40)]  # a watermark for both streams
[('a', 1.0)]

**Graded rewards** (a :class:`~services.common.rewards.RewardRule` with kinds besides
clicks): :class:`Reward` events are a third stream, joined like clicks that carry a
request id: attached to their open impression (or waiting for it for the horizon),
counted only within the window, their ids remembered to drop duplicates, and the
rewards stream's progress is part of the watermark. At close each shown item's
signals (clicks as kind ``click`` with value 1, every reward kind at its largest
value) are combined by the rule into the feedback's ``reward``; ``signals`` holds
the parts. A signal that comes after its impression closed, or outside the window,
is counted late (``rewards_late``), like a late click.
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left, bisect_right, insort
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Literal, NamedTuple, TypeVar

import msgspec

from contracts.events import Click, Feedback, Impression, Reward, feedback_id
from services.common.rewards import CLICK, RewardRule
from services.joiner.clock import bound_time

#: A retry of a produce that timed out can land this long after its original: the
#: producer keeps retrying for ``KAFKA_DELIVERY_TIMEOUT_MS`` (120 s) after the gateway
#: answered 503 at its 30 s produce timeout, and the client resends meanwhile.
DEFAULT_RETRY_HORIZON_S = 180.0
#: A person sees a slate every few seconds: 1,000 open impressions is a bot or a loop.
DEFAULT_MAX_OPEN_PER_USER = 1_000
#: Remembered ids per stream and partition (about 300 bytes each): the horizon's worth
#: at 460 events/s per partition and stream.
DEFAULT_MAX_REMEMBERED = 100_000
#: How far an event time may run ahead of its record's timestamp before it is clamped,
#: so how far one client can move the watermark ahead of the log: clocks are within a
#: second of each other under NTP, and producers that stamp events before writing them
#: (a batch sent after it was built) stay well inside.
DEFAULT_MAX_SKEW_S = 15.0

#: Close keys: a window's own end (ties by request id, then offset), or a close the
#: impression stream scheduled at its current progress (late impressions, the
#: per-user bound; ties by offsets), which sorts after window ends of the same time.
WINDOW = 0
STREAM = 1
CloseKey = tuple[float, int, tuple[str, int] | tuple[int, int]]
#: user_id -> (item_id, ts, offset) for each item each open impression showed, sorted:
#: one list per user, of plain tuples the garbage collector does not track.
Index = dict[str, list[tuple[str, float, int]]]
Stream = Literal["impressions", "clicks", "rewards"]
EventT = TypeVar("EventT", Impression, Click, Reward)


class Mark(NamedTuple):
    """Where a piece of state starts in its topic: the record's offset, and the
    stream's progress just before it (restored when re-reading from there)."""

    offset: int
    progress: float


class Pin(NamedTuple):
    """A remembered id that dropped a duplicate at offset ``hit`` and is gone now.

    A re-read starting between its record and ``hit`` would not know the id and
    would accept the duplicate the first run dropped, so while ``hit`` is at or
    after the replay start, the replay must start at ``mark``.
    """

    mark: Mark
    hit: int


class Remembered:
    """Ids accepted from one stream, until its progress passes each id's expiry.

    Bounded: above ``cap`` the oldest by offset are evicted (counted in
    ``stats[stat]``). Evicting by offset keeps a re-read exact: ids from before
    the replay start are the oldest, so the first run evicts them first and the
    re-read, which never had them, keeps the same later ids. Marks are kept as
    plain tuples, which the garbage collector does not track.
    """

    def __init__(self, cap: int, stats: Counter[str], stat: str) -> None:
        self.cap = cap
        self._stats = stats
        self._stat = stat
        #: key -> (offset, progress) of its mark: a plain tuple, untracked by the GC.
        self._entries: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._expiry: list[tuple[float, int, str]] = []
        self._hits: dict[str, int] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, expires: float, mark: Mark) -> list[Pin]:
        """Remember ``key`` until progress reaches ``expires``; returns pins of evictions."""
        self._entries[key] = (mark.offset, mark.progress)
        heapq.heappush(self._expiry, (expires, mark.offset, key))
        pins: list[Pin] = []
        while len(self._entries) > self.cap:
            old, old_mark = self._entries.popitem(last=False)
            self._stats[self._stat] += 1
            pins += self._release(old, Mark(*old_mark))
        return pins

    def hit(self, key: str, offset: int) -> None:
        """``key`` dropped a duplicate read at ``offset``."""
        self._hits[key] = offset

    def expire(self, progress: float) -> list[Pin]:
        """Forget ids whose expiry ``progress`` has reached; returns their pins."""
        pins: list[Pin] = []
        while self._expiry and self._expiry[0][0] <= progress:
            _, offset, key = heapq.heappop(self._expiry)
            mark = self._entries.get(key)
            if mark is not None and mark[0] == offset:
                del self._entries[key]
                pins += self._release(key, Mark(*mark))
        return pins

    def first(self) -> Mark | None:
        """The mark of the oldest remembered id."""
        first = next(iter(self._entries.values()), None)
        return None if first is None else Mark(*first)

    def _release(self, key: str, mark: Mark) -> list[Pin]:
        hit = self._hits.pop(key, None)
        return [] if hit is None else [Pin(mark, hit)]


@dataclass(slots=True, eq=False)
class OpenImpression:
    impression: Impression
    mark: Mark
    #: The impression stream's progress once this impression was read.
    progress: float
    key: CloseKey
    #: Offset of the impression record whose reading scheduled ``key`` (this one's own,
    #: or the one that made its user exceed the bound).
    scheduled_by: int
    #: Clicks after this event time are not rewarded (``ts + window_s``, or earlier
    #: if the per-user bound closed it early).
    window_end: float
    #: The item ids shown.
    items: tuple[str, ...]
    #: In its user's index (read in order, so clicks without request id can find it).
    indexed: bool
    #: Its window was cut short by the per-user bound (it moved to the index of such).
    cut: bool = False
    #: item_id -> the clicks attached (None until the first).
    clicks: dict[str, list[PendingClick]] | None = None
    #: The earliest click attached to this impression (for replay on restore).
    click_mark: Mark | None = None
    #: item_id -> the reward events attached (None until the first).
    rewards: dict[str, list[PendingReward]] | None = None
    #: The earliest reward event attached to this impression (for replay on restore).
    reward_mark: Mark | None = None


class PendingClick(NamedTuple):
    click: Click
    mark: Mark
    #: The impression stream's progress at which it stops waiting for its impression.
    expires: float


class PendingReward(NamedTuple):
    reward: Reward
    mark: Mark
    #: The impression stream's progress at which it stops waiting for its impression.
    expires: float


class PartitionJoin:
    """The open impressions, waiting clicks and remembered ids of one partition."""

    def __init__(
        self,
        *,
        window_s: float,
        lateness_s: float,
        retry_horizon_s: float = DEFAULT_RETRY_HORIZON_S,
        max_open_per_user: int = DEFAULT_MAX_OPEN_PER_USER,
        max_remembered: int = DEFAULT_MAX_REMEMBERED,
        max_skew_s: float = DEFAULT_MAX_SKEW_S,
        rule: RewardRule | None = None,
    ) -> None:
        self.window_s = window_s
        #: How signals combine into a reward; graded rules add the rewards stream.
        self.rule = rule or RewardRule()
        self.graded = self.rule.graded
        self.lateness_s = lateness_s
        #: How long after arriving (in the impression stream's time) an impression id is
        #: remembered and a click waits for its impression.
        self.horizon_s = window_s + lateness_s + retry_horizon_s
        self.max_open_per_user = max_open_per_user
        self.max_skew_s = max_skew_s
        #: Largest event time seen among impressions and among clicks (0: none yet).
        self.seen_impressions = 0.0
        self.seen_clicks = 0.0
        self.seen_rewards = 0.0
        #: request_id -> its open impression (the latest, if a duplicate came past the
        #: horizon while the first was still open).
        self.open: dict[str, OpenImpression] = {}
        #: offset -> every open impression. The heaps and indexes hold offsets in plain
        #: tuples, which the cyclic garbage collector stops tracking; tuples pointing
        #: at impressions made it walk every open impression's containers over and
        #: over (two thirds of the time per impression, measured).
        self._live: dict[int, OpenImpression] = {}
        self._closing: list[CloseKey] = []
        #: Open impressions for clicks without request id: windows intact, and windows
        #: the per-user bound cut short (kept apart so that lookups stay O(log n)).
        self._uncut: Index = {}
        self._cut: Index = {}
        #: user_id -> offsets of impressions still in their window by the impression
        #: stream's time, oldest first (the per-user bound).
        self._counted: dict[str, OrderedDict[int, None]] = {}
        self._counted_expiry: list[tuple[float, int, str]] = []
        self.stats: Counter[str] = Counter()
        self._impression_ids = Remembered(max_remembered, self.stats, "evicted_impressions")
        self._click_ids = Remembered(max_remembered, self.stats, "evicted_clicks")
        self._reward_ids = Remembered(max_remembered, self.stats, "evicted_rewards")
        self._pins: dict[Stream, list[Pin]] = {"impressions": [], "clicks": [], "rewards": []}
        #: request_id -> clicks seen before their impression.
        self.pending: dict[str, list[PendingClick]] = {}
        self._pending_expiry: list[tuple[float, int, str]] = []
        #: request_id -> reward events seen before their impression.
        self.pending_rewards: dict[str, list[PendingReward]] = {}
        self._pending_reward_expiry: list[tuple[float, int, str]] = []
        #: Clicks without request id, until the impression stream passes ts + lateness.
        self._waiting: list[tuple[float, int, PendingClick]] = []
        self._emitted_through = float("-inf")
        self._emitted_below_offset = 0

    @property
    def watermark(self) -> float:
        """Event time every stream has passed (the rewards stream only if graded)."""
        if self.graded:
            return min(self.seen_impressions, self.seen_clicks, self.seen_rewards)
        return min(self.seen_impressions, self.seen_clicks)

    def resume_after(
        self,
        seen_impressions: float,
        seen_clicks: float,
        impressions_offset: int,
        *,
        rereading_impressions: bool,
        rereading_clicks: bool,
        impressions_progress: float = 0.0,
        clicks_progress: float = 0.0,
        seen_rewards: float = 0.0,
        rereading_rewards: bool = False,
        rewards_progress: float = 0.0,
    ) -> None:
        """Restore from a checkpoint taken after ``impressions_offset``.

        Closes scheduled by impressions read before the checkpoint and due by its
        watermark were emitted then; re-reading rebuilds them silently. A stream
        re-read from below the checkpoint restarts at the progress it had where
        the re-read starts (``*_progress``, from :meth:`replay_marks`; 0 for
        checkpoints that predate it), so every record sees the progress it saw
        the first time: with the checkpointed progress, re-read impressions would
        close before the re-read clicks reach them.
        """
        self.seen_impressions, self.seen_clicks = seen_impressions, seen_clicks
        self.seen_rewards = seen_rewards
        self._emitted_through = self.watermark
        self._emitted_below_offset = impressions_offset
        self.seen_impressions = impressions_progress if rereading_impressions else seen_impressions
        self.seen_clicks = clicks_progress if rereading_clicks else seen_clicks
        self.seen_rewards = rewards_progress if rereading_rewards else seen_rewards

    # -- input -----------------------------------------------------------------

    def impression(
        self, impression: Impression, offset: int, received: float | None = None
    ) -> list[Feedback]:
        """Open an impression (unless it is a duplicate); returns what closes.

        ``received`` is the record's timestamp in seconds (None: trust ``ts``).
        """
        impression, arrived = self._bounded(impression, received, "impressions")
        mark = Mark(offset, self.seen_impressions)
        self.seen_impressions = max(self.seen_impressions, impression.ts)
        self._impressions_progressed()
        request_id = impression.request_id
        # Decided on the impression stream alone: whether the original is still open
        # depends on the clicks' progress, so it must not decide.
        if request_id in self._impression_ids:
            self._impression_ids.hit(request_id, offset)
            self.stats["impressions_duplicate"] += 1
        else:
            self._open(impression, mark, arrived + self.horizon_s)
        self._resolve_waiting()
        return self._close_due()

    def click(self, click: Click, offset: int, received: float | None = None) -> list[Feedback]:
        """Attribute a click (unless it is a duplicate); returns what closes."""
        click, arrived = self._bounded(click, received, "clicks")
        mark = Mark(offset, self.seen_clicks)
        self.seen_clicks = max(self.seen_clicks, click.ts)
        self._pin("clicks", self._click_ids.expire(self.seen_clicks))
        if click.event_id in self._click_ids:
            self._click_ids.hit(click.event_id, offset)
            self.stats["clicks_duplicate"] += 1
            return self._close_due()
        forget_at = arrived + self.window_s + self.lateness_s
        self._pin("clicks", self._click_ids.add(click.event_id, forget_at, mark))
        request_id = click.request_id
        expires = arrived + self.horizon_s
        pending = PendingClick(click, mark, expires)
        if request_id is None:
            if click.ts + self.lateness_s <= mark.progress:
                # Later than the lateness allows: which impressions are still open
                # for it would depend on the interleaving (decisions §6: not rewarded).
                self.stats["clicks_late"] += 1
            elif click.ts + self.lateness_s <= self.seen_impressions:
                self._match_by_item(pending)
            else:
                heapq.heappush(self._waiting, (click.ts + self.lateness_s, offset, pending))
        elif (entry := self.open.get(request_id)) is not None:
            self._attach(entry, pending)
        elif request_id in self._impression_ids:
            self.stats["clicks_late"] += 1  # its impression has closed already
        else:
            # Its impression may still arrive (clicks and impressions travel separately).
            self.pending.setdefault(request_id, []).append(pending)
            heapq.heappush(self._pending_expiry, (expires, offset, request_id))
        return self._close_due()

    def reward(self, reward: Reward, offset: int, received: float | None = None) -> list[Feedback]:
        """Attribute a graded reward event (unless it is a duplicate); returns what closes.

        Only for a graded rule (the caller reads the rewards stream only then).
        """
        reward, arrived = self._bounded(reward, received, "rewards")
        mark = Mark(offset, self.seen_rewards)
        self.seen_rewards = max(self.seen_rewards, reward.ts)
        self._pin("rewards", self._reward_ids.expire(self.seen_rewards))
        if reward.event_id in self._reward_ids:
            self._reward_ids.hit(reward.event_id, offset)
            self.stats["rewards_duplicate"] += 1
            return self._close_due()
        forget_at = arrived + self.window_s + self.lateness_s
        self._pin("rewards", self._reward_ids.add(reward.event_id, forget_at, mark))
        expires = arrived + self.horizon_s
        pending = PendingReward(reward, mark, expires)
        request_id = reward.request_id
        if (entry := self.open.get(request_id)) is not None:
            self._attach_reward(entry, pending)
        elif request_id in self._impression_ids:
            self.stats["rewards_late"] += 1  # its impression has closed already
        else:
            self.pending_rewards.setdefault(request_id, []).append(pending)
            heapq.heappush(self._pending_reward_expiry, (expires, offset, request_id))
        return self._close_due()

    def advance(
        self,
        event_time: float,
        *,
        impressions: bool = True,
        clicks: bool = True,
        rewards: bool = True,
    ) -> list[Feedback]:
        """Declare streams complete up to ``event_time`` (an idle marker)."""
        if impressions:
            self.seen_impressions = max(self.seen_impressions, event_time)
            self._impressions_progressed()
            self._resolve_waiting()
        if clicks:
            self.seen_clicks = max(self.seen_clicks, event_time)
            self._pin("clicks", self._click_ids.expire(self.seen_clicks))
        if rewards:
            self.seen_rewards = max(self.seen_rewards, event_time)
            self._pin("rewards", self._reward_ids.expire(self.seen_rewards))
        return self._close_due()

    # -- restore ---------------------------------------------------------------

    def replay_marks(self) -> tuple[Mark | None, Mark | None]:
        """Where to re-read impressions and clicks from to rebuild this state exactly.

        Covers open impressions, waiting clicks, remembered ids and the pins of
        forgotten ids that dropped a duplicate after that point. Forgets pins no
        replay can need any more (the marks only ever move forward).
        """
        entries = self._live.values()
        impressions = [entry.mark for entry in entries]
        clicks = [e.click_mark for e in entries if e.click_mark is not None]
        clicks += [p.mark for waiting in self.pending.values() for p in waiting]
        clicks += [pending.mark for _, _, pending in self._waiting]
        for marks, remembered in ((impressions, self._impression_ids), (clicks, self._click_ids)):
            if (first := remembered.first()) is not None:
                marks.append(first)
        return self._replay_mark("impressions", impressions), self._replay_mark("clicks", clicks)

    def reward_replay_mark(self) -> Mark | None:
        """Where to re-read the rewards stream from to rebuild this state exactly."""
        marks = [e.reward_mark for e in self._live.values() if e.reward_mark is not None]
        marks += [p.mark for waiting in self.pending_rewards.values() for p in waiting]
        if (first := self._reward_ids.first()) is not None:
            marks.append(first)
        return self._replay_mark("rewards", marks)

    def replay_from(self) -> tuple[int | None, int | None]:
        """Earliest impression and click offsets still needed to rebuild this state."""
        impressions, clicks = self.replay_marks()
        return (
            None if impressions is None else impressions.offset,
            None if clicks is None else clicks.offset,
        )

    def remembered(self) -> tuple[int, int]:
        """How many impression and click ids are remembered (for the metrics)."""
        return len(self._impression_ids), len(self._click_ids)

    def remembered_rewards(self) -> int:
        """How many reward event ids are remembered (for the metrics)."""
        return len(self._reward_ids)

    # -- internals -------------------------------------------------------------

    def _bounded(
        self, event: EventT, received: float | None, stream: Stream
    ) -> tuple[EventT, float]:
        """The event with its time bounded, and when it arrived: the later of its time
        and its record's timestamp (horizons count from there, so an original that
        came late itself is remembered as long as one that came on time)."""
        ts, reason = bound_time(event.ts, received, self.max_skew_s)
        if reason is not None:
            self.stats[f"time_{reason}_{stream}"] += 1
        if ts != event.ts:
            event = msgspec.structs.replace(event, ts=ts)
        return event, ts if received is None else max(ts, received)

    def _pin(self, stream: Stream, pins: list[Pin]) -> None:
        self._pins[stream] += pins

    def _replay_mark(self, stream: Stream, marks: list[Mark]) -> Mark | None:
        start = min(marks, key=lambda mark: mark.offset, default=None)
        pins = self._pins[stream]
        if start is None:
            # Nothing to re-read: the replay starts at the checkpoint, after every hit.
            self._pins[stream] = []
            return None
        moved = True
        while moved:
            moved = False
            for pin in pins:
                if pin.hit >= start.offset > pin.mark.offset:
                    start, moved = pin.mark, True
        self._pins[stream] = [pin for pin in pins if pin.hit >= start.offset]
        return start

    def _impressions_progressed(self) -> None:
        """Forget what the impression stream's progress has passed."""
        progress = self.seen_impressions
        self._pin("impressions", self._impression_ids.expire(progress))
        while self._counted_expiry and self._counted_expiry[0][0] <= progress:
            _, offset, user = heapq.heappop(self._counted_expiry)
            self._uncount(user, offset)
        while self._pending_expiry and self._pending_expiry[0][0] <= progress:
            _, offset, request_id = heapq.heappop(self._pending_expiry)
            waiting = self.pending.get(request_id)
            if waiting is None:
                continue
            kept = [p for p in waiting if p.mark.offset != offset]
            self.stats["clicks_unmatched"] += len(waiting) - len(kept)
            if kept:
                self.pending[request_id] = kept
            else:
                del self.pending[request_id]
        while self._pending_reward_expiry and self._pending_reward_expiry[0][0] <= progress:
            _, offset, request_id = heapq.heappop(self._pending_reward_expiry)
            rewards = self.pending_rewards.get(request_id)
            if rewards is None:
                continue
            still = [p for p in rewards if p.mark.offset != offset]
            self.stats["rewards_unmatched"] += len(rewards) - len(still)
            if still:
                self.pending_rewards[request_id] = still
            else:
                del self.pending_rewards[request_id]

    def _resolve_waiting(self) -> None:
        """Match the clicks without request id whose candidates have all been read."""
        while self._waiting and self._waiting[0][0] <= self.seen_impressions:
            _, _, pending = heapq.heappop(self._waiting)
            self._match_by_item(pending)

    def _open(self, impression: Impression, mark: Mark, expires: float) -> None:
        request_id = impression.request_id
        progress = self.seen_impressions
        close_at = impression.ts + self.window_s + self.lateness_s
        key: CloseKey
        if close_at <= progress:
            # Late: keyed by the impression stream, so it closes at the same place in
            # the output however the clicks interleave (with the clicks waiting for it).
            key = (progress, STREAM, (mark.offset, mark.offset))
            self.stats["impressions_late"] += 1
        else:
            key = (close_at, WINDOW, (request_id, mark.offset))
        entry = OpenImpression(
            impression=impression,
            mark=mark,
            progress=progress,
            key=key,
            scheduled_by=mark.offset,
            window_end=impression.ts + self.window_s,
            items=tuple(item.item_id for item in impression.slate),
            indexed=impression.ts > mark.progress - self.lateness_s,
        )
        self.open[request_id] = entry
        self._live[mark.offset] = entry
        heapq.heappush(self._closing, key)
        self._pin(
            "impressions",
            self._impression_ids.add(request_id, expires, mark),
        )
        if entry.indexed:
            for item_id in entry.items:
                _index_add(self._uncut, item_id, entry)
        for pending in self.pending.pop(request_id, ()):
            self._attach(entry, pending)
        for reward in self.pending_rewards.pop(request_id, ()):
            self._attach_reward(entry, reward)
        if key[1] == WINDOW:
            self._count(entry, close_at)

    def _count(self, entry: OpenImpression, close_at: float) -> None:
        """Count an impression against its user's bound; close the oldest early above it."""
        user = entry.impression.user_id
        counted = self._counted.setdefault(user, OrderedDict())
        counted[entry.mark.offset] = None
        heapq.heappush(self._counted_expiry, (close_at, entry.mark.offset, user))
        while len(counted) > self.max_open_per_user:
            oldest, _ = counted.popitem(last=False)
            self._close_early(self._live[oldest], trigger=entry.mark.offset)

    def _uncount(self, user: str, offset: int) -> None:
        counted = self._counted.get(user)
        if counted is not None:
            counted.pop(offset, None)
            if not counted:
                del self._counted[user]

    def _close_early(self, entry: OpenImpression, *, trigger: int) -> None:
        """End ``entry``'s window now (by the impression stream) and close it there.

        Clicks up to ``progress - lateness_s`` are all read before the watermark
        reaches ``progress``, whatever the interleaving; later ones are not
        rewarded, so the outcome does not depend on when they were read.
        """
        progress = self.seen_impressions
        entry.window_end = min(entry.window_end, progress - self.lateness_s)
        if entry.indexed:
            for item_id in entry.items:
                _index_remove(self._uncut, item_id, entry)
                _index_add(self._cut, item_id, entry)
            entry.cut = True
        entry.key = (progress, STREAM, (trigger, entry.mark.offset))
        entry.scheduled_by = trigger
        heapq.heappush(self._closing, entry.key)
        self.stats["impressions_closed_early"] += 1

    def _match_by_item(self, pending: PendingClick) -> None:
        """Attach a click without request id to the latest eligible impression.

        Eligible: same user, showed the item, at or before the click, and the
        click within its window. Every candidate has been read (the impression
        stream is past ``click.ts + lateness_s``, and impressions read later are
        out of order and not indexed), every eligible one is still open (its
        close needs the click stream past this in-order click), and ineligible
        ones are skipped whether or not they are still open: the choice does
        not depend on the interleaving. A window the per-user bound cut short
        excludes a click only if it was cut before the click could be matched.
        """
        click = pending.click
        latest = (click.item_id, click.ts, math.inf)
        uncut = self._uncut.get(click.user_id, [])
        index = bisect_right(uncut, latest)
        best = uncut[index - 1] if index and uncut[index - 1][0] == click.item_id else None
        candidates = best is not None
        if best is not None and best[1] + self.window_s < click.ts:
            best = None  # the latest one's window is over, so are all older ones'
        cut = self._cut.get(click.user_id, [])
        index = bisect_right(cut, latest)
        candidates = candidates or (index > 0 and cut[index - 1][0] == click.item_id)
        best = self._latest_cut(cut, index, latest, best) or best
        if best is not None:
            self._attach(self._live[best[2]], pending)
        else:
            self.stats["clicks_late" if candidates else "clicks_unmatched"] += 1

    def _latest_cut(
        self,
        entries: list[tuple[str, float, int]],
        index: int,
        click: tuple[str, float, float],
        floor: tuple[str, float, int] | None,
    ) -> tuple[str, float, int] | None:
        """The latest impression cut short before ``entries[index]`` that showed the
        clicked item, is later than ``floor`` and whose window holds the click.

        Windows are cut in the order impressions were read, each at the progress
        of the time, so one cut before another ends no later. An impression more
        than ``lateness_s`` older than one whose window ended before the click was
        read (and cut) before it: the walk stops there, after O(rate x lateness)
        steps at most, however many windows were cut.
        """
        item, ts, _ = click
        band = -math.inf
        while index > 0:
            index -= 1
            candidate = entries[index]
            shown, at, offset = candidate
            if shown != item or at <= band or at + self.window_s < ts:
                break
            if floor is not None and candidate < floor:
                break
            entry = self._live[offset]
            if entry.window_end >= ts:
                return candidate
            band = max(band, entry.progress - self.lateness_s)
        return None

    def _attach(self, entry: OpenImpression, pending: PendingClick) -> None:
        """Keep a click with its impression; whether it is rewarded is decided at the close."""
        click, mark = pending.click, pending.mark
        if click.item_id not in entry.items:
            self.stats["clicks_not_in_slate"] += 1
        else:
            if entry.clicks is None:
                entry.clicks = {}
            attached = entry.clicks.setdefault(click.item_id, [])
            if not self._rewards(entry, pending):
                self.stats["clicks_late"] += 1
            elif any(self._rewards(entry, other) for other in attached):
                self.stats["clicks_duplicate"] += 1
            else:
                self.stats["clicks_matched"] += 1
            attached.append(pending)
        if entry.click_mark is None or mark.offset < entry.click_mark.offset:
            entry.click_mark = mark

    def _attach_reward(self, entry: OpenImpression, pending: PendingReward) -> None:
        """Keep a reward event with its impression; whether it counts is decided at the close."""
        reward, mark = pending.reward, pending.mark
        if reward.item_id not in entry.items:
            self.stats["rewards_not_in_slate"] += 1
        else:
            if entry.rewards is None:
                entry.rewards = {}
            entry.rewards.setdefault(reward.item_id, []).append(pending)
            counts = self._in_window(entry, reward.ts, mark, pending.expires)
            self.stats["rewards_matched" if counts else "rewards_late"] += 1
        if entry.reward_mark is None or mark.offset < entry.reward_mark.offset:
            entry.reward_mark = mark

    def _signals(self, entry: OpenImpression, item_id: str, clicked: bool) -> dict[str, float]:
        """The largest value of each signal kind that counts for ``item_id`` of ``entry``."""
        signals = {CLICK: 1.0} if clicked else {}
        for pending in (entry.rewards or {}).get(item_id, ()):
            reward = pending.reward
            if self._in_window(entry, reward.ts, pending.mark, pending.expires):
                signals[reward.kind] = max(signals.get(reward.kind, 0.0), reward.value)
        return signals

    def _in_window(self, entry: OpenImpression, ts: float, mark: Mark, expires: float) -> bool:
        """Whether a signal at ``ts`` read at ``mark`` of its stream counts for ``entry``
        (see :meth:`_rewards`)."""
        return (
            entry.impression.ts - self.lateness_s <= ts <= entry.window_end
            and mark.progress < entry.key[0]
            and expires > entry.progress
        )

    def _rewards(self, entry: OpenImpression, pending: PendingClick) -> bool:
        """Whether a click rewards ``entry``.

        Decided on the click and the impression alone, never on when they met:
        within the window (which the per-user bound may have cut short), read
        before the click stream passed the impression's close (every such click
        is attached by then, whatever the interleaving; later ones may or may not
        be), and not kept waiting longer than the horizon before its impression
        came (the pending expiry).
        """
        return self._in_window(entry, pending.click.ts, pending.mark, pending.expires)

    def _clicked_at(self, entry: OpenImpression, attached: list[PendingClick]) -> float | None:
        """The earliest of the clicks on one item that reward ``entry``, if any."""
        rewarding = [p.click.ts for p in attached if self._rewards(entry, p)]
        return min(rewarding) if rewarding else None

    def _close_due(self) -> list[Feedback]:
        out: list[Feedback] = []
        watermark = self.watermark
        while self._closing and self._closing[0][0] <= watermark:
            key = heapq.heappop(self._closing)
            entry = self._live.get(key[2][1])
            if entry is not None and entry.key == key:  # else rescheduled by the bound
                out.extend(self._close(entry))
        return out

    def _close(self, entry: OpenImpression) -> list[Feedback]:
        imp = entry.impression
        del self._live[entry.mark.offset]
        if self.open.get(imp.request_id) is entry:
            del self.open[imp.request_id]
        if entry.indexed:
            index = self._cut if entry.cut else self._uncut
            for item_id in entry.items:
                _index_remove(index, item_id, entry)
        self._uncount(imp.user_id, entry.mark.offset)
        # Emitted before the checkpoint if scheduled before it and due by its watermark.
        if (
            entry.scheduled_by < self._emitted_below_offset
            and entry.key[0] <= self._emitted_through
        ):
            self.stats["impressions_rebuilt"] += 1
            return []
        out = []
        clicks = entry.clicks
        for item in imp.slate:
            attached = clicks.get(item.item_id) if clicks else None
            clicked_at = self._clicked_at(entry, attached) if attached else None
            signals = self._signals(entry, item.item_id, clicked_at is not None)
            out.append(
                Feedback(
                    feedback_id=feedback_id(imp.request_id, item.item_id),
                    request_id=imp.request_id,
                    user_id=imp.user_id,
                    item_id=item.item_id,
                    ts=imp.ts,
                    reward=self.rule.reward(signals),
                    clicked_at=clicked_at,
                    position=item.position,
                    propensity=item.propensity,
                    policy=imp.policy,
                    model_version=imp.model_version,
                    team=item.team,
                    context=imp.context,
                    item_features=item.features,
                    signals=signals,
                )
            )
        self.stats["impressions_closed"] += 1
        return out


def _index_add(index: Index, item_id: str, entry: OpenImpression) -> None:
    imp = entry.impression
    insort(index.setdefault(imp.user_id, []), (item_id, imp.ts, entry.mark.offset))


def _index_remove(index: Index, item_id: str, entry: OpenImpression) -> None:
    imp = entry.impression
    entries = index[imp.user_id]
    del entries[bisect_left(entries, (item_id, imp.ts, entry.mark.offset))]
    if not entries:
        del index[imp.user_id]
