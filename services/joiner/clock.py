"""The joiner's notion of time: event times bounded by the log, and the log's clock.

Event times come from clients and may be wrong by hours (the contracts accept
up to an hour in the future). Each Kafka record also carries a timestamp set by
its producer (the gateway, serving) or by the broker (``LogAppendTime``), and it
is part of the log: bounding an event's time by it keeps the join a function of
the log alone, so replay after a restore sees the same bounded times.

>>> bound_time(1_000.0, received=900.0, max_skew_s=30.0)
(930.0, 'future')
>>> bound_time(800.0, received=900.0, max_skew_s=30.0)
(800.0, 'past')
>>> bound_time(905.0, received=900.0, max_skew_s=30.0)
(905.0, None)
>>> clock = LogClock()
>>> clock.now(5.0) is None  # nothing read yet: no idea what time the log is at
True
>>> clock.observe(1_700_000_000.0, monotonic=5.0)
>>> clock.now(7.5)  # 2.5 s after reading a record stamped 1_700_000_000
1700000002.5
"""

from __future__ import annotations


def bound_time(ts: float, received: float | None, max_skew_s: float) -> tuple[float, str | None]:
    """An event's time bounded by its record's timestamp, and why it was out of bounds.

    An event stamped more than ``max_skew_s`` after its record's timestamp is
    clamped to ``received + max_skew_s`` (``"future"``): the producer wrote it
    before the time it claims. One stamped more than ``max_skew_s`` before is
    kept as it is (``"past"``): a client retry or an offline batch is late, not
    wrong, and the lateness rules (and the de-duplication horizon) are what
    handle it; the reason is only counted. Without a record timestamp (``None``)
    the event time is taken as it is.
    """
    if received is None:
        return ts, None
    if ts > received + max_skew_s:
        return received + max_skew_s, "future"
    if ts < received - max_skew_s:
        return ts, "past"
    return ts, None


class LogClock:
    """What time the log is at, from the record timestamps read and a monotonic clock.

    The estimate is the newest record timestamp read, advanced by the monotonic
    time elapsed since it was read (the largest ``timestamp - monotonic`` seen).
    It is never ahead of the producers' clocks by more than the time a record
    spends between its producer and this process, and it does not depend on this
    process's wall clock, which may be set wrong: only the rate of the monotonic
    clock matters, for the seconds between two records.
    """

    def __init__(self) -> None:
        self._offset: float | None = None

    def observe(self, timestamp: float, monotonic: float) -> None:
        """Note a record timestamp (seconds) read at ``monotonic``."""
        offset = timestamp - monotonic
        if self._offset is None or offset > self._offset:
            self._offset = offset

    def now(self, monotonic: float) -> float | None:
        """The log's time at ``monotonic``; None until a record has been read."""
        return None if self._offset is None else monotonic + self._offset
