"""Drive the running system with simulated users: requests in, impressions and clicks out.

Each simulated request gets its slate from a :class:`SlateSource`:

* :class:`ServingSource` (the closed loop, the default of ``streamrec up
  --simulate`` when serving runs): the serving API picks candidates, ranks
  them with the user's policy and logs the impression itself; the simulator
  only posts the clicks, carrying the request id serving returned;
* :class:`LocalPolicies` (the fallback without serving): the user's policy
  (stable hash of the user id) ranks the world's candidates in-process with the
  latest parameters it reads from Redis; the simulator posts the impression and
  the clicks.

The world decides the clicks on whatever items the source chose. Events go to
the gateway over HTTP (or to Kafka directly) with real wall-clock event times,
so the joiner and learners see live traffic.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import httpx
import numpy as np
import redis
from redis.cluster import RedisCluster

from contracts.events import Click, Impression, encode
from contracts.keys import KeySpace
from services.bandits.factory import new_learner
from services.bandits.settings import BanditsSettings
from services.catalog import publish_catalog
from services.paramstore import ParamStore
from services.serving.policies import (
    BanditPolicy,
    PolicyRouter,
    RandomPolicy,
    RankedSlate,
    RankingPolicy,
    RankRequest,
    watch_learner,
)
from services.serving.recommender import impression_for
from services.simulator.world import Request, World

log = logging.getLogger(__name__)

#: What a policy's regret is measured against: the best slate of the request's
#: candidates (local policies rank the world's candidate draw), or of the whole
#: live catalog (serving chooses its own candidates, so its regret includes
#: what candidate generation missed).
RegretBasis = Literal["candidates", "catalog"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The slate chosen for one request."""

    policy: str
    slate: RankedSlate
    #: Set when the source already logged the impression under this request id (serving).
    request_id: str | None = None
    #: The candidates the slate was chosen from, when the world offered them.
    candidates: Sequence[str] | None = None


class SlateSource(Protocol):
    """Where slates come from: in-process policies, or the serving API."""

    regret_basis: RegretBasis

    def decide_many(self, requests: Sequence[Request], world: World) -> list[Decision]: ...

    def version(self, name: str) -> int: ...

    def close(self) -> None: ...


class LocalPolicies:
    """Serving-free recommendation consumer: policies scored in-process with store params."""

    regret_basis: RegretBasis = "candidates"

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
            watcher = watch_learner(store, name, spec["learner"]) if store else None
            policies[name] = BanditPolicy(
                name,
                new_learner(
                    spec,
                    context_dim=settings.context_dim,
                    item_dim=settings.item_dim,
                    seed=settings.seed,
                ),
                watcher,
                epsilon=epsilon,
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
        slate = self.policies[name].rank(rank_request, self.rng)
        return Decision(name, slate, candidates=request.candidates)

    def decide_many(self, requests: Sequence[Request], world: World) -> list[Decision]:
        return [self.decide(request, world) for request in requests]

    def close(self) -> None:
        for policy in self.policies.values():
            if isinstance(policy, BanditPolicy):
                policy.close()


class ServingSource:
    """Asks the serving API for every slate (``POST /v1/recommendations`` with the context).

    Serving logs the impression; the decision carries its request id, which the
    simulator's clicks refer to. Requests of one tick go out concurrently on
    ``workers`` threads (the world is only touched on the calling thread). A
    503 (nothing published yet), a 5xx or a connection error is retried with
    backoff; any other refusal is a bug and raises.
    """

    regret_basis: RegretBasis = "catalog"

    def __init__(
        self, client: httpx.Client, *, slate_size: int, workers: int = 4, retries: int = 6
    ) -> None:
        self.client = client
        self.slate_size = slate_size
        self.retries = retries
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="serving-source")
        self._versions: dict[str, int] = {}

    @classmethod
    def from_url(
        cls, base_url: str, *, slate_size: int, workers: int = 4, token: str | None = None
    ) -> ServingSource:
        """A source asking ``base_url``, with ``Authorization: Bearer <token>`` if given."""
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client = httpx.Client(base_url=base_url, timeout=10, limits=limits, headers=headers)
        return cls(client, slate_size=slate_size, workers=workers)

    def version(self, name: str) -> int:
        """The newest model version serving reported for policy ``name``."""
        return self._versions.get(name, 0)

    def ready(self) -> bool:
        """Whether serving answers ``/healthz`` with 200."""
        try:
            return self.client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    def decide_many(self, requests: Sequence[Request], world: World) -> list[Decision]:
        decisions = list(self._pool.map(self._ask, requests))
        for decision in decisions:
            version = decision.slate.model_version
            if version > self._versions.get(decision.policy, -1):
                self._versions[decision.policy] = version
        return decisions

    def _ask(self, request: Request) -> Decision:
        body = {
            "user_id": request.user_id,
            "k": self.slate_size,
            "context": request.context.tolist(),
        }
        for attempt in range(self.retries):
            try:
                response = self.client.post("/v1/recommendations", json=body)
            except httpx.HTTPError as exc:
                log.warning("serving request failed (%s); retrying", exc)
            else:
                if response.status_code == 200:
                    return self._decision(response.json())
                if response.status_code < 500:
                    raise RuntimeError(f"serving refused the request: {response.text[:500]}")
                log.warning("serving answered %d: %s", response.status_code, response.text[:200])
            time.sleep(0.1 * 2**attempt)
        raise RuntimeError(f"serving unavailable after {self.retries} attempts")

    @staticmethod
    def _decision(answer: dict[str, Any]) -> Decision:
        items = answer["items"]
        slate = RankedSlate(
            items=[item["item_id"] for item in items],
            propensities=[item["propensity"] for item in items],
            model_version=int(answer["model_version"]),
            teams=[item.get("team") for item in items],
        )
        return Decision(answer["policy"], slate, request_id=answer["request_id"])

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.client.close()


