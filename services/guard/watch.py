"""The guard's decision logic, without Kafka or Redis: feedback into buckets, buckets
into the sequential test, alarms out with the version to roll back to.

:class:`PartitionCounts` holds one input partition's counts: per event-time bucket
(``floor(ts / bucket_s)``) and policy, the items shown, the clicks and the newest
model version that served them (a click is :attr:`Feedback.clicked
<contracts.events.Feedback.clicked>`: the guard watches click-through, whatever graded
reward the feedback also carries). It is what the guard service checkpoints with the
partition's offsets, so a restart re-reads what came after the checkpoint and
counts every feedback exactly once. A feedback whose bucket is already closed in
its partition (its impression time is more than ``lateness_s`` behind the newest
one seen there, so arriving this late) is not counted: which feedback is counted is
then a function of the partition's log alone.

:class:`Watch` merges the partitions it is given, scans each guarded policy after
every bucket that closes in all of them (:meth:`Watch.horizon`) with
:func:`services.guard.sequential.scan`, and returns an
:class:`Alarm` when a policy's statistic reaches the threshold. The last good
version is the newest one seen serving the policy ``margin_buckets`` before the
estimated change point. After an alarm (unless :meth:`Watch.retry` undoes it), or
when told to (:meth:`Watch.reset`, when a pin is set or removed), a policy's test
starts afresh: buckets before the reset
are neither references nor candidates, which is what keeps distinct alarms on
distinct change points (the false-alarm bound of :mod:`services.guard.sequential`).

>>> watch = Watch(["linucb"], reference="random", design=Design(), bucket_s=1.0)
>>> counts = PartitionCounts()
>>> counts.add("linucb", ts=100.2, reward=1, version=7, lateness_s=2.0, bucket_s=1.0)
True
>>> watch.evaluate([counts])
[]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import msgspec
import numpy as np

from services.guard.sequential import Counts, Design, Mode, Scan, scan

#: The reference that compares a policy with its own past (the ``rate`` mode).
SELF = "self"
SHOWN, CLICKS, VERSION = 0, 1, 2


class _Stored(msgspec.Struct, frozen=True):
    """A partition's counts as checkpointed: (bucket, policy, shown, clicks, version) rows."""

    watermark: float
    rows: list[tuple[int, str, int, int, int]]
    floors: dict[str, int] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(_Stored)


@dataclass
class PartitionCounts:
    """One input partition's feedback counts per bucket and policy (module doc)."""

    #: The newest impression time seen in the partition (seconds since the epoch).
    watermark: float = -math.inf
    buckets: dict[int, dict[str, list[int]]] = field(default_factory=dict)

    def add(
        self,
        policy: str,
        *,
        ts: float,
        reward: int,
        version: int,
        lateness_s: float,
        bucket_s: float,
    ) -> bool:
        """Count one feedback; False if it arrived after its bucket closed (not counted)."""
        bucket = math.floor(ts / bucket_s)
        self.watermark = max(self.watermark, ts)
        if bucket <= self.closed(lateness_s, bucket_s):
            return False
        row = self.buckets.setdefault(bucket, {}).setdefault(policy, [0, 0, 0])
        row[SHOWN] += 1
        row[CLICKS] += int(reward)
        row[VERSION] = max(row[VERSION], int(version))
        return True

    def closed(self, lateness_s: float, bucket_s: float) -> float:
        """The newest bucket that can no longer change in this partition (-inf if none)."""
        if self.watermark == -math.inf:
            return -math.inf
        return math.floor((self.watermark - lateness_s) / bucket_s) - 1

    def prune(self, before: float) -> None:
        """Forget buckets older than ``before``."""
        for bucket in [b for b in self.buckets if b < before]:
            del self.buckets[bucket]

    def encode(self, floors: Mapping[str, int]) -> bytes:
        rows = [
            (bucket, policy, row[SHOWN], row[CLICKS], row[VERSION])
            for bucket, policies in sorted(self.buckets.items())
            for policy, row in sorted(policies.items())
        ]
        watermark = self.watermark if self.watermark != -math.inf else -1.0
        return _encoder.encode(_Stored(watermark=watermark, rows=rows, floors=dict(floors)))

    @classmethod
    def decode(cls, raw: bytes) -> tuple[PartitionCounts, dict[str, int]]:
        """The counts and the policies' reset floors of a checkpoint made by :meth:`encode`."""
        stored = _decoder.decode(raw)
        counts = cls(watermark=stored.watermark if stored.watermark >= 0 else -math.inf)
        for bucket, policy, shown, clicks, version in stored.rows:
            counts.buckets.setdefault(bucket, {})[policy] = [shown, clicks, version]
        return counts, dict(stored.floors)


