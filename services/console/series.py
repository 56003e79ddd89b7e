"""Scrape Prometheus text endpoints and keep the series the console shows.

Every ``interval_s`` :meth:`History.scrape` reads each target's ``/metrics``,
keeps the families in :data:`FAMILIES` and appends one :class:`Round` to a ring
buffer of ``max_rounds``. Counters are stored reset-corrected per target (a
counter that goes down restarted from zero, as Prometheus's ``increase``
assumes), so the increase over a window is a difference of two rounds even
across a service's restart. :meth:`History.view` turns the buffer into the
JSON-ready view the page draws:

- ``policies``: per policy, its CTR (mean reward) over the trailing
  ``window_s`` at every round with a 95% Wilson interval
  (:func:`services.common.intervals.wilson`), from the joiner's
  ``streamrec_joiner_policy_feedback_total`` / ``..._rewards_total``, and its
  totals at the newest round;
- ``regret``: cumulative expected regret per policy, where a simulator exports
  ``streamrec_simulator_regret_total``;
- ``models``, ``index``, ``lag``, ``events_per_s``, ``dead_letters``,
  ``dbgd`` (DRN's interleaving win rate with its interval) and ``guard``.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from services.common.intervals import wilson

log = logging.getLogger(__name__)

FEEDBACK = "streamrec_joiner_policy_feedback_total"
REWARDS = "streamrec_joiner_policy_rewards_total"
#: Counter samples kept (reset-corrected, summed over targets).
COUNTERS = frozenset(
    {
        FEEDBACK,
        REWARDS,
        "streamrec_simulator_regret_total",
        "streamrec_simulator_requests_total",
        "streamrec_consumer_events_total",
        "streamrec_consumer_dead_letters_total",
        "streamrec_drn_minor_updates_total",
        "streamrec_serving_requests_total",
    }
)
#: Gauge samples kept: the largest over targets (the newest version, the stalest age;
#: replicas own distinct partitions, so their lag series do not meet).
GAUGES = frozenset(
    {
        "streamrec_consumer_lag_records",
        "streamrec_params_reader_version",
        "streamrec_params_reader_age_seconds",
        "streamrec_params_version",
        "streamrec_params_publish_timestamp_seconds",
        "streamrec_index_version",
        "streamrec_index_age_seconds",
        "streamrec_guard_tripped",
        "streamrec_guard_statistic",
        "streamrec_guard_threshold",
    }
)
FAMILIES = COUNTERS | GAUGES

#: (sample name, sorted label pairs): one series, combined over targets.
Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Target:
    """A ``/metrics`` endpoint; ``name`` labels it on the page (a service's name)."""

    name: str
    url: str


def parse_targets(value: str) -> list[Target]:
    """``name=url,name=url`` (or bare URLs, named by their host:port) as targets."""
    targets = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        name, sep, url = part.partition("=")
        if not sep:
            name, url = part.split("//", 1)[-1].split("/", 1)[0], part
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"target {part!r}: the URL must start with http:// or https://")
        targets.append(Target(name.strip(), url.strip()))
    return targets


