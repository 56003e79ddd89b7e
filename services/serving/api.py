"""``streamrec run serving``: the recommendation HTTP API around :class:`Recommender`.

Routes:

- ``GET /v1/recommendations?user_id=…&k=…``: a slate for a user, scored with a
  context of zeros (``context_dim`` of them: a client that has no request
  context still gets the policy's context-free ranking, the same one for every
  such request);
- ``POST /v1/recommendations`` with ``{"user_id": …, "k": …, "context": [floats]}``
  for clients that send the request context the bandits score with (``k`` and
  ``context`` are optional);
- ``POST /v1/rank`` with ``{"user_id", "k"?, "candidates"?: [{"id", "features"?}],
  "exclude"?: [ids], "context"?: [floats], "features"?: {name: value}}``: rank the
  client's candidates (exactly those, per-candidate features replacing the
  catalog's) or retrieved ones, never showing an excluded id; named ``features``
  are hashed into the context (:mod:`contracts.features`, exclusive with
  ``context``); the answer adds ``candidate_source``;
- ``/healthz``: 200 once there is something to recommend from, else 503; its body
  also says whether impressions are being logged (``impressions_logged``);
- ``/metrics``: request latency (``streamrec_serving_request_seconds``),
  requests by policy and outcome, per-stage time, the index version and age
  (``streamrec_index_*``), each policy's parameter version and staleness
  (``streamrec_params_reader_*``) and feature hashing
  (``streamrec_features_hashed_total``, ``streamrec_features_collisions_total``);
- ``/openapi.json``: the OpenAPI document (:mod:`services.serving.openapi`).

Every route but ``/healthz`` and ``/openapi.json`` needs ``Authorization: Bearer
<STREAMREC_SERVING_TOKEN>`` (401 otherwise; :mod:`services.common.http`, shared
with the gateway); without a token serving refuses to start unless
``STREAMREC_SERVING_ALLOW_ANONYMOUS`` is set. Bodies over ``max_body_bytes`` get
413 before they are read.

Answers: 200 with the slate; 400 with ``{"error", "reasons": [...]}`` for bad
input (missing or malformed user id, k out of range, wrong context size, bad
JSON, JSON nested too deeply, duplicate or all-excluded candidates, both context
and features); 503 when nothing is published yet or (``impression_ack``) Kafka
did not take the impression; 500 with the request's error type otherwise. Every
error body is ``{"error", "reasons"}``. With ``impression_ack`` every 200 has been logged as
exactly one impression; without it (the default) every 200 was handed to the
producer as exactly one impression, and one Kafka did not take is counted
(``streamrec_serving_degraded_total{source="impressions"}``), see
:class:`~services.serving.recommender.KafkaImpressionLog`. Serving starts, and
answers, while Kafka is down: the producer connects in the background.

The index follows the Redis pointer only into the snapshot store
(``STREAMREC_SNAPSHOT_DIR``), up to ``max_snapshot_bytes``, checksums verified
before anything is parsed (see :class:`~services.index.ReloadableIndex`).

Parameters reach serving through :class:`~services.paramstore.ParamWatcher`,
which keeps the last good version when Redis is unreachable; the index through
:class:`~services.index.ReloadableIndex`; popular/fresh/catalog lists through
:class:`~services.catalog.CandidateFeed`. Context and item feature
widths are the bandits service's (``STREAMREC_BANDITS_CONTEXT_DIM`` and
``STREAMREC_BANDITS_ITEM_DIM``), so serving scores exactly what the learners learn.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts.events import MAX_CANDIDATES, MAX_SLATE, EventError, decode_json
from contracts.features import hash_features
from services.bandits.base import DEFAULT_PROPENSITY_DRAWS
from services.bandits.factory import new_learner
from services.bandits.settings import BanditsSettings
from services.catalog import CandidateFeed
from services.common import clients, logs
from services.common.http import (
    BearerAuth,
    BodyTooLarge,
    check_token,
    error_response,
    read_body,
    too_large,
    unauthorised,
)
from services.common.metrics import feature_hash_metrics, serve_metrics
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings
from services.common.webserver import serve
from services.drn.settings import DRNSettings
from services.gateway.sdk import DEFAULT_BUFFER_MEMORY, EventProducer
from services.index import ReloadableIndex
from services.index.snapshot import DEFAULT_MAX_SNAPSHOT_BYTES
from services.paramstore import ParamStore, ParamWatcher
from services.sequences import Sequences
from services.serving.drn_policy import DRNPolicy, drn_builder
from services.serving.openapi import api_types, openapi
from services.serving.policies import (
    BanditPolicy,
    PolicyRouter,
    RandomPolicy,
    RankingPolicy,
    watch_learner,
)
from services.serving.recommender import (
    BadRequest,
    ImpressionNotLogged,
    KafkaImpressionLog,
    NoCandidates,
    Recommender,
    RecommenderConfig,
)

log = logging.getLogger(__name__)

RANDOM = "random"


class ServingSettings(BaseSettings):
    """Serving settings (``STREAMREC_SERVING_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_SERVING_",
        env_file=".env",
        extra="ignore",
        # So that ServingSettings(snapshot_dir=...) works as well as its variables do.
        populate_by_name=True,
    )

    host: str = "127.0.0.1"
    """``STREAMREC_SERVING_HOST``."""
    port: int = 8090
    """``STREAMREC_SERVING_PORT``."""
    workers: int = Field(1, ge=1, le=64)
    """``STREAMREC_SERVING_WORKERS``: processes answering on the port (pre-forked; one
    Python process uses one core at most). Worker ``i`` serves its own /metrics on
    ``STREAMREC_RUNTIME_METRICS_PORT + i`` (when that is set)."""
    token: SecretStr | None = None
    """``STREAMREC_SERVING_TOKEN``: requests need ``Authorization: Bearer <token>``
    (all but ``/healthz`` and ``/openapi.json``)."""
    allow_anonymous: bool = False
    """``STREAMREC_SERVING_ALLOW_ANONYMOUS``: accept requests without a token. Off by
    default: without a token serving refuses to start unless this is set."""
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    """``STREAMREC_SERVING_MAX_BODY_BYTES``: larger request bodies get 413."""
    max_candidates: int = Field(MAX_CANDIDATES, ge=1, le=MAX_CANDIDATES)
    """``STREAMREC_SERVING_MAX_CANDIDATES``: the most candidates one ``/v1/rank`` request
    may bring."""
    policies: dict[str, float] | None = None
    """``STREAMREC_SERVING_POLICIES``: JSON traffic shares ``{"policy": share}``, each policy
    ``random``, one of ``STREAMREC_BANDITS_POLICIES`` or ``STREAMREC_DRN_POLICY``; unset: all
    of them, equal shares."""
    epsilon: float = Field(0.05, ge=0, le=1)
    """``STREAMREC_SERVING_EPSILON``: share of uniformly random slates of the bandit policies."""
    propensity_draws: int = Field(DEFAULT_PROPENSITY_DRAWS, ge=1, le=100_000)
    """``STREAMREC_SERVING_PROPENSITY_DRAWS``: posterior draws behind the propensities a
    Thompson policy logs (standard deviation at most 0.5 / sqrt(draws + 1))."""
    default_k: int = Field(10, ge=1, le=MAX_SLATE)
    """``STREAMREC_SERVING_DEFAULT_K``: slate size when the request gives none."""
    max_k: int = Field(MAX_SLATE, ge=1, le=MAX_SLATE)
    """``STREAMREC_SERVING_MAX_K``."""
    retrieval_n: int = Field(50, ge=1)
    """``STREAMREC_SERVING_RETRIEVAL_N``: faiss neighbours of the user vector."""
    popular_n: int = Field(20, ge=0)
    """``STREAMREC_SERVING_POPULAR_N``: popular items added to every pool."""
    fresh_n: int = Field(10, ge=0)
    """``STREAMREC_SERVING_FRESH_N``: fresh items added to every pool."""
    min_candidates: int = Field(30, ge=0)
    """``STREAMREC_SERVING_MIN_CANDIDATES``: random catalog items fill the pool up to this."""
    history_n: int = Field(20, ge=1)
    """``STREAMREC_SERVING_HISTORY_N``: recent clicks pooled into the user vector."""
    index_name: str = "items"
    """``STREAMREC_SERVING_INDEX_NAME``: which index pointer to follow."""
    index_poll_s: float = Field(0.5, gt=0)
    """``STREAMREC_SERVING_INDEX_POLL_S``."""
    params_poll_s: float = Field(0.2, gt=0)
    """``STREAMREC_SERVING_PARAMS_POLL_S``."""
    lists_refresh_s: float = Field(1.0, gt=0)
    """``STREAMREC_SERVING_LISTS_REFRESH_S``: popular/fresh/catalog refresh period."""
    impression_ack: bool = False
    """``STREAMREC_SERVING_IMPRESSION_ACK``: answer only after Kafka acknowledged the
    impression (503 otherwise) instead of logging asynchronously."""
    impression_timeout_s: float = Field(5.0, gt=0)
    """``STREAMREC_SERVING_IMPRESSION_TIMEOUT_S``: ack wait with ``impression_ack``."""
    impression_buffer_bytes: int = Field(DEFAULT_BUFFER_MEMORY, ge=1024)
    """``STREAMREC_SERVING_IMPRESSION_BUFFER_BYTES``: impressions awaiting Kafka's
    acknowledgement (kafka-python has no ``buffer.memory``); beyond it an impression
    is not logged (counted) rather than held, so an outage cannot grow serving."""
    impression_max_block_ms: int = Field(500, ge=1)
    """``STREAMREC_SERVING_IMPRESSION_MAX_BLOCK_MS``: the longest a request waits for
    the impressions topic's metadata (kafka-python's ``max_block_ms``, 60 s by default)."""
    snapshot_dir: Path = Field(
        Path(".streamrec/snapshots"),
        validation_alias=AliasChoices("STREAMREC_SERVING_SNAPSHOT_DIR", "STREAMREC_SNAPSHOT_DIR"),
    )
    """``STREAMREC_SNAPSHOT_DIR`` (or ``STREAMREC_SERVING_SNAPSHOT_DIR``): the snapshot store
    the embeddings service writes; serving loads only snapshots directly inside it."""
    max_snapshot_bytes: int = Field(DEFAULT_MAX_SNAPSHOT_BYTES, ge=1024)
    """``STREAMREC_SERVING_MAX_SNAPSHOT_BYTES``: larger snapshots (manifest + index) are
    refused before they are read."""
    seed: int | None = None
    """``STREAMREC_SERVING_SEED``: fixes exploration draws (tests); unset in production."""


