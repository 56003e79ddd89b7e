"""Reading users' click sequences and windowed features (serving, DRN, embeddings).

Sequences come back oldest first (most recent last), the order sequence models
consume them in; event times are kept to the microsecond. Features are computed
on read from the stored sequence rather than kept as counters: the sequence is
bounded already (``max_len`` clicks), nothing needs decaying or expiring, and
any ``now`` works, also a past one, which point-in-time training needs. The
price: a count is exact only while the window's clicks are all still kept, so it
saturates when a user made more than ``max_len`` clicks since the window began
(``total`` > ``length`` tells that the cap has dropped clicks).

>>> f = window_features([100.0, 3_000.0, 9_000.0], now=9_600.0)
>>> f.counts, f.recency_s, f.length
((1, 3, 3), 600.0, 3)
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.cluster import RedisCluster

from contracts.keys import KeySpace
from services.common.clients import redis_from_url
from services.sequences.store import TOTAL_FIELD, item_of, score_of, ts_of

#: Look-back windows of the user features: 1 h, 6 h, 24 h (as DRN's feature layout).
DEFAULT_WINDOWS_S: tuple[float, ...] = (3_600.0, 21_600.0, 86_400.0)


class SequenceEntry(NamedTuple):
    """One click of a user's sequence."""

    item_id: str
    #: Event time, unix seconds.
    ts: float


@dataclass(frozen=True, slots=True)
class UserFeatures:
    """A user's click activity as seen at time ``now``.

    ``counts[i]`` is the number of clicks with ``now - windows_s[i] <= ts <= now``;
    ``recency_s`` is ``now`` minus the latest click at or before ``now`` (None if
    there is none); ``length`` is the number of stored clicks and ``total`` the
    number of clicks recorded since the user's keys were created (it exceeds
    ``length`` once the cap has dropped old clicks).
    """

    windows_s: tuple[float, ...]
    counts: tuple[int, ...]
    recency_s: float | None
    length: int
    total: int


def _check_windows(windows_s: Sequence[float]) -> tuple[float, ...]:
    windows = tuple(float(w) for w in windows_s)
    if not windows or not all(math.isfinite(w) and w > 0 for w in windows):
        raise ValueError(f"windows_s must be non-empty positive seconds, got {tuple(windows_s)}")
    return windows


def window_features(
    timestamps: Iterable[float],
    now: float,
    *,
    windows_s: Sequence[float] = DEFAULT_WINDOWS_S,
    length: int | None = None,
    total: int | None = None,
) -> UserFeatures:
    """Window counts and recency at ``now`` from click times in any order.

    Clicks after ``now`` are not counted (features of a past request must not see
    its future). ``length`` and ``total`` default to the number of timestamps;
    the reader passes the stored ones, since it only fetches the times it needs.
    """
    if not math.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    windows = _check_windows(windows_s)
    times = sorted(float(t) for t in timestamps)
    if times and not (math.isfinite(times[0]) and math.isfinite(times[-1])):
        raise ValueError("timestamps contain NaN or infinite values")
    end = bisect_right(times, now)
    counts = tuple(end - bisect_left(times, now - window) for window in windows)
    length = len(times) if length is None else length
    return UserFeatures(
        windows_s=windows,
        counts=counts,
        recency_s=now - times[end - 1] if end else None,
        length=length,
        total=length if total is None else total,
    )


class Sequences:
    """Read access to the sequences service's Redis state; every batch call is one round trip.

    ``source`` is a Redis or Redis Cluster URL (see
    :func:`~services.common.clients.redis_from_url`) or a client (a client is not
    closed by :meth:`close`).
    """

    def __init__(
        self, source: str | redis.Redis | RedisCluster, *, keys: KeySpace | None = None
    ) -> None:
        self._owned = isinstance(source, str)
        self._redis: redis.Redis | RedisCluster = (
            redis_from_url(source) if isinstance(source, str) else source
        )
        self.keys = keys or KeySpace()

    def close(self) -> None:
        if self._owned:
            self._redis.close()

    def __enter__(self) -> Sequences:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get(self, user_id: str, n: int = 50, *, until: float | None = None) -> list[SequenceEntry]:
        """The user's latest ``n`` clicks (at or before ``until`` if given), oldest first."""
        if until is not None or n < 1:
            return self.get_many([user_id], n, until=until)[user_id]
        # One command, no pipeline: serving reads one user per request.
        reply = self._redis.zrange(self.keys.sequence(user_id), -n, -1, withscores=True)
        return [SequenceEntry(item_of(raw), ts_of(score)) for raw, score in reply]

    def get_many(
        self, user_ids: Iterable[str], n: int = 50, *, until: float | None = None
    ) -> dict[str, list[SequenceEntry]]:
        """:meth:`get` for many users in one pipeline; unknown users map to ``[]``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if until is not None and not math.isfinite(until):
            raise ValueError(f"until must be finite, got {until}")
        users = list(dict.fromkeys(user_ids))
        pipe = self._redis.pipeline(transaction=False)
        for user_id in users:
            key = self.keys.sequence(user_id)
            if until is None:
                pipe.zrange(key, -n, -1, withscores=True)
            else:
                pipe.zrevrangebyscore(key, score_of(until), "-inf", start=0, num=n, withscores=True)
        replies = pipe.execute()
        out = {}
        for user_id, reply in zip(users, replies, strict=True):
            entries = [SequenceEntry(item_of(raw), ts_of(score)) for raw, score in reply]
            out[user_id] = entries if until is None else entries[::-1]
        return out

    def features(
        self, user_id: str, now: float, *, windows_s: Sequence[float] = DEFAULT_WINDOWS_S
    ) -> UserFeatures:
        """The user's :class:`UserFeatures` at event time ``now``."""
        return self.features_many([user_id], now, windows_s=windows_s)[user_id]

    def features_many(
        self,
        user_ids: Iterable[str],
        now: float,
        *,
        windows_s: Sequence[float] = DEFAULT_WINDOWS_S,
    ) -> dict[str, UserFeatures]:
        """:meth:`features` for many users in one pipeline (4 commands per user)."""
        if not math.isfinite(now):
            raise ValueError(f"now must be finite, got {now}")
        windows = _check_windows(windows_s)
        users = list(dict.fromkeys(user_ids))
        # A microsecond either side: window_features draws the exact boundaries.
        low, high = score_of(now - max(windows)) - 1, score_of(now) + 1
        pipe = self._redis.pipeline(transaction=False)
        for user_id in users:
            key = self.keys.sequence(user_id)
            # The clicks inside the longest window; if there are none, the latest
            # one at or before now, for recency (it is older than every window).
            pipe.zrangebyscore(key, low, high, withscores=True)
            pipe.zrevrangebyscore(key, high, "-inf", start=0, num=1, withscores=True)
            pipe.zcard(key)
            pipe.hget(self.keys.user_features(user_id), TOTAL_FIELD)
        replies: list[Any] = pipe.execute()
        out = {}
        for i, user_id in enumerate(users):
            inside, latest, length, total = replies[4 * i : 4 * i + 4]
            times = [ts_of(score) for _, score in inside or latest]
            out[user_id] = window_features(
                times,
                now,
                windows_s=windows,
                length=int(length),
                total=int(total) if total is not None else int(length),
            )
        return out