@dataclass(frozen=True)
class Alarm:
    """A policy's statistic reached the threshold at ``bucket``."""

    policy: str
    #: The newest bucket scanned (its start is ``bucket * bucket_s`` seconds since the epoch).
    bucket: int
    #: The estimated first bucket of the drop.
    change_bucket: int
    #: The newest version seen serving before the change point, less the margin, if any.
    last_good_version: int | None
    result: Scan
    design: Design
    mode: Mode
    reference: str
    bucket_s: float
    #: The policy's reset point before the alarm moved it (see :meth:`Watch.retry`).
    floor_before: int | None = None

    def reason(self) -> str:
        """Why, in one line: what a pin records and the log says."""
        what = "lift over " + self.reference if self.mode == "ratio" else "click rate"
        r = self.result
        return (
            f"guard: {self.policy}'s {what} fell from {r.reference_estimate:.4g} "
            f"(lower bound {r.reference_bound:.4g}; clicks {r.reference_clicks[0]} vs "
            f"{r.reference_clicks[1]}) to {r.current_estimate:.4g} (clicks {r.current_clicks[0]} "
            f"vs {r.current_clicks[1]}) since {self.change_bucket * self.bucket_s:.0f} "
            f"(event time); log likelihood ratio {r.statistic:.2f} >= threshold "
            f"{self.design.threshold:.2f} (drop tested {self.design.drop:.0%}, at most "
            f"{self.design.false_alarms_per_hour(bucket_s=self.bucket_s):.2g} false alarms "
            f"an hour)"
        )