def check_auth(settings: ServingSettings) -> None:
    """Raise ``ValueError`` unless the settings name a token or explicitly allow anonymity."""
    check_token(
        settings.token, settings.allow_anonymous, app="serving API", prefix="STREAMREC_SERVING_"
    )


def traffic_shares(
    settings: ServingSettings, bandits: BanditsSettings, drn: DRNSettings
) -> dict[str, float]:
    """The configured shares, or random, every bandit policy and DRN with equal shares."""
    if settings.policies is not None:
        return dict(settings.policies)
    return {name: 1.0 for name in (RANDOM, *bandits.policies, drn.policy)}


def build_policies(
    settings: ServingSettings,
    bandits: BanditsSettings,
    drn: DRNSettings,
    store: ParamStore | None,
    registry: CollectorRegistry,
) -> dict[str, RankingPolicy]:
    """One policy per name in the traffic shares: ``random``, a configured bandit or DRN.

    DRN ranks the request's item features with the layout of the DRN service's
    settings (``STREAMREC_DRN_*``), so both ends agree on the features.
    """
    shares = traffic_shares(settings, bandits, drn)
    known = [RANDOM, *bandits.policies, drn.policy]
    unknown = [name for name in shares if name not in known]
    if unknown:
        raise ValueError(f"serving policies {unknown} are not among {known}")
    policies: dict[str, RankingPolicy] = {}
    for name in shares:
        if name == RANDOM:
            policies[name] = RandomPolicy()
        elif name == drn.policy:
            layout = drn.layout()
            source = (
                ParamWatcher(
                    store,
                    drn.model,
                    build=drn_builder(layout),
                    poll_interval_s=settings.params_poll_s,
                    registry=registry,
                )
                if store is not None
                else None
            )
            policies[name] = DRNPolicy(
                source,
                layout,
                interest_columns=drn.interest_columns,
                hidden=drn.hidden,
                seed=drn.seed,
                name=name,
            )
        elif name in bandits.policies:
            spec = bandits.policies[name]
            watcher = (
                watch_learner(
                    store,
                    name,
                    spec["learner"],
                    poll_interval_s=settings.params_poll_s,
                    registry=registry,
                )
                if store is not None
                else None
            )
            prior = new_learner(
                spec,
                context_dim=bandits.context_dim,
                item_dim=bandits.item_dim,
                seed=bandits.seed,
            )
            policies[name] = BanditPolicy(
                name,
                prior,
                watcher,
                epsilon=settings.epsilon,
                propensity_draws=settings.propensity_draws,
            )
    return policies


