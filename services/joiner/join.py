"""Reward attribution: join impressions and clicks of one partition into feedback.

Pure logic, no Kafka or Redis. An impression stays open until the partition's
event-time watermark passes ``impression.ts + window_s + lateness_s``; then one
:class:`Feedback` per shown item is emitted, reward 1 if that item was clicked
within ``window_s`` of the impression.

The watermark is the smaller of the two streams' progress (the largest event
time seen among impressions, and among clicks): a window closes only once the
click stream itself has moved past it, however far ahead the impressions were
read. Windows close record by record, so the output depends only on each
topic's order in the log, not on how the two topics were interleaved or
batched, provided each topic is in event-time order up to ``lateness_s``.

>>> from contracts.events import Click, Impression, SlateItem
>>> join = PartitionJoin(window_s=30, lateness_s=5)
>>> slate = [SlateItem(item_id="a", position=0, propensity=1.0)]
>>> join.impression(Impression(request_id="r", user_id="u", ts=1e9, policy="p", slate=slate), 0)
[]
>>> join.click(Click(event_id="c", user_id="u", item_id="a", ts=1e9 + 3, request_id="r"), 0)
[]
>>> [(f.item_id, f.reward) for f in join.advance(1e9 + 40)]  # a watermark for both streams
[('a', 1)]
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from contracts.events import Click, Feedback, Impression, feedback_id


@dataclass(slots=True)
class OpenImpression:
    impression: Impression
    offset: int
    #: item_id -> event time of its first click within the window.
    clicked: dict[str, float] = field(default_factory=dict)
    #: Smallest offset of a click attached to this impression (for replay on restore).
    click_offset: int | None = None


@dataclass(slots=True)
class PendingClick:
    click: Click
    offset: int


class PartitionJoin:
    """The open impressions and unmatched clicks of one partition."""

    def __init__(self, *, window_s: float, lateness_s: float) -> None:
        self.window_s = window_s
        self.lateness_s = lateness_s
        #: Largest event time seen among impressions and among clicks (0: none yet).
        self.seen_impressions = 0.0
        self.seen_clicks = 0.0
        self.open: dict[str, OpenImpression] = {}
        self._closing: list[tuple[float, str]] = []
        #: user_id -> request ids of open impressions (for clicks without request_id).
        self._by_user: dict[str, list[str]] = defaultdict(list)
        #: request_id -> clicks seen before their impression.
        self.pending: dict[str, list[PendingClick]] = defaultdict(list)
        self._pending_expiry: list[tuple[float, str]] = []
        self.stats: Counter[str] = Counter()
        self._emitted_through = float("-inf")
        self._emitted_below_offset = 0

    @property
    def watermark(self) -> float:
        """Event time both streams have passed."""
        return min(self.seen_impressions, self.seen_clicks)

    def resume_after(
        self,
        seen_impressions: float,
        seen_clicks: float,
        impressions_offset: int,
        *,
        rereading_impressions: bool,
        rereading_clicks: bool,
    ) -> None:
        """Restore from a checkpoint taken after ``impressions_offset``.

        Impressions read before the checkpoint whose window closed by its
        watermark were emitted then; re-reading them rebuilds state silently. A
        stream re-read from below the checkpoint starts its progress afresh, so
        the watermark passes only what the re-read has seen again: with the
        checkpointed progress, re-read impressions would close before the
        re-read clicks reach them.
        """
        self._emitted_through = min(seen_impressions, seen_clicks)
        self._emitted_below_offset = impressions_offset
        self.seen_impressions = 0.0 if rereading_impressions else seen_impressions
        self.seen_clicks = 0.0 if rereading_clicks else seen_clicks

    # -- input -----------------------------------------------------------------

    def impression(self, impression: Impression, offset: int) -> list[Feedback]:
        """Open an impression (if it is not a duplicate); returns what closes."""
        self.seen_impressions = max(self.seen_impressions, impression.ts)
        if impression.request_id in self.open:
            self.stats["duplicate_impressions"] += 1
            return self._close_due()
        entry = OpenImpression(impression, offset)
        self.open[impression.request_id] = entry
        self._by_user[impression.user_id].append(impression.request_id)
        heapq.heappush(self._closing, (self._close_time(impression), impression.request_id))
        for pending in self.pending.pop(impression.request_id, []):
            self._attach(entry, pending.click, pending.offset)
        return self._close_due()

    def click(self, click: Click, offset: int) -> list[Feedback]:
        """Attribute a click to its open impression; returns what closes."""
        self.seen_clicks = max(self.seen_clicks, click.ts)
        entry = self._find(click)
        if entry is not None:
            self._attach(entry, click, offset)
        elif click.request_id is not None and self._expiry(click) > self.watermark:
            # Its impression may still arrive (clicks and impressions travel separately).
            self.pending[click.request_id].append(PendingClick(click, offset))
            heapq.heappush(self._pending_expiry, (self._expiry(click), click.request_id))
        else:
            self.stats["clicks_unmatched"] += 1
        return self._close_due()

    def advance(
        self, event_time: float, *, impressions: bool = True, clicks: bool = True
    ) -> list[Feedback]:
        """Declare a stream (or both) complete up to ``event_time`` (an idle marker)."""
        if impressions:
            self.seen_impressions = max(self.seen_impressions, event_time)
        if clicks:
            self.seen_clicks = max(self.seen_clicks, event_time)
        return self._close_due()

    def _close_due(self) -> list[Feedback]:
        out: list[Feedback] = []
        while self._closing and self._closing[0][0] <= self.watermark:
            _, request_id = heapq.heappop(self._closing)
            entry = self.open.pop(request_id, None)
            if entry is not None:
                out.extend(self._close(entry))
        while self._pending_expiry and self._pending_expiry[0][0] <= self.watermark:
            _, request_id = heapq.heappop(self._pending_expiry)
            expired = self.pending.pop(request_id, [])
            self.stats["clicks_unmatched"] += len(expired)
        return out

    # -- restore ---------------------------------------------------------------

    def replay_from(self) -> tuple[int | None, int | None]:
        """Earliest impression and click offsets still needed to rebuild this state."""
        impressions = [e.offset for e in self.open.values()]
        clicks = [e.click_offset for e in self.open.values() if e.click_offset is not None]
        clicks += [p.offset for pending in self.pending.values() for p in pending]
        return (min(impressions, default=None), min(clicks, default=None))

    # -- internals -------------------------------------------------------------

    def _close_time(self, impression: Impression) -> float:
        return impression.ts + self.window_s + self.lateness_s

    def _expiry(self, click: Click) -> float:
        return click.ts + self.window_s + self.lateness_s

    def _find(self, click: Click) -> OpenImpression | None:
        if click.request_id is not None:
            return self.open.get(click.request_id)
        # No request id: the latest open impression of this user that showed the item.
        for request_id in reversed(self._by_user.get(click.user_id, [])):
            entry = self.open.get(request_id)
            if (
                entry is not None
                and entry.impression.ts <= click.ts
                and any(item.item_id == click.item_id for item in entry.impression.slate)
            ):
                return entry
        return None

    def _attach(self, entry: OpenImpression, click: Click, offset: int) -> None:
        imp = entry.impression
        if not any(item.item_id == click.item_id for item in imp.slate):
            self.stats["clicks_not_in_slate"] += 1
        elif click.item_id in entry.clicked:
            self.stats["clicks_duplicate"] += 1
        elif click.ts > imp.ts + self.window_s or click.ts < imp.ts - self.lateness_s:
            self.stats["clicks_late"] += 1
        else:
            entry.clicked[click.item_id] = click.ts
            self.stats["clicks_matched"] += 1
        if entry.click_offset is None or offset < entry.click_offset:
            entry.click_offset = offset

    def _close(self, entry: OpenImpression) -> list[Feedback]:
        imp = entry.impression
        requests = self._by_user.get(imp.user_id)
        if requests is not None:
            requests.remove(imp.request_id)
            if not requests:
                del self._by_user[imp.user_id]
        if (
            entry.offset < self._emitted_below_offset
            and self._close_time(imp) <= self._emitted_through
        ):
            self.stats["impressions_rebuilt"] += 1
            return []
        out = []
        for item in imp.slate:
            clicked_at = entry.clicked.get(item.item_id)
            out.append(
                Feedback(
                    feedback_id=feedback_id(imp.request_id, item.item_id),
                    request_id=imp.request_id,
                    user_id=imp.user_id,
                    item_id=item.item_id,
                    ts=imp.ts,
                    reward=int(clicked_at is not None),
                    clicked_at=clicked_at,
                    position=item.position,
                    propensity=item.propensity,
                    policy=imp.policy,
                    model_version=imp.model_version,
                    team=item.team,
                    context=imp.context,
                    item_features=item.features,
                )
            )
        self.stats["impressions_closed"] += 1
        return out
