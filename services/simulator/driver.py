"""Drive the running system with simulated users: requests in, impressions and clicks out.

Each simulated request goes to the user's policy (stable hash of the user id),
which ranks the world's candidates with the latest parameters it can read from
Redis (a serving-free recommendation consumer), builds a slate with exploration
and exact propensities, and the world decides the clicks. Impressions and
clicks are posted to the gateway over HTTP (or produced to Kafka directly),
with real wall-clock event times, so the joiner and learners see live traffic.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
import numpy as np

from contracts.events import Click, Impression, SlateItem, encode
from services.bandits.base import BanditLearner
from services.bandits.features import policy_features
from services.bandits.service import BanditsSettings, build_learner
from services.paramstore import ParamStore, ParamWatcher
from services.serving.slate import build_slate
from services.simulator.world import Request, World

log = logging.getLogger(__name__)

RANDOM_POLICY = "random"


def assign_policy(user_id: str, policies: list[str]) -> str:
    """The policy a user is served by: a stable hash, so a user keeps their policy."""
    digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
    return policies[int.from_bytes(digest, "little") % len(policies)]


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    model_version: int
    items: list[str]
    propensities: list[float]


class SlateSource(Protocol):
    """Where slates come from: in-process policies now, the serving API later."""

    def decide(self, request: Request, world: World) -> Decision: ...


class StorePolicies:
    """Policies scored with the newest parameters in the store (or the prior before any)."""

    def __init__(
        self,
        store: ParamStore | None,
        settings: BanditsSettings,
        *,
        slate_size: int,
        epsilon: float = 0.05,
        seed: int = 0,
        include_random: bool = True,
    ) -> None:
        self.settings = settings
        self.slate_size = slate_size
        self.epsilon = epsilon
        self.rng = np.random.default_rng(seed)
        self.policies = ([RANDOM_POLICY] if include_random else []) + list(settings.policies)
        self.priors = {p: build_learner(spec, settings) for p, spec in settings.policies.items()}
        self.watchers = (
            {
                policy: ParamWatcher(store, policy, poll_interval_s=0.2)
                for policy in settings.policies
            }
            if store is not None
            else {}
        )

    def learner(self, policy: str) -> tuple[int, BanditLearner]:
        watcher = self.watchers.get(policy)
        if watcher is not None and watcher.version is not None:
            return watcher.current()
        return 0, self.priors[policy]

    def decide(self, request: Request, world: World) -> Decision:
        policy = assign_policy(request.user_id, self.policies)
        n = len(request.candidates)
        if policy == RANDOM_POLICY:
            picks = self.rng.choice(n, size=min(self.slate_size, n), replace=False)
            share = len(picks) / n
            return Decision(policy, 0, [request.candidates[i] for i in picks], [share] * len(picks))
        version, learner = self.learner(policy)
        X = policy_features(learner.name, request.context, world.item_features(request.candidates))
        scores = learner.score(request.candidate_labels, X)
        slate = build_slate(scores, self.slate_size, self.epsilon, self.rng)
        return Decision(
            policy,
            version,
            [request.candidates[i] for i in slate.indices],
            slate.propensities.tolist(),
        )

    def close(self) -> None:
        for watcher in self.watchers.values():
            watcher.close()


class EventSink(Protocol):
    def send(self, impressions: list[Impression], clicks: list[Click]) -> None: ...

    def close(self) -> None: ...


class GatewaySink:
    """Posts batches to the HTTP gateway; a failed post is retried, never dropped silently."""

    def __init__(self, base_url: str, token: str | None = None, retries: int = 5) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.client = httpx.Client(base_url=base_url, headers=headers, timeout=30)
        self.retries = retries

    def _post(self, path: str, events: list[Any]) -> None:
        body = b"[" + b",".join(encode(e) for e in events) + b"]"
        for attempt in range(self.retries):
            try:
                response = self.client.post(
                    path, content=body, headers={"content-type": "application/json"}
                )
            except httpx.HTTPError as exc:
                log.warning("post %s failed (%s); retrying", path, exc)
            else:
                if response.status_code == 202:
                    return
                if response.status_code < 500:
                    raise RuntimeError(f"gateway refused {path}: {response.text[:500]}")
            time.sleep(0.2 * 2**attempt)
        raise RuntimeError(f"gateway unavailable for {path} after {self.retries} attempts")

    def send(self, impressions: list[Impression], clicks: list[Click]) -> None:
        # Impressions first: the joiner tolerates either order, but this is the natural one.
        if impressions:
            self._post("/v1/impressions", impressions)
        if clicks:
            self._post("/v1/clicks", clicks)

    def close(self) -> None:
        self.client.close()


class KafkaSink:
    """Produces straight to Kafka through the producer SDK."""

    def __init__(self, producer: Any) -> None:
        self.producer = producer

    def send(self, impressions: list[Impression], clicks: list[Click]) -> None:
        futures = [self.producer.send_impression(i) for i in impressions]
        futures += [self.producer.send_click(c) for c in clicks]
        self.producer.wait(futures)

    def close(self) -> None:
        self.producer.close()


@dataclass
class PolicyStats:
    """Realised outcome of one policy: shown items, clicks, expected and optimal clicks."""

    requests: int = 0
    shown: int = 0
    clicks: int = 0
    expected: float = 0.0
    optimal: float = 0.0
    #: (elapsed seconds, shown, clicks) snapshots for CTR over time.
    timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def ctr(self) -> float:
        return self.clicks / self.shown if self.shown else 0.0

    @property
    def regret(self) -> float:
        return self.optimal - self.expected

    def ctr_between(self, start: float, end: float) -> float:
        """CTR of the items shown between two elapsed times (from the timeline)."""
        before = max((t for t in self.timeline if t[0] <= start), default=(0.0, 0, 0))
        after = max((t for t in self.timeline if t[0] <= end), default=(0.0, 0, 0))
        shown = after[1] - before[1]
        return (after[2] - before[2]) / shown if shown else 0.0


class Simulation:
    """Generates traffic at ``rate`` requests/s until stopped."""

    def __init__(
        self,
        world: World,
        source: SlateSource,
        sink: EventSink,
        *,
        rate: float,
        seed: int = 0,
        click_delay_s: tuple[float, float] = (0.2, 3.0),
        tick_s: float = 0.1,
    ) -> None:
        self.world = world
        self.source = source
        self.sink = sink
        self.rate = rate
        self.rng = np.random.default_rng(seed + 1)
        self.click_delay_s = click_delay_s
        self.tick_s = tick_s
        self.stats: dict[str, PolicyStats] = {}
        self.started = 0.0
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def step(self, now: float) -> tuple[list[Impression], list[Click]]:
        """One request: decide, show, sample clicks. Returns the events to send."""
        request = self.world.request()
        decision = self.source.decide(request, self.world)
        items = decision.items
        features = self.world.item_features(items)
        request_id = uuid.uuid4().hex
        impression = Impression(
            request_id=request_id,
            user_id=request.user_id,
            ts=now,
            policy=decision.policy,
            model_version=decision.model_version,
            context=request.context.tolist(),
            slate=[
                SlateItem(
                    item_id=item,
                    position=pos,
                    propensity=min(1.0, prop),
                    features=features[pos].tolist(),
                )
                for pos, (item, prop) in enumerate(zip(items, decision.propensities, strict=True))
            ],
        )
        clicked = self.world.sample_clicks(request.user_id, items, np.arange(len(items)))
        clicks = [
            Click(
                event_id=uuid.uuid4().hex,
                user_id=request.user_id,
                item_id=items[pos],
                ts=now + float(self.rng.uniform(*self.click_delay_s)),
                request_id=request_id,
                position=int(pos),
            )
            for pos in np.flatnonzero(clicked)
        ]
        stats = self.stats.setdefault(decision.policy, PolicyStats())
        stats.requests += 1
        stats.shown += len(items)
        stats.clicks += len(clicks)
        stats.expected += self.world.slate_value(request.user_id, items)
        stats.optimal += self.world.best_slate_value(request.user_id, request.candidates)
        return [impression], clicks

    def run(self, duration_s: float | None = None) -> None:
        """Send traffic until :meth:`stop` (or ``duration_s``); paced to ``rate``."""
        self.started = time.monotonic()
        sent = 0
        try:
            while not self.stopping.is_set():
                elapsed = time.monotonic() - self.started
                if duration_s is not None and elapsed >= duration_s:
                    break
                due = int(elapsed * self.rate) + 1 - sent
                impressions: list[Impression] = []
                clicks: list[Click] = []
                now = time.time()
                for _ in range(max(0, due)):
                    imps, cls = self.step(now)
                    impressions += imps
                    clicks += cls
                if impressions:
                    self.sink.send(impressions, clicks)
                    sent += len(impressions)
                for stats in self.stats.values():
                    stats.timeline.append((elapsed, stats.shown, stats.clicks))
                time.sleep(self.tick_s)
        except Exception as exc:
            self.errors.append(f"{type(exc).__name__}: {exc}")
            log.exception("simulation stopped")
            raise

    def stop(self) -> None:
        self.stopping.set()

    def summary(self) -> Mapping[str, dict[str, float]]:
        """Per policy: requests, CTR, CTR in the first and last fifth of the run, regret."""
        end = max((s.timeline[-1][0] for s in self.stats.values() if s.timeline), default=0.0)
        return {
            policy: {
                "requests": s.requests,
                "ctr": s.ctr,
                "ctr_first_fifth": s.ctr_between(0.0, end / 5),
                "ctr_last_fifth": s.ctr_between(end * 4 / 5, end),
                "regret_per_request": s.regret / s.requests if s.requests else 0.0,
            }
            for policy, s in sorted(self.stats.items())
        }