def policy_version(policy: RankingPolicy) -> int:
    """The model version a policy serves now (0 = its prior, or no model)."""
    if isinstance(policy, BanditPolicy):
        return policy.learner()[0]
    if isinstance(policy, DRNPolicy):
        return policy.model().explore_version
    return 0


def close_policies(policies: Mapping[str, RankingPolicy]) -> None:
    for policy in policies.values():
        close = getattr(policy, "close", None)
        if close is not None:
            close()


def create_app(
    recommender: Recommender,
    settings: ServingSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> Starlette:
    """The HTTP app around a recommender (injected, so tests and benchmarks share one).

    Raises ``ValueError`` when the settings have no token and do not allow anonymity.
    """
    settings = settings or ServingSettings()
    check_auth(settings)
    registry = registry if registry is not None else recommender.registry
    metrics = recommender.metrics
    hashing = feature_hash_metrics(registry)
    auth = BearerAuth(settings.token)
    config = recommender.config
    types = api_types(config.context_dim, config.item_dim, config.max_k, settings.max_candidates)
    query_decoder = msgspec.json.Decoder(types.recommendation_query)
    rank_decoder = msgspec.json.Decoder(types.rank_query)
    document = msgspec.json.encode(openapi(types, anonymous=auth.anonymous))

    def bad_request(reasons: list[str]) -> Response:
        metrics.requests.labels("-", "bad_request").inc()
        return error_response(400, "bad request", reasons)

    def answer(user_id: Any, k: Any, context: Any, **rank: Any) -> Response:
        try:
            result = recommender.recommend(user_id, k, context, **rank)
        except BadRequest as exc:
            return error_response(400, "bad request", exc.reasons)
        except (NoCandidates, ImpressionNotLogged) as exc:
            return error_response(503, str(exc))
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the log the trace
            log.exception("recommendation for %r failed", user_id)
            metrics.requests.labels(recommender.router.assign(str(user_id)), "error").inc()
            return error_response(500, f"internal error: {type(exc).__name__}")
        body = result.to_json()
        if rank:
            body["candidate_source"] = result.impression.candidate_source
        return Response(msgspec.json.encode(body), media_type="application/json")

    def protected(handler: Any) -> Any:
        async def guarded(request: Request) -> Response:
            if not auth.authorised(request):
                return unauthorised()
            return await handler(request)

        return guarded

    async def body_of(request: Request, decoder: msgspec.json.Decoder[Any]) -> Any:
        """The decoded body, or the 400/413 response that refuses it."""
        try:
            raw = await read_body(request, settings.max_body_bytes)
        except BodyTooLarge as exc:
            metrics.requests.labels("-", "bad_request").inc()
            return too_large(exc)
        try:
            return decode_json(decoder, raw)
        except EventError as exc:
            return bad_request([f"body: {exc}"])

    async def recommendations(request: Request) -> Response:
        started = time.perf_counter()
        try:
            if request.method == "GET":
                response = await _from_query(request)
            else:
                response = await _from_body(request)
        finally:
            metrics.request_seconds.observe(time.perf_counter() - started)
        return response

    async def _from_query(request: Request) -> Response:
        params = request.query_params
        reasons = [
            f"unknown query parameter {name!r}" for name in params if name not in ("user_id", "k")
        ]
        user_id = params.get("user_id")
        if user_id is None:
            reasons.append("user_id is required")
        raw_k = params.get("k")
        k: Any = settings.default_k
        if raw_k is not None:
            try:
                k = int(raw_k)
            except ValueError:
                reasons.append(f"k must be an integer, got {raw_k!r}")
        if reasons:
            return bad_request(reasons)
        return await run_in_threadpool(answer, user_id, k, None)

    async def _from_body(request: Request) -> Response:
        query = await body_of(request, query_decoder)
        if isinstance(query, Response):
            return query
        k = settings.default_k if query.k is None else query.k
        return await run_in_threadpool(answer, query.user_id, k, query.context)

    async def rank(request: Request) -> Response:
        started = time.perf_counter()
        try:
            return await _rank(request)
        finally:
            metrics.request_seconds.observe(time.perf_counter() - started)

    async def _rank(request: Request) -> Response:
        query = await body_of(request, rank_decoder)
        if isinstance(query, Response):
            return query
        if query.context is not None and query.features is not None:
            return bad_request(["context and features are mutually exclusive: send one of them"])
        context = query.context
        if query.features is not None:
            hashed = hash_features(query.features, config.context_dim)
            hashing.count("serving", hashed)
            context = hashed.vector
        candidates = features = None
        if query.candidates is not None:
            candidates = [candidate.id for candidate in query.candidates]
            features = {c.id: c.features for c in query.candidates if c.features is not None}
        k = settings.default_k if query.k is None else query.k
        return await run_in_threadpool(
            answer,
            query.user_id,
            k,
            context,
            candidates=candidates,
            candidate_features=features,
            exclude=query.exclude,
        )

    async def healthz(request: Request) -> Response:
        lists = recommender.feed.current()
        index_version = recommender.index.version if recommender.index is not None else None
        body = {
            "index_version": index_version,
            "catalog_items": len(lists.catalog),
            "popular_items": len(lists.popular),
            "policies": {
                name: policy_version(policy) for name, policy in recommender.policies.items()
            },
            "impressions_logged": not getattr(recommender.impressions, "failing", False),
        }
        ready = index_version is not None or len(lists.catalog) or lists.popular or lists.fresh
        if ready:
            return JSONResponse({"status": "ok"} | body)
        return JSONResponse({"status": "nothing to recommend from yet"} | body, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def openapi_document(request: Request) -> Response:
        return Response(document, media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return error_response(exc.status_code, exc.detail, headers=exc.headers)

    return Starlette(
        routes=[
            Route("/v1/recommendations", protected(recommendations), methods=["GET", "POST"]),
            Route("/v1/rank", protected(rank), methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", protected(metrics_endpoint)),
            Route("/openapi.json", openapi_document),
        ],
        exception_handlers={HTTPException: http_error},
    )


class ServingStack:
    """A recommender with every background reader it owns, closed together."""

    def __init__(
        self,
        settings: ServingSettings | None = None,
        *,
        kafka: KafkaSettings | None = None,
        redis_settings: RedisSettings | None = None,
        topics: TopicSettings | None = None,
        bandits: BanditsSettings | None = None,
        drn: DRNSettings | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings or ServingSettings()
        redis_settings = redis_settings or RedisSettings()
        bandits = bandits or BanditsSettings()
        drn = drn or DRNSettings()
        self.registry = registry if registry is not None else CollectorRegistry()
        keys = redis_settings.keys()
        self.redis = clients.redis_client(redis_settings)
        self.store = ParamStore(self.redis, keys=keys, registry=self.registry)
        self.policies = build_policies(self.settings, bandits, drn, self.store, self.registry)
        # In the background: serving starts and answers while Kafka is down.
        self.producer = EventProducer(
            kafka or KafkaSettings(),
            topics or TopicSettings(),
            buffer_memory=self.settings.impression_buffer_bytes,
            max_block_ms=self.settings.impression_max_block_ms,
            background=True,
        )
        self.index = ReloadableIndex(
            self.redis,
            keys.index_current(self.settings.index_name),
            poll_interval=self.settings.index_poll_s,
            registry=self.registry,
            snapshot_dir=self.settings.snapshot_dir,
            max_snapshot_bytes=self.settings.max_snapshot_bytes,
        )
        self.feed = CandidateFeed(
            self.redis,
            keys,
            item_dim=bandits.item_dim,
            popular_n=self.settings.popular_n,
            fresh_n=self.settings.fresh_n,
            refresh_s=self.settings.lists_refresh_s,
            registry=self.registry,
        )
        self.recommender = Recommender(
            policies=self.policies,
            router=PolicyRouter(traffic_shares(self.settings, bandits, drn)),
            history=Sequences(self.redis, keys=keys),
            index=self.index,
            feed=self.feed,
            impressions=KafkaImpressionLog(
                self.producer,
                wait=self.settings.impression_ack,
                timeout_s=self.settings.impression_timeout_s,
                registry=self.registry,
            ),
            config=RecommenderConfig(
                context_dim=bandits.context_dim,
                item_dim=bandits.item_dim,
                retrieval_n=self.settings.retrieval_n,
                history_n=self.settings.history_n,
                min_candidates=self.settings.min_candidates,
                max_k=self.settings.max_k,
            ),
            registry=self.registry,
            seed=self.settings.seed,
        )

    def app(self) -> Starlette:
        return create_app(self.recommender, self.settings, registry=self.registry)

    def close(self) -> None:
        """Stop the readers, deliver the impressions still buffered, close connections."""
        close_policies(self.policies)
        self.index.close()
        self.feed.close()
        self.producer.close()
        self.redis.close()


def main() -> int:
    """Run the serving API until SIGTERM, in ``STREAMREC_SERVING_WORKERS`` processes."""
    logs.configure("serving")
    settings = ServingSettings()
    try:
        check_auth(settings)
    except ValueError as exc:
        log.error("serving not started: %s", exc)
        return 2
    if settings.token is None:
        log.warning("serving accepts unauthenticated requests (STREAMREC_SERVING_ALLOW_ANONYMOUS)")
    return serve(
        lambda worker: _serving_app(settings, worker),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
    )


@contextmanager
def _serving_app(settings: ServingSettings, worker: int) -> Iterator[Starlette]:
    """One worker's app and everything it reads from, closed when the worker stops."""
    stack = ServingStack(settings)
    # Also on the runtime's metrics port (no token: keep it off public networks), where
    # `streamrec status`, the demo and Prometheus look.
    runtime = RuntimeSettings()
    server = None
    if runtime.metrics_port:
        port = runtime.metrics_port + worker
        server, _ = serve_metrics(stack.registry, port, runtime.metrics_host)
    try:
        yield stack.app()
    finally:
        stack.close()
        if server is not None:
            server.shutdown()
            server.server_close()


if __name__ == "__main__":
    raise SystemExit(main())