def parse_metrics(text: str) -> dict[Key, float]:
    """The samples of :data:`FAMILIES` in a Prometheus text exposition."""
    samples: dict[Key, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in FAMILIES:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@dataclass
class Round:
    """One scrape of every target: its start (wall time; every value was read after it),
    counters summed over targets, gauges their largest value over targets."""

    t: float
    counters: dict[Key, float]
    gauges: dict[Key, float]
    #: Target name -> whether it answered.
    up: dict[str, bool] = field(default_factory=dict)


class History:
    """A ring buffer of :class:`Round`; :meth:`scrape` adds one, :meth:`view` reads them."""

    def __init__(
        self,
        targets: Iterable[Target],
        *,
        window_s: float = 30.0,
        max_rounds: int = 900,
        fetch: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.targets = list(targets)
        self.window_s = window_s
        self.rounds: deque[Round] = deque(maxlen=max_rounds)
        self._fetch = fetch or _http_get
        self._clock = clock
        #: (target, key) -> (last raw value, reset-corrected total).
        self._counters: dict[tuple[str, Key], tuple[float, float]] = {}
        self._lock = threading.Lock()

    def scrape(self) -> Round:
        """Read every target once and append the round (stamped with its start time)."""
        started = self._clock()
        counters: dict[Key, float] = {}
        gauges: dict[Key, float] = {}
        up: dict[str, bool] = {}
        for target in self.targets:
            try:
                samples = parse_metrics(self._fetch(target.url))
            except (httpx.HTTPError, ValueError) as exc:
                log.debug("scrape of %s failed: %s", target.url, exc)
                up[target.name] = False
                samples = {}
            else:
                up[target.name] = True
            for key, value in samples.items():
                if key[0] in COUNTERS:
                    last, total = self._counters.get((target.name, key), (0.0, 0.0))
                    total += value - last if value >= last else value
                    self._counters[(target.name, key)] = (value, total)
                else:
                    gauges[key] = max(gauges.get(key, value), value)
            # A target that did not answer keeps its corrected totals in the sum.
            for (name, key), (_, total) in self._counters.items():
                if name == target.name:
                    counters[key] = counters.get(key, 0.0) + total
        now = Round(started, counters, gauges, up)
        with self._lock:
            self.rounds.append(now)
        return now

    def view(self) -> dict[str, Any]:
        """The JSON-ready view of the buffer (see the module docstring)."""
        with self._lock:
            rounds = list(self.rounds)
        if not rounds:
            return {"t": None, "rounds": 0, "window_s": self.window_s, "policies": {}}
        last = rounds[-1]
        return {
            "t": last.t,
            "rounds": len(rounds),
            "window_s": self.window_s,
            "targets": last.up,
            "policies": self._policies(rounds),
            "regret": _series_by(rounds, "streamrec_simulator_regret_total", "policy"),
            "models": _models(last),
            "index": {
                "version": _gauge(last, "streamrec_index_version"),
                "age_s": _gauge(last, "streamrec_index_age_seconds"),
            },
            "lag": [
                {**dict(labels), "records": value}
                for (name, labels), value in sorted(last.gauges.items())
                if name == "streamrec_consumer_lag_records"
            ],
            "events_per_s": _rates(rounds, "streamrec_consumer_events_total", "service"),
            "requests_per_s": _rates(rounds, "streamrec_serving_requests_total", "policy"),
            "dead_letters": [
                {**dict(labels), "records": value}
                for (name, labels), value in sorted(last.counters.items())
                if name == "streamrec_consumer_dead_letters_total" and value > 0
            ],
            "dbgd": _dbgd(last),
            "guard": _guard(last),
        }

    def _policies(self, rounds: list[Round]) -> dict[str, dict[str, Any]]:
        feedback = _by_label(rounds[-1].counters, FEEDBACK, "policy")
        result: dict[str, dict[str, Any]] = {}
        for policy in sorted(feedback):
            points = []
            start = 0
            for end, now in enumerate(rounds):
                while rounds[start].t < now.t - self.window_s:
                    start += 1
                if start == end:
                    continue
                n = _feedback(now, policy) - _feedback(rounds[start], policy)
                reward = _rewards(now, policy) - _rewards(rounds[start], policy)
                if n > 0:
                    low, high = wilson(min(reward, n), n)
                    points.append([now.t, reward / n, low, high, n])
            total = _feedback(rounds[-1], policy)
            rewards = _rewards(rounds[-1], policy)
            result[policy] = {
                "feedback": total,
                "rewards": rewards,
                "ctr": rewards / total if total else None,
                "points": points,
            }
        return result


def _http_get(url: str) -> str:
    response = httpx.get(url, timeout=2.0)
    response.raise_for_status()
    return response.text


def _by_label(samples: Mapping[Key, float], name: str, label: str) -> dict[str, float]:
    result: dict[str, float] = {}
    for (sample, labels), value in samples.items():
        if sample == name:
            key = dict(labels).get(label, "")
            result[key] = result.get(key, 0.0) + value
    return result


def _feedback(now: Round, policy: str) -> float:
    return now.counters.get((FEEDBACK, (("policy", policy),)), 0.0)


def _rewards(now: Round, policy: str) -> float:
    return now.counters.get((REWARDS, (("policy", policy),)), 0.0)


def _gauge(now: Round, name: str) -> float | None:
    value = now.gauges.get((name, ()))
    return None if value is None or math.isnan(value) else value


def _series_by(rounds: list[Round], name: str, label: str) -> dict[str, list[list[float]]]:
    result: dict[str, list[list[float]]] = {}
    for now in rounds:
        for key, value in _by_label(now.counters, name, label).items():
            result.setdefault(key, []).append([now.t, value])
    return result


def _rates(rounds: list[Round], name: str, label: str) -> dict[str, float]:
    """Per ``label`` value, the per-second increase between the last two rounds."""
    if len(rounds) < 2 or rounds[-1].t <= rounds[-2].t:
        return {}
    before = _by_label(rounds[-2].counters, name, label)
    after = _by_label(rounds[-1].counters, name, label)
    elapsed = rounds[-1].t - rounds[-2].t
    return {k: max(0.0, v - before.get(k, 0.0)) / elapsed for k, v in sorted(after.items())}


def _models(now: Round) -> dict[str, dict[str, float | None]]:
    models: dict[str, dict[str, float | None]] = {}
    fields = {
        "streamrec_params_reader_version": "serving_version",
        "streamrec_params_reader_age_seconds": "serving_age_s",
        "streamrec_params_version": "published_version",
        "streamrec_params_publish_timestamp_seconds": "published_at",
    }
    for (name, labels), value in sorted(now.gauges.items()):
        if name in fields:
            model = dict(labels).get("model", "")
            models.setdefault(model, {})[fields[name]] = None if math.isnan(value) else value
    return models


def _dbgd(now: Round) -> dict[str, float | None]:
    verdicts = _by_label(now.counters, "streamrec_drn_minor_updates_total", "winner")
    explore, exploit = verdicts.get("explore", 0.0), verdicts.get("exploit", 0.0)
    decided = explore + exploit
    if not decided:
        return {"decided": 0.0, "ties": verdicts.get("tie", 0.0), "win_rate": None}
    low, high = wilson(explore, decided)
    return {
        "decided": decided,
        "ties": verdicts.get("tie", 0.0),
        "win_rate": explore / decided,
        "ci_low": low,
        "ci_high": high,
    }


def _guard(now: Round) -> dict[str, Any]:
    tripped = {
        dict(labels).get("policy", ""): value
        for (name, labels), value in now.gauges.items()
        if name == "streamrec_guard_tripped"
    }
    statistic = {
        dict(labels).get("policy", ""): value
        for (name, labels), value in now.gauges.items()
        if name == "streamrec_guard_statistic"
    }
    return {
        "threshold": _gauge(now, "streamrec_guard_threshold"),
        "policies": {
            p: {"tripped": bool(tripped.get(p)), "statistic": statistic.get(p)}
            for p in sorted(tripped.keys() | statistic.keys())
        },
    }
