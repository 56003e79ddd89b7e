"""The serving library: one user in, one logged slate out.

:meth:`Recommender.recommend` runs the request path:

1. **history**: the user's latest clicks (the sequences service's Redis state);
2. **candidates**: the user vector is the mean of the (L2-normalised) index
   vectors of those items; its faiss neighbours, then fresh items, then popular
   items, then uniformly random catalog items until there are
   ``min_candidates`` (so every live item keeps some exposure and a cold start
   never has an empty pool). A user with no known item vector (new user, or no
   index yet) is a *cold start*: the pool is fresh + popular + random, never an
   error. Items not in the catalog (retired, or never published) are dropped
   when a catalog exists, and so are the request's ``exclude`` ids (the random
   fill never draws them either). A request that brings its own ``candidates``
   (the Rank API) is ranked over exactly those, less its exclusions: no
   retrieval, no fill, catalog or not;
3. **features**: item features from the catalog (zeros when there is none),
   replaced by the request's own for the candidates it gives features for; the
   request context (zeros of ``context_dim`` when the client sends none);
4. **scoring**: the user's policy (stable hash, :class:`PolicyRouter`) ranks the
   pool with its hot-reloaded parameters and builds the slate with exploration;
5. **log**: exactly one :class:`~contracts.events.Impression` per response, with
   the request id, each shown item's propensity, the policy, its model version,
   (DRN) the interleaving teams, the candidate source (``retrieved`` or
   ``client``), the scored candidate ids and the exclusions applied, then the
   response.

Propensities are the policy's exact probability of showing each item *given
this request's candidate pool* (the pool's random fill is part of the request,
as the world's candidate draw was before serving existed); replay and IPS
estimators condition on the logged pool in the same way.

Policies get, besides candidates and features, ``RankRequest.extras``:
``history`` (the user's :class:`~services.sequences.SequenceEntry` clicks).

The Recommender holds no lock across I/O: the index, the parameter watchers and
the candidate feed each swap immutable references in the background. Scoring a
policy takes that policy's lock, because learners memoise lookups and are not
re-entrant; it is tens of microseconds.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
from kafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter, Histogram

from contracts.errors import StreamrecError
from contracts.events import (
    MAX_CANDIDATES,
    MAX_EXCLUDED,
    MAX_SLATE,
    EventError,
    Impression,
    SlateItem,
)
from contracts.ids import item_labels
from services.catalog import CandidateLists
from services.common.clients import REDIS_ERRORS
from services.common.metrics import LATENCY_BUCKETS
from services.index import IndexNotReady, LoadedIndex, ReloadableIndex
from services.sequences import SequenceEntry
from services.serving.policies import PolicyRouter, RankedSlate, RankingPolicy, RankRequest

log = logging.getLogger(__name__)

#: Stages of :meth:`Recommender.recommend`, as timed in ``Recommendation.timings``.
STAGES = ("history", "candidates", "features", "scoring", "log")
_MAX_ID = 128
_MAX_FEATURE = 1e9


class BadRequest(StreamrecError, ValueError):
    """Input serving cannot answer; ``reasons`` lists every problem found."""

    def __init__(self, reasons: Sequence[str]) -> None:
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


class NoCandidates(StreamrecError, RuntimeError):
    """Nothing to recommend from yet: no index, no popular or fresh items, no catalog."""


class ImpressionNotLogged(StreamrecError, RuntimeError):
    """The impression could not be produced (only raised when logging waits for the ack)."""


class HistorySource(Protocol):
    """Where a user's recent clicks come from (:class:`services.sequences.Sequences`)."""

    def get(self, user_id: str, n: int = 50) -> Sequence[SequenceEntry]: ...


class CandidateSource(Protocol):
    def current(self) -> CandidateLists: ...


class ImpressionLog(Protocol):
    """Where served slates are logged."""

    def log(self, impression: Impression) -> None: ...


