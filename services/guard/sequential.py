"""A sequential test for a drop in a policy's reward, with a bounded false-alarm rate.

The guard watches each policy's feedback in event-time *buckets* (``bucket_s``
seconds of impression time each) and asks, after every bucket that closes, whether
the policy's reward has dropped since some recent bucket ``k`` (a candidate change
point) compared with the buckets just before ``k`` (its reference).

**What is compared.** Two modes:

* ``ratio`` (the default; reference policy ``random``): the *lift* ``L`` of the
  policy over a reference policy served at the same time, ``L = p / q`` with ``p``
  and ``q`` the two click rates per shown item. Model: in a bucket with ``n_P``
  and ``n_R`` shown items, the two policies' clicks are independent Poisson counts
  with means ``n_P p`` and ``n_R q`` (the rare-click limit of Bernoulli trials).
  Given the bucket's total clicks ``c = x_P + x_R``, the policy's share is then
  ``x_P ~ Binomial(c, pi(L, s))`` with ``s = n_P / (n_P + n_R)`` and
  ``pi(L, s) = L s / (L s + 1 - s)``. The world's own rate ``q`` -- time of day,
  a drifting population, a catalog change -- cancels: only ``L`` is left, and
  it is what an update of the policy moves.
* ``rate`` (reference ``self``): the policy's own click rate ``p`` per shown item,
  ``x_P ~ Binomial(n_P, p)``, against its own recent past; simpler, but a drift
  of the world reads as a drift of the policy.

**The test.** For a candidate change point ``k`` the reference is the
``reference_buckets`` buckets before ``k``; from them the lower confidence bound
``theta0 = theta_hat * exp(-z * se(log theta_hat))`` of the parameter ``theta``
(``L`` or ``p``) is computed, and the alternative is a drop of ``drop``:
``theta1 = (1 - drop) * theta0``. The log likelihood ratio of the buckets from
``k`` to the newest one ``n``, ``Lambda(k, n) = sum_j log f(bucket j; theta1) /
f(bucket j; theta0)``, is a sum of per-bucket terms (``x_P log(pi1/pi0) + x_R
log((1-pi1)/(1-pi0))`` in the ratio mode). The statistic is
``S_n = max_k Lambda(k, n)`` over the candidates ``k`` among the last
``window_buckets`` buckets whose reference holds at least ``min_reference_clicks``
clicks (of each policy in the ratio mode); the guard alarms when ``S_n >= h``
(``threshold``). The ``k`` reaching the maximum is the estimated change point.
This is a CUSUM (Page 1954) whose pre-change parameter is re-estimated for each
candidate change point from the data before it.

**The false-alarm bound.** Null hypothesis: after each candidate ``k`` the
parameter stays at least ``theta0(k)`` (no drop since ``k``). Fix ``k``.
``theta0(k)`` is a function of the data before ``k``, and for any true
``theta >= theta0`` one bucket's likelihood ratio has ``E[f(.;theta1)/f(.;theta0)]
<= 1``: for a binomial with success probability ``pi >= pi0 > pi1`` the
expectation ``pi * pi1/pi0 + (1 - pi) * (1-pi1)/(1-pi0)`` is affine and
decreasing in ``pi`` and equals 1 at ``pi0`` (``pi(L, s)`` is increasing in
``L``). So ``n -> exp(Lambda(k, n))`` is a non-negative supermartingale starting
at 1 (even if ``theta`` wanders, as long as it stays above ``theta0``), and
Ville's inequality gives ``P(sup_n Lambda(k, n) >= h) <= exp(-h)``. An alarm at
``n`` needs some ``k`` with ``Lambda(k, n) >= h``; after an alarm the guard
starts afresh from later buckets only (:func:`reset` in the service), so distinct
alarms need distinct ``k``. Summing over the ``k`` (one per bucket):

    E[false alarms in T seconds of traffic] <= (T / bucket_s) * exp(-h)

whatever the traffic rate: :func:`false_alarms_per_hour` is ``3600 / bucket_s *
exp(-h)`` (1.8e-3 per hour at the default ``h = 14.5``, ``bucket_s = 1``: one
false alarm in 23 days at most) and :func:`threshold_for` inverts it. The bound is
conditional on the reference: ``theta0`` is a lower bound at ``z = 2`` standard
errors, so a stationary policy is above it except for a few percent of
references, and those still need an excursion of ``h`` to alarm;
tests/unit/test_guard_sequential.py measures the whole procedure (references
estimated, alarms restarting) under the null by simulation with fixed seeds and
checks it stays within the bound.

**Detection.** After a drop to ``theta`` below ``theta1``'s neighbourhood the
statistic grows by the expected log likelihood ratio per click (a Kullback-Leibler
difference), so it crosses ``h`` after about ``h / drift`` clicks; the unit tests
state and check a drop of one half of the lift detected within 30 buckets of
250 shown items per policy per bucket at a 5 % click rate of the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

Mode = Literal["ratio", "rate"]
MODES: tuple[Mode, ...] = ("ratio", "rate")


@dataclass(frozen=True, kw_only=True)
class Design:
    """The test's parameters; see the module doc.

    >>> round(Design().false_alarms_per_hour(bucket_s=1.0), 4)
    0.0018
    >>> Design(drop=1.5)
    Traceback (most recent call last):
    ...
    ValueError: drop must be in (0, 1), got 1.5
    """

    #: The relative drop of the parameter the test is tuned for (the alternative).
    drop: float = 0.3
    #: ``h``: alarm when the log likelihood ratio reaches it.
    threshold: float = 14.5
    #: Standard errors below the reference estimate at which ``theta0`` sits.
    z: float = 2.0
    #: Buckets before a candidate change point that form its reference.
    reference_buckets: int = 300
    #: Candidate change points: the last this many buckets.
    window_buckets: int = 120
    #: Clicks a reference must hold (of each policy in the ratio mode).
    min_reference_clicks: int = 200

    def __post_init__(self) -> None:
        if not 0.0 < self.drop < 1.0:
            raise ValueError(f"drop must be in (0, 1), got {self.drop}")
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold must be finite and > 0, got {self.threshold}")
        if not (math.isfinite(self.z) and self.z >= 0):
            raise ValueError(f"z must be finite and >= 0, got {self.z}")
        for name in ("reference_buckets", "window_buckets", "min_reference_clicks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def span(self) -> int:
        """Buckets a scan looks at: the window and the reference of its oldest candidate."""
        return self.reference_buckets + self.window_buckets

    def false_alarms_per_hour(self, *, bucket_s: float) -> float:
        """The bound on expected false alarms per hour of traffic (module doc)."""
        return false_alarms_per_hour(self.threshold, bucket_s=bucket_s)


def false_alarms_per_hour(threshold: float, *, bucket_s: float) -> float:
    """``3600 / bucket_s * exp(-threshold)``: the bound on expected false alarms an hour.

    >>> round(false_alarms_per_hour(10.0, bucket_s=1.0), 4)
    0.1634
    """
    if bucket_s <= 0:
        raise ValueError(f"bucket_s must be > 0, got {bucket_s}")
    return 3600.0 / bucket_s * math.exp(-threshold)


def threshold_for(per_hour: float, *, bucket_s: float) -> float:
    """The threshold whose bound is ``per_hour`` expected false alarms an hour.

    >>> round(threshold_for(0.01, bucket_s=1.0), 2)
    12.79
    >>> round(false_alarms_per_hour(threshold_for(0.01, bucket_s=2.0), bucket_s=2.0), 6)
    0.01
    """
    if per_hour <= 0 or bucket_s <= 0:
        raise ValueError(f"per_hour and bucket_s must be > 0, got {per_hour}, {bucket_s}")
    return math.log(3600.0 / bucket_s / per_hour)


@dataclass(frozen=True, slots=True)
class Counts:
    """Shown items and clicks per consecutive bucket, oldest first: the policy's and
    the reference policy's (zeros in the ``rate`` mode)."""

    shown: np.ndarray
    clicks: np.ndarray
    ref_shown: np.ndarray
    ref_clicks: np.ndarray

    def __post_init__(self) -> None:
        n = len(self.shown)
        for name in ("clicks", "ref_shown", "ref_clicks"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} buckets, shown has {n}")
        if np.any(self.clicks > self.shown) or np.any(self.ref_clicks > self.ref_shown):
            raise ValueError("a bucket has more clicks than shown items")

    @classmethod
    def of(cls, rows: np.ndarray) -> Counts:
        """From an array of shape (buckets, 4): shown, clicks, ref_shown, ref_clicks."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
        return cls(rows[:, 0], rows[:, 1], rows[:, 2], rows[:, 3])

    def __len__(self) -> int:
        return len(self.shown)


@dataclass(frozen=True, slots=True)
class Scan:
    """The statistic at the newest bucket and what it rests on."""

    #: ``S_n``: the largest log likelihood ratio over the candidate change points (0 if none).
    statistic: float
    #: Index of the estimated change point (the first bucket of the drop), if any candidate.
    change: int | None = None
    #: ``theta0`` of that candidate: the lower confidence bound of its reference.
    reference_bound: float = math.nan
    #: The reference's point estimate (lift, or click rate in the ``rate`` mode).
    reference_estimate: float = math.nan
    #: The same estimate since the change point.
    current_estimate: float = math.nan
    #: Clicks (policy, reference policy) in the reference and since the change point.
    reference_clicks: tuple[int, int] = (0, 0)
    current_clicks: tuple[int, int] = (0, 0)

    def alarm(self, design: Design) -> bool:
        return self.statistic >= design.threshold


def _estimate(mode: Mode, totals: np.ndarray) -> np.ndarray:
    """Point estimates of theta from summed (shown, clicks, ref_shown, ref_clicks)."""
    shown, clicks, ref_shown, ref_clicks = totals.T
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = clicks / shown
        if mode == "rate":
            return rate
        return rate / (ref_clicks / ref_shown)


def _lower_bound(mode: Mode, totals: np.ndarray, z: float) -> np.ndarray:
    """``theta_hat * exp(-z * se(log theta_hat))``, the delta-method standard error of a
    log rate being ``sqrt(1/x - 1/n)``."""
    shown, clicks, ref_shown, ref_clicks = totals.T
    with np.errstate(divide="ignore", invalid="ignore"):
        var = 1.0 / clicks - 1.0 / shown
        if mode == "ratio":
            var = var + 1.0 / ref_clicks - 1.0 / ref_shown
        return _estimate(mode, totals) * np.exp(-z * np.sqrt(np.maximum(var, 0.0)))


def _llr(mode: Mode, rows: np.ndarray, theta0: np.ndarray, theta1: np.ndarray) -> np.ndarray:
    """Log likelihood ratio of each bucket (columns) under each candidate's (rows)
    ``theta1`` against its ``theta0``: shape (candidates, buckets)."""
    shown, clicks, ref_shown, ref_clicks = (rows[:, i][None, :] for i in range(4))
    t0, t1 = theta0[:, None], theta1[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "rate":
            p0, p1 = np.minimum(t0, 1.0 - 1e-12), np.minimum(t1, 1.0 - 1e-12)
            out = clicks * np.log(p1 / p0) + (shown - clicks) * np.log((1 - p1) / (1 - p0))
            return np.where(shown > 0, out, 0.0)
        s = shown / (shown + ref_shown)
        pi0 = t0 * s / (t0 * s + 1.0 - s)
        pi1 = t1 * s / (t1 * s + 1.0 - s)
        out = clicks * np.log(pi1 / pi0) + ref_clicks * np.log((1 - pi1) / (1 - pi0))
        # A bucket with only one policy's traffic says nothing about the lift.
        return np.where((shown > 0) & (ref_shown > 0), out, 0.0)


def scan(counts: Counts, design: Design, *, mode: Mode = "ratio", start: int = 0) -> Scan:
    """The statistic at the newest bucket of ``counts``, using buckets from ``start`` on
    (earlier ones are before a reset and neither candidates nor references).

    >>> quiet = Counts.of(np.tile([250, 25, 250, 12], (60, 1)))
    >>> scan(quiet, Design(reference_buckets=30, window_buckets=30)).statistic
    0.0
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    rows = np.stack([counts.shown, counts.clicks, counts.ref_shown, counts.ref_clicks], axis=1)
    m = len(rows)
    first = max(start, m - design.window_buckets, 1)
    if first >= m:
        return Scan(statistic=0.0)
    cumulative = np.vstack([np.zeros((1, 4)), np.cumsum(rows, axis=0)])
    candidates = np.arange(first, m)
    ref_start = np.maximum(candidates - design.reference_buckets, start)
    reference = cumulative[candidates] - cumulative[ref_start]
    enough = reference[:, 1] >= design.min_reference_clicks
    if mode == "ratio":
        enough &= reference[:, 3] >= design.min_reference_clicks
    if not enough.any():
        return Scan(statistic=0.0)
    candidates, reference = candidates[enough], reference[enough]
    theta0 = _lower_bound(mode, reference, design.z)
    theta1 = (1.0 - design.drop) * theta0
    lo = int(candidates[0])
    llr = _llr(mode, rows[lo:], theta0, theta1)
    llr[np.arange(m - lo)[None, :] < (candidates - lo)[:, None]] = 0.0
    totals = llr.sum(axis=1)
    best = int(np.argmax(totals))
    statistic = max(float(totals[best]), 0.0)
    if statistic == 0.0:
        return Scan(statistic=0.0)
    k = int(candidates[best])
    current = cumulative[m] - cumulative[k]
    return Scan(
        statistic=statistic,
        change=k,
        reference_bound=float(theta0[best]),
        reference_estimate=float(_estimate(mode, reference[best : best + 1])[0]),
        current_estimate=float(_estimate(mode, current[None, :])[0]),
        reference_clicks=(int(reference[best, 1]), int(reference[best, 3])),
        current_clicks=(int(current[1]), int(current[3])),
    )