def publish_world_catalog(world: World, client: redis.Redis | RedisCluster, keys: KeySpace) -> int:
    """Publish the world's live items and their features as serving's catalog."""
    items = world.catalog()
    return publish_catalog(client, keys, items, world.item_features(items))


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

    def counts_between(self, start: float, end: float) -> tuple[int, int]:
        """(clicks, shown items) between two elapsed times (from the timeline)."""
        before = max((t for t in self.timeline if t[0] <= start), default=(0.0, 0, 0))
        after = max((t for t in self.timeline if t[0] <= end), default=(0.0, 0, 0))
        return after[2] - before[2], after[1] - before[1]

    def ctr_between(self, start: float, end: float) -> float:
        """CTR of the items shown between two elapsed times (from the timeline)."""
        clicks, shown = self.counts_between(start, end)
        return clicks / shown if shown else 0.0


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

    @property
    def regret_basis(self) -> RegretBasis:
        return self.source.regret_basis

    def step(self, now: float) -> tuple[list[Impression], list[Click]]:
        """One request: decide, show, sample clicks. Returns the events to send."""
        return self.steps(now, 1)

    def steps(self, now: float, n: int) -> tuple[list[Impression], list[Click]]:
        """``n`` requests decided together (concurrently, for serving); returns the events.

        The world draws the requests in order; clicks are then sampled in the
        same order. (In a drifting world, clicks are judged at the step of the
        batch's last request: one tick is a few requests of a drift measured
        per thousand.)
        """
        requests = [self.world.request() for _ in range(n)]
        decisions = self.source.decide_many(requests, self.world)
        impressions: list[Impression] = []
        clicks: list[Click] = []
        for request, decision in zip(requests, decisions, strict=True):
            impression, clicked = self._outcome(request, decision, now)
            if impression is not None:
                impressions.append(impression)
            clicks += clicked
        return impressions, clicks

    def _outcome(
        self, request: Request, decision: Decision, now: float
    ) -> tuple[Impression | None, list[Click]]:
        items = decision.slate.items
        impression = None
        request_id = decision.request_id
        if request_id is None:
            request_id = uuid.uuid4().hex
            impression = impression_for(
                request_id,
                request.user_id,
                now,
                decision.policy,
                decision.slate,
                request.context,
                self.world.item_features(items),
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
        basis = decision.candidates if decision.candidates is not None else self.world.catalog()
        stats.optimal += self.world.best_slate_value(request.user_id, basis)
        return impression, clicks

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
                if due > 0:
                    impressions, clicks = self.steps(time.time(), due)
                    if impressions or clicks:
                        self.sink.send(impressions, clicks)
                    sent += due
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
        """Per policy: requests, CTR, CTR in the first and last fifth of the run, regret.

        Regret per request is against :attr:`regret_basis` (see :data:`RegretBasis`).
        """
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
