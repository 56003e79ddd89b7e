"""Drive the running system with simulated users: requests in, impressions and clicks out.

Each simulated request goes to the user's policy (stable hash of the user id),
which ranks the world's candidates with the latest parameters it can read from
Redis (a serving-free recommendation consumer), builds a slate with exploration
and exact propensities, and the world decides the clicks. Impressions and
clicks are posted to the gateway over HTTP (or produced to Kafka directly),
with real wall-clock event times, so the joiner and learners see live traffic.
"""

from __future__ import annotations

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
from services.bandits.service import BanditsSettings, build_learner
from services.paramstore import ParamStore, ParamWatcher
from services.serving.policies import (
    BanditPolicy,
    PolicyRouter,
    RandomPolicy,
    RankedSlate,
    RankingPolicy,
    RankRequest,
)
from services.simulator.world import Request, World

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Decision:
    policy: str
    slate: RankedSlate


class SlateSource(Protocol):
    """Where slates come from: in-process policies, or the serving API."""

    def decide(self, request: Request, world: World) -> Decision: ...


class LocalPolicies:
    """Serving-free recommendation consumer: policies scored in-process with store params."""

    def __init__(
        self, policies: Mapping[str, RankingPolicy], *, slate_size: int, seed: int = 0
    ) -> None:
        self.policies = dict(policies)
        self.router = PolicyRouter({name: 1.0 for name in self.policies})
        self.slate_size = slate_size
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_store(
        cls,
        store: ParamStore | None,
        settings: BanditsSettings,
        *,
        slate_size: int,
        epsilon: float = 0.05,
        seed: int = 0,
    ) -> LocalPolicies:
        """The random baseline plus one hot-reloaded policy per configured bandit."""
        policies: dict[str, RankingPolicy] = {"random": RandomPolicy()}
        for name, spec in settings.policies.items():
            watcher = ParamWatcher(store, name, poll_interval_s=0.2) if store else None
            policies[name] = BanditPolicy(
                name, build_learner(spec, settings), watcher, epsilon=epsilon
            )
        return cls(policies, slate_size=slate_size, seed=seed)

    def version(self, name: str) -> int:
        policy = self.policies[name]
        return policy.learner()[0] if isinstance(policy, BanditPolicy) else 0

    def decide(self, request: Request, world: World) -> Decision:
        name = self.router.assign(request.user_id)
        rank_request = RankRequest(
            user_id=request.user_id,
            context=request.context,
            candidates=request.candidates,
            candidate_labels=request.candidate_labels,
            item_features=world.item_features(request.candidates),
            k=self.slate_size,
            ts=request.ts,
        )
        return Decision(name, self.policies[name].rank(rank_request, self.rng))

    def close(self) -> None:
        for policy in self.policies.values():
            if isinstance(policy, BanditPolicy):
                policy.close()


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


def slate_impression(
    request_id: str, user_id: str, ts: float, policy: str, slate: RankedSlate, context: np.ndarray
) -> Impression:
    """The Impression that logs a served slate."""
    features = slate.item_features or [[] for _ in slate.items]
    teams = slate.teams or [None] * len(slate.items)
    return Impression(
        request_id=request_id,
        user_id=user_id,
        ts=ts,
        policy=policy,
        model_version=slate.model_version,
        context=slate.context if slate.context is not None else context.tolist(),
        slate=[
            SlateItem(
                item_id=item, position=pos, propensity=min(1.0, prop), team=team, features=feats
            )
            for pos, (item, prop, team, feats) in enumerate(
                zip(slate.items, slate.propensities, teams, features, strict=True)
            )
        ],
    )


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