class Watch:
    """Scans each guarded policy as buckets close; see the module doc."""

    def __init__(
        self,
        policies: Sequence[str],
        *,
        reference: str,
        design: Design,
        bucket_s: float,
        lateness_s: float = 2.0,
        margin_buckets: int = 30,
    ) -> None:
        if not policies:
            raise ValueError("no policies to guard")
        if reference in policies:
            raise ValueError(f"the reference policy {reference!r} cannot also be guarded")
        if not (math.isfinite(bucket_s) and bucket_s > 0):
            raise ValueError(f"bucket_s must be finite and > 0, got {bucket_s}")
        if lateness_s < 0 or margin_buckets < 0:
            raise ValueError("lateness_s and margin_buckets must be >= 0")
        self.policies = list(policies)
        self.reference = reference
        self.mode: Mode = "rate" if reference == SELF else "ratio"
        self.design = design
        self.bucket_s = bucket_s
        self.lateness_s = lateness_s
        self.margin_buckets = margin_buckets
        #: Per policy, the first bucket its test may use (raised by resets and alarms).
        self.floors: dict[str, int] = {}
        #: Per policy, the newest bucket scanned.
        self.scanned: dict[str, int] = {}
        #: Per policy, the statistic of the newest scan.
        self.statistics: dict[str, float] = dict.fromkeys(self.policies, 0.0)

    def counts(self, policy: str) -> bool:
        """Whether feedback of ``policy`` is counted (guarded, or the reference)."""
        return policy in self.policies or policy == self.reference

    def add(
        self, counts: PartitionCounts, policy: str, *, ts: float, reward: int, version: int
    ) -> bool:
        return counts.add(
            policy,
            ts=ts,
            reward=reward,
            version=version,
            lateness_s=self.lateness_s,
            bucket_s=self.bucket_s,
        )

    def horizon(self, partitions: Iterable[PartitionCounts]) -> float:
        """The newest bucket closed in every active partition (-inf before any feedback).

        A partition is active unless it is a whole scan span (reference and window)
        behind the newest one: one partition's feedback read far ahead of another's
        (a catch-up after a restart) does not close buckets the other still fills,
        and a partition that went quiet does not hold the test back.
        """
        closed = [p.closed(self.lateness_s, self.bucket_s) for p in partitions]
        closed = [c for c in closed if c != -math.inf]
        if not closed:
            return -math.inf
        active = max(closed) - self.design.span
        return min(c for c in closed if c >= active)

    def reset(self, policy: str, partitions: Iterable[PartitionCounts]) -> None:
        """Start ``policy``'s test afresh from the next bucket to close."""
        horizon = self.horizon(partitions)
        if horizon != -math.inf:
            self.floors[policy] = max(self.floors.get(policy, 0), int(horizon) + 1)

    def restore_floors(self, floors: Mapping[str, int]) -> None:
        for policy, floor in floors.items():
            if policy in self.policies:
                self.floors[policy] = max(self.floors.get(policy, 0), floor)

    def prune(self, partitions: Iterable[PartitionCounts]) -> None:
        """Forget buckets no scan can reach any more."""
        partitions = list(partitions)
        horizon = self.horizon(partitions)
        if horizon != -math.inf:
            for p in partitions:
                p.prune(horizon - self.design.span - self.margin_buckets)

    def evaluate(self, partitions: Iterable[PartitionCounts]) -> list[Alarm]:
        """Scan every policy at every bucket closed since its last scan, oldest first;
        the alarms raised (a policy's test restarts after its alarm)."""
        partitions = list(partitions)
        horizon = self.horizon(partitions)
        if horizon == -math.inf:
            return []
        newest = int(horizon)
        alarms = []
        for policy in self.policies:
            first = max(self.scanned.get(policy, newest - 1) + 1, self.floors.get(policy, 0))
            if first > newest:
                continue
            lo = first - self.design.span - self.margin_buckets
            table = self._merge(partitions, policy, lo, newest)
            for bucket in range(first, newest + 1):
                alarm = self._scan(policy, table, lo, bucket)
                if alarm is not None:
                    alarms.append(alarm)
            self.scanned[policy] = newest
        return alarms

    def _scan(self, policy: str, table: np.ndarray, lo: int, bucket: int) -> Alarm | None:
        start = max(bucket + 1 - self.design.span, lo, self.floors.get(policy, lo))
        if start > bucket:
            self.statistics[policy] = 0.0
            return None
        rows = table[start - lo : bucket + 1 - lo]
        result = scan(Counts.of(rows[:, :4]), self.design, mode=self.mode)
        self.statistics[policy] = result.statistic
        if not result.alarm(self.design) or result.change is None:
            return None
        change = start + result.change
        floor_before = self.floors.get(policy)
        self.floors[policy] = bucket + 1
        return Alarm(
            policy=policy,
            bucket=bucket,
            change_bucket=change,
            last_good_version=self._last_good(table, lo, start, change),
            result=result,
            design=self.design,
            mode=self.mode,
            reference=self.reference,
            bucket_s=self.bucket_s,
            floor_before=floor_before,
        )

    def retry(self, alarm: Alarm) -> None:
        """Undo the restart ``alarm`` made, so that the next bucket to close is tested
        against the same references (and, the drop persisting, alarms again): for an
        alarm whose action failed for a passing reason."""
        if alarm.floor_before is None:
            self.floors.pop(alarm.policy, None)
        else:
            self.floors[alarm.policy] = alarm.floor_before

    def _last_good(self, table: np.ndarray, lo: int, start: int, change: int) -> int | None:
        """The newest version seen before ``change - margin`` (before ``change`` if the
        margin reaches back past what is kept)."""
        for end in (change - self.margin_buckets, change):
            versions = table[max(start - self.margin_buckets, lo) - lo : max(end - lo, 0), 4]
            if len(versions) and versions.max() > 0:
                return int(versions.max())
        return None

    def _merge(
        self, partitions: Sequence[PartitionCounts], policy: str, lo: int, hi: int
    ) -> np.ndarray:
        """Buckets ``lo..hi`` summed over the partitions: shown, clicks, reference shown,
        reference clicks, newest version of ``policy``."""
        table = np.zeros((hi - lo + 1, 5))
        for counts in partitions:
            for bucket, policies in counts.buckets.items():
                if not lo <= bucket <= hi:
                    continue
                row = table[bucket - lo]
                if (mine := policies.get(policy)) is not None:
                    row[0] += mine[SHOWN]
                    row[1] += mine[CLICKS]
                    row[4] = max(row[4], mine[VERSION])
                if self.mode == "ratio" and (ref := policies.get(self.reference)) is not None:
                    row[2] += ref[SHOWN]
                    row[3] += ref[CLICKS]
        return table