class ServingMetrics:
    """The serving series; get them with :func:`serving_metrics` (one set per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.request_seconds = Histogram(
            "streamrec_serving_request_seconds",
            "Time to answer one recommendation request (HTTP handler, or recommend()).",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "streamrec_serving_requests_total",
            "Recommendation requests by policy and outcome "
            "(ok, cold_start, bad_request, unavailable, error).",
            ["policy", "outcome"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "streamrec_serving_stage_seconds",
            "Time spent in each stage of recommend() (history, candidates, features, "
            "scoring, log).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.candidates = Histogram(
            "streamrec_serving_candidates",
            "Candidates scored per request.",
            buckets=(5, 10, 25, 50, 100, 250, 500, 1000),
            registry=registry,
        )
        self.impressions = Counter(
            "streamrec_serving_impressions_total",
            "Impressions handed to Kafka, by outcome (sent, failed).",
            ["outcome"],
            registry=registry,
        )
        self.degraded = Counter(
            "streamrec_serving_degraded_total",
            "Requests answered without a source, by source (history, index; impressions: "
            "the slate was answered but its impression not logged).",
            ["source"],
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ServingMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def serving_metrics(registry: CollectorRegistry) -> ServingMetrics:
    """The serving series of ``registry``, created on first use."""
    with _METRICS_LOCK:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = ServingMetrics(registry)
        return metrics


class KafkaImpressionLog:
    """Produces impressions through the producer SDK (keyed by user; not re-validated:
    serving builds them from checked parts, and the joiner validates what it reads).

    ``wait=False`` (the default) hands the record to the producer and answers at
    once, so Kafka's latency and outages stay off the request path. An
    impression Kafka does not take (the producer not connected yet, because
    serving started while Kafka was down; its bounded buffer full during an
    outage; a delivery that failed) is counted
    (``streamrec_serving_impressions_total{outcome="failed"}`` and
    ``streamrec_serving_degraded_total{source="impressions"}``) and its slate is
    still answered: that slate is never learnt from. The first such impression
    logs a warning that impressions are not being logged, the first delivered
    one after it that logging resumed; impressions buffered during a short
    outage are delivered when Kafka is back.

    ``wait=True`` answers only after the broker acknowledged the impression and
    raises :class:`ImpressionNotLogged` otherwise (a 503), so no slate is ever
    shown unlogged, at the cost of a produce round trip per request and of
    serving nothing while Kafka is down.
    """

    def __init__(
        self,
        producer: Any,
        *,
        wait: bool = False,
        timeout_s: float = 5.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.producer = producer
        self.wait = wait
        self.timeout_s = timeout_s
        self.metrics = serving_metrics(registry) if registry is not None else None
        self._lock = threading.Lock()
        self._failing = False

    @property
    def failing(self) -> bool:
        """Whether the last impression's outcome was a failure to log it."""
        return self._failing

    def log(self, impression: Impression) -> None:
        request_id = impression.request_id
        try:
            future = self.producer.send_impression(impression, validate=False)
            if self.wait:
                future.get(timeout=self.timeout_s)
        except EventError as exc:
            self._count("failed")
            raise ImpressionNotLogged(f"impression {request_id}: {exc}") from exc
        except KafkaError as exc:
            self._not_logged(request_id, exc, answered=not self.wait)
            if self.wait:
                raise ImpressionNotLogged(f"impression {request_id}: {exc}") from exc
            return
        if self.wait:
            self._logged(None)
        else:
            future.add_callback(self._logged)
            future.add_errback(lambda exc: self._not_logged(request_id, exc, answered=True))

    def _logged(self, _metadata: object) -> None:
        self._count("sent")
        with self._lock:
            resumed, self._failing = self._failing, False
        if resumed:
            log.info("impressions are being logged to Kafka again")

    def _not_logged(self, request_id: str, exc: BaseException, *, answered: bool) -> None:
        """Kafka did not take an impression; ``answered``: its slate was served anyway."""
        self._count("failed")
        if answered and self.metrics is not None:
            self.metrics.degraded.labels("impressions").inc()
        with self._lock:
            started, self._failing = not self._failing, True
        if started:
            log.warning(
                "impressions are not being logged (first: %s, %s); %s until Kafka takes them",
                request_id,
                exc,
                "slates are answered but not learnt from" if answered else "requests get 503",
            )
        else:
            log.debug("impression %s not logged: %s", request_id, exc)

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.impressions.labels(outcome).inc()


@dataclass(frozen=True, slots=True)
class RecommenderConfig:
    """Sizes of the request path; see the module doc."""

    context_dim: int = 9
    item_dim: int = 8
    #: faiss neighbours of the user vector.
    retrieval_n: int = 50
    #: Recent clicks pooled into the user vector.
    history_n: int = 20
    #: Random catalog items fill the pool up to this size.
    min_candidates: int = 30
    max_k: int = MAX_SLATE

    def __post_init__(self) -> None:
        for name in ("context_dim", "retrieval_n", "history_n", "max_k"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("item_dim", "min_candidates"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("retrieval_n", "min_candidates"):
            if getattr(self, name) > MAX_CANDIDATES:
                raise ValueError(
                    f"{name} must be <= {MAX_CANDIDATES} (the most candidates an impression "
                    f"logs), got {getattr(self, name)}"
                )
        if self.max_k > MAX_SLATE:
            raise ValueError(f"max_k must be <= {MAX_SLATE} (the largest slate), got {self.max_k}")


@dataclass(frozen=True, slots=True)
class Recommendation:
    """One answered request: the logged impression plus how it was made."""

    impression: Impression
    cold_start: bool
    index_version: int | None
    candidates: int
    #: Seconds spent per stage (see :data:`STAGES`).
    timings: Mapping[str, float] = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.impression.request_id

    @property
    def items(self) -> list[str]:
        return [item.item_id for item in self.impression.slate]

    def to_json(self) -> dict[str, Any]:
        """The HTTP response body."""
        impression = self.impression
        return {
            "request_id": impression.request_id,
            "user_id": impression.user_id,
            "policy": impression.policy,
            "model_version": impression.model_version,
            "cold_start": self.cold_start,
            "index_version": self.index_version,
            "items": [
                {
                    "item_id": item.item_id,
                    "position": item.position,
                    "propensity": item.propensity,
                    "team": item.team,
                }
                for item in impression.slate
            ],
        }


def impression_for(
    request_id: str,
    user_id: str,
    ts: float,
    policy: str,
    slate: RankedSlate,
    context: np.ndarray,
    item_features: np.ndarray | None = None,
    *,
    candidate_source: Literal["retrieved", "client"] = "retrieved",
    candidates: Sequence[str] = (),
    excluded: Sequence[str] = (),
) -> Impression:
    """The Impression that logs a served slate.

    Features logged per item are the policy's (``slate.item_features``), else the
    rows of ``item_features`` (aligned with ``slate.items``), else none.
    ``candidates`` is the scored pool, ``excluded`` the request's exclusions.
    """
    if slate.item_features is not None:
        features = slate.item_features
    elif item_features is not None:
        features = np.asarray(item_features).tolist()
    else:
        features = [[] for _ in slate.items]
    teams = slate.teams or [None] * len(slate.items)
    return Impression(
        request_id=request_id,
        user_id=user_id,
        ts=ts,
        policy=policy,
        model_version=slate.model_version,
        context=slate.context if slate.context is not None else np.asarray(context).tolist(),
        candidate_source=candidate_source,
        candidates=list(candidates),
        excluded=list(excluded),
        slate=[
            SlateItem(
                item_id=item,
                position=pos,
                propensity=min(1.0, float(prop)),
                team=team,  # type: ignore[arg-type]
                features=feats,
            )
            for pos, (item, prop, team, feats) in enumerate(
                zip(slate.items, slate.propensities, teams, features, strict=True)
            )
        ],
    )


class Recommender:
    """Answers ``recommend(user_id, k, context)`` and logs one impression per answer.

    Args:
        policies: ranking policies by name; every name the router assigns must be here.
        router: assigns users to policies (stable hash, traffic shares).
        history: recent clicks per user; ``None`` serves everyone as a cold start.
        index: the reloadable faiss index; ``None`` (or not loaded yet) → cold starts.
        feed: popular, fresh and catalog lists.
        impressions: where impressions go.
        config: sizes.
        registry: Prometheus registry for :class:`ServingMetrics`.
        seed: seeds the per-thread generators of exploration and random fill.
        clock: event time of impressions.
    """

    def __init__(
        self,
        *,
        policies: Mapping[str, RankingPolicy],
        router: PolicyRouter,
        history: HistorySource | None,
        index: ReloadableIndex | None,
        feed: CandidateSource,
        impressions: ImpressionLog,
        config: RecommenderConfig | None = None,
        registry: CollectorRegistry | None = None,
        seed: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        missing = sorted(set(router.names) - set(policies))
        if missing:
            raise ValueError(f"router assigns policies that are not configured: {missing}")
        self.policies = dict(policies)
        self.router = router
        self.history = history
        self.index = index
        self.feed = feed
        self.impressions = impressions
        self.config = config or RecommenderConfig()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = serving_metrics(self.registry)
        self.clock = clock
        self._locks = {name: threading.Lock() for name in self.policies}
        self._seeds = np.random.SeedSequence(seed)
        self._seed_lock = threading.Lock()
        self._local = threading.local()
        self._zeros = np.zeros(self.config.context_dim)

    # -- validation --------------------------------------------------------------

    def check(
        self,
        user_id: object,
        k: object,
        context: object | None,
        candidates: Sequence[str] | None = None,
        candidate_features: Mapping[str, Sequence[float]] | None = None,
        exclude: Sequence[str] = (),
    ) -> np.ndarray:
        """Validate a request; returns the context vector or raises :class:`BadRequest`."""
        reasons = self._check_candidates(candidates, candidate_features, exclude)
        if not isinstance(user_id, str) or not 1 <= len(user_id) <= _MAX_ID:
            reasons.append(f"user_id must be a string of 1 to {_MAX_ID} characters")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.config.max_k:
            reasons.append(f"k must be an integer from 1 to {self.config.max_k}, got {k!r}")
        vector = self._zeros
        if context is not None:
            try:
                vector = np.asarray(context, dtype=np.float64)
            except (TypeError, ValueError):
                reasons.append("context must be a list of numbers")
            else:
                if vector.shape != (self.config.context_dim,):
                    reasons.append(
                        f"context must hold {self.config.context_dim} numbers,"
                        f" got shape {vector.shape}"
                    )
                elif not (np.isfinite(vector).all() and np.abs(vector).max() <= _MAX_FEATURE):
                    reasons.append(f"context values must be finite and within ±{_MAX_FEATURE:g}")
        if reasons:
            raise BadRequest(reasons)
        return vector

    def _check_candidates(
        self,
        candidates: Sequence[str] | None,
        candidate_features: Mapping[str, Sequence[float]] | None,
        exclude: Sequence[str],
    ) -> list[str]:
        """Reasons the Rank API's candidates, their features or the exclusions are refused."""
        reasons = []
        if len(exclude) > MAX_EXCLUDED:
            reasons.append(f"exclude may hold at most {MAX_EXCLUDED} ids, got {len(exclude)}")
        if candidates is None:
            if candidate_features:
                reasons.append("candidate features need candidates")
            return reasons
        if not 1 <= len(candidates) <= MAX_CANDIDATES:
            reasons.append(
                f"candidates must hold 1 to {MAX_CANDIDATES} items, got {len(candidates)}"
            )
        ids = set(candidates)
        if len(ids) != len(candidates):
            reasons.append("candidate ids must be unique")
        elif not ids - set(exclude):
            reasons.append("every candidate is excluded")
        unknown = [item for item in candidate_features or {} if item not in ids]
        if unknown:
            reasons.append(f"features for items that are not candidates: {unknown[:5]}")
        for item, row in (candidate_features or {}).items():
            vector = np.asarray(row, dtype=np.float64)
            if vector.shape != (self.config.item_dim,) or not np.isfinite(vector).all():
                reasons.append(
                    f"features of candidate {item!r} must be {self.config.item_dim} finite numbers"
                )
                break
        return reasons

    # -- the request path --------------------------------------------------------

    def recommend(
        self,
        user_id: str,
        k: int,
        context: Sequence[float] | np.ndarray | None = None,
        *,
        candidates: Sequence[str] | None = None,
        candidate_features: Mapping[str, Sequence[float]] | None = None,
        exclude: Sequence[str] = (),
    ) -> Recommendation:
        """Rank, log and return one slate for ``user_id`` (see the module doc).

        ``candidates`` (unique ids): rank exactly those instead of retrieving a
        pool; ``candidate_features``: item features that replace the catalog's
        for those candidates; ``exclude``: ids never to show, whatever the pool.

        Raises :class:`BadRequest` for invalid input, :class:`NoCandidates` when
        nothing has been published yet, :class:`ImpressionNotLogged` when logging
        waits for Kafka and Kafka failed.
        """
        try:
            ctx = self.check(user_id, k, context, candidates, candidate_features, exclude)
        except BadRequest:
            self.metrics.requests.labels("-", "bad_request").inc()
            raise
        policy_name = self.router.assign(user_id)
        timings: dict[str, float] = {}
        started = mark = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal mark
            now = time.perf_counter()
            timings[stage] = now - mark
            self.metrics.stage_seconds.labels(stage).observe(now - mark)
            mark = now

        history = self._history(user_id)
        lap("history")
        rng = self._rng()
        excluded = frozenset(exclude)
        try:
            if candidates is None:
                pool = self._candidates(history, rng, excluded)
            else:
                pool = self._client_candidates(history, candidates, excluded)
        except NoCandidates:
            self.metrics.requests.labels(policy_name, "unavailable").inc()
            raise
        lap("candidates")
        features, _ = pool.lists.catalog.features(pool.items)
        if candidate_features:
            for item, row in candidate_features.items():
                if item in pool.position:
                    features[pool.position[item]] = row
        labels = item_labels(pool.items)
        lap("features")
        now = self.clock()
        request = RankRequest(
            user_id=user_id,
            context=ctx,
            candidates=pool.items,
            candidate_labels=labels,
            item_features=features,
            k=k,
            ts=now,
            extras={"history": history},
        )
        policy = self.policies[policy_name]
        with self._locks[policy_name]:
            ranked = policy.rank(request, rng)
        lap("scoring")
        shown = [pool.position[item] for item in ranked.items]
        impression = impression_for(
            uuid.uuid4().hex,
            user_id,
            now,
            policy_name,
            ranked,
            ctx,
            features[shown],
            candidate_source="retrieved" if candidates is None else "client",
            candidates=pool.items,
            excluded=list(dict.fromkeys(exclude)),
        )
        try:
            self.impressions.log(impression)
        except ImpressionNotLogged:
            self.metrics.requests.labels(policy_name, "unavailable").inc()
            raise
        lap("log")
        timings["total"] = time.perf_counter() - started
        outcome = "cold_start" if pool.cold else "ok"
        self.metrics.requests.labels(policy_name, outcome).inc()
        self.metrics.candidates.observe(len(pool.items))
        return Recommendation(
            impression=impression,
            cold_start=pool.cold,
            index_version=pool.index_version,
            candidates=len(pool.items),
            timings=timings,
        )

    def _history(self, user_id: str) -> list[SequenceEntry]:
        if self.history is None:
            return []
        try:
            return list(self.history.get(user_id, self.config.history_n))
        except REDIS_ERRORS as exc:
            # Serve the user as a cold start rather than fail the request.
            self.metrics.degraded.labels("history").inc()
            log.debug("history of %s unavailable: %s", user_id, exc)
            return []

    def _snapshot(self) -> LoadedIndex | None:
        if self.index is None:
            return None
        try:
            return self.index.current
        except IndexNotReady:
            self.metrics.degraded.labels("index").inc()
            return None

    def _user_vector(
        self, history: list[SequenceEntry]
    ) -> tuple[LoadedIndex | None, np.ndarray | None]:
        """The index snapshot and the user vector (None: cold start)."""
        snapshot = self._snapshot()
        history_vectors, history_known = self._vectors(
            snapshot, [entry.item_id for entry in history]
        )
        user_vector = None
        if snapshot is not None and history_vectors is not None and history_known.any():
            query = history_vectors[history_known].mean(axis=0)
            norm = float(np.linalg.norm(query))
            if norm > 0 and math.isfinite(norm):
                user_vector = query / norm
        return snapshot, user_vector

    def _candidates(
        self, history: list[SequenceEntry], rng: np.random.Generator, excluded: frozenset[str]
    ) -> _Pool:
        lists = self.feed.current()
        snapshot, user_vector = self._user_vector(history)
        found: list[str] = []
        if user_vector is not None:
            ids, _ = self.index.search(  # type: ignore[union-attr]
                user_vector, self.config.retrieval_n, snapshot=snapshot
            )
            found = ids[0]
        pool = dict.fromkeys(found)
        pool.update(dict.fromkeys(lists.fresh))
        pool.update(dict.fromkeys(lists.popular))
        catalog = lists.catalog
        if excluded:
            pool = {item: None for item in pool if item not in excluded}
        if len(catalog):
            pool = {item: None for item in pool if item in catalog}
            short = self.config.min_candidates - len(pool)
            if short > 0:
                skip = pool.keys() | excluded if excluded else pool
                pool.update(dict.fromkeys(catalog.sample(short, rng, exclude=skip)))
        if not pool:
            raise NoCandidates(
                "no candidates: no index neighbours, popular, fresh or catalog items published "
                "yet, or all of them excluded"
            )
        items = list(pool)[:MAX_CANDIDATES]
        return _Pool(
            items=items,
            position={item: i for i, item in enumerate(items)},
            lists=lists,
            snapshot=snapshot,
            user_vector=user_vector,
        )

    def _client_candidates(
        self, history: list[SequenceEntry], candidates: Sequence[str], excluded: frozenset[str]
    ) -> _Pool:
        """The request's own candidates, less its exclusions (``check`` saw some remain)."""
        snapshot, user_vector = self._user_vector(history)
        items = [item for item in candidates if item not in excluded]
        return _Pool(
            items=items,
            position={item: i for i, item in enumerate(items)},
            lists=self.feed.current(),
            snapshot=snapshot,
            user_vector=user_vector,
        )

    @staticmethod
    def _vectors(
        snapshot: LoadedIndex | None, items: Sequence[str]
    ) -> tuple[np.ndarray | None, np.ndarray]:
        if snapshot is None:
            return None, np.zeros(len(items), dtype=bool)
        vectors, known = snapshot.vectors(items)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        return vectors / np.where(norms > 0, norms, 1.0), known

    def _rng(self) -> np.random.Generator:
        rng = getattr(self._local, "rng", None)
        if rng is None:
            with self._seed_lock:
                (child,) = self._seeds.spawn(1)
            rng = self._local.rng = np.random.default_rng(child)
        return rng


@dataclass(slots=True)
class _Pool:
    items: list[str]
    position: dict[str, int]
    lists: CandidateLists
    snapshot: LoadedIndex | None
    #: The normalised mean of the user's known history vectors; None for a cold start.
    user_vector: np.ndarray | None

    @property
    def cold(self) -> bool:
        return self.user_vector is None

    @property
    def index_version(self) -> int | None:
        return None if self.snapshot is None else self.snapshot.manifest.version
