"""HTTP ingest: ``POST /v1/clicks``, ``POST /v1/impressions`` and ``POST /v1/rewards``.

Rewards (:class:`~contracts.events.Reward`: a graded signal such as a purchase)
are accepted only for kinds the reward rule configures (``STREAMREC_REWARD_WEIGHTS``,
:mod:`services.common.rewards`), others get a 400 naming the configured kinds:
with no graded kind configured the joiner does not read the rewards topic.

A body is one event or a JSON array of events. Validation is all-or-nothing: if
any event is invalid the response is ``400`` listing every bad event by index
with its reason, and nothing is produced, so a client fixes and resends the whole
batch and nothing is half-accepted. Valid batches are produced with ``acks=all``
and answered ``202 {"accepted": n}`` only once Kafka has acknowledged them.

When Kafka cannot take a batch the answer is ``503`` with ``Retry-After`` and
``{"error", "appended"}``, within ``produce_timeout_s`` however long the outage
lasts (``max_block_ms`` more at worst, if the topic's metadata vanishes midway
through the batch), and the client retries the whole batch. ``appended`` is how
many of the batch's events, a prefix, were handed to the Kafka client before the
failure:

- ``0``: none of the batch's events is or will be in Kafka. This is the answer
  while Kafka is known to be down (one probe batch per ``retry_after_s`` is let
  through to find out whether it is back), before the gateway has connected,
  and when the producer buffer (``buffer_memory``) is full;
- ``n > 0``: those first ``n`` events may still reach Kafka (the idempotent
  producer retries them until ``KAFKA_DELIVERY_TIMEOUT_MS``), the rest never
  will. Retrying then can put an event in the log twice, under the same event
  (or request) id; the joiner rewards each id once.

An impression may carry named ``features`` (``{name: str | int | float | bool |
[str]}``) instead of a dense ``context``: the gateway hashes them into the
context with :func:`contracts.features.hash_features` (the function serving's
``/v1/rank`` uses, into the same ``STREAMREC_BANDITS_CONTEXT_DIM``) before
producing, so the learners see the vector serving scored; both at once is a 400.

Requests need ``Authorization: Bearer <STREAMREC_GATEWAY_TOKEN>`` and bodies
are capped at ``max_body_bytes`` (413), with serving's code
(:mod:`services.common.http`).

So: a batch answered ``202`` is in Kafka entirely; a batch retried until
``202`` is in Kafka entirely, each event at least once; a batch answered ``503``
and never retried has at most its first ``appended`` events in Kafka.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Literal

import anyio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from contracts.events import (
    Click,
    EventError,
    Impression,
    Reward,
    check_clock,
    decode_click,
    decode_reward,
    encode,
    split_batch,
)
from contracts.features import decode_featured_impression, resolve_impression
from services.bandits.settings import BanditsSettings
from services.common import logs
from services.common.http import (
    BearerAuth,
    BodyTooLarge,
    check_token,
    read_body,
    too_large,
    unauthorised,
)
from services.common.metrics import LATENCY_BUCKETS, feature_hash_metrics
from services.common.rewards import RewardRule, RewardSettings
from services.common.settings import KafkaSettings, TopicSettings
from services.gateway.sdk import (
    DEFAULT_BUFFER_MEMORY,
    BatchNotAccepted,
    BatchTooLarge,
    EventProducer,
)

log = logging.getLogger(__name__)
Kind = Literal["clicks", "impressions", "rewards"]


class GatewaySettings(BaseSettings):
    """Gateway settings (``STREAMREC_GATEWAY_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_GATEWAY_", env_file=".env", extra="ignore"
    )

    host: str = "127.0.0.1"
    """``STREAMREC_GATEWAY_HOST``."""
    port: int = 8080
    """``STREAMREC_GATEWAY_PORT``."""
    token: SecretStr | None = None
    """``STREAMREC_GATEWAY_TOKEN``: requests need ``Authorization: Bearer <token>``."""
    allow_anonymous: bool = False
    """``STREAMREC_GATEWAY_ALLOW_ANONYMOUS``: accept requests without a token. Off by
    default: without a token the gateway refuses to start unless this is set."""
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    """``STREAMREC_GATEWAY_MAX_BODY_BYTES``: larger bodies get 413."""
    max_batch: int = Field(5_000, ge=1)
    """``STREAMREC_GATEWAY_MAX_BATCH``: more events in one body get 413."""
    produce_timeout_s: float = Field(5.0, gt=0)
    """``STREAMREC_GATEWAY_PRODUCE_TIMEOUT_S``: the longest a batch waits for Kafka's
    acknowledgements before 503. Acks take milliseconds and a leader failover a few
    seconds; past that the client is better off told to retry than left waiting."""
    max_block_ms: int = Field(1_000, ge=1)
    """``STREAMREC_GATEWAY_MAX_BLOCK_MS``: the producer's metadata wait (kafka-python's
    ``max_block_ms``, 60 s by default): a topic whose partitions are not known within
    this is a 503."""
    buffer_memory: int = Field(DEFAULT_BUFFER_MEMORY, ge=1024)
    """``STREAMREC_GATEWAY_BUFFER_MEMORY``: bytes of events handed to Kafka and not yet
    acknowledged (Java's ``buffer.memory``, which kafka-python lacks); a batch that does
    not fit is a 503, so an outage cannot grow the gateway beyond it."""
    retry_after_s: int = Field(2, ge=1)
    """``STREAMREC_GATEWAY_RETRY_AFTER_S``: the ``Retry-After`` of a 503, and how often
    a batch is let through to probe a Kafka that was failing."""


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "streamrec_gateway_requests_total",
            "HTTP requests by route and status code.",
            ["route", "code"],
            registry=registry,
        )
        self.events = Counter(
            "streamrec_gateway_events_total",
            "Events by kind and outcome.",
            ["kind", "outcome"],
            registry=registry,
        )
        self.latency = Histogram(
            "streamrec_gateway_request_seconds",
            "Request latency including Kafka acks.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )


def check_auth(settings: GatewaySettings) -> None:
    """Raise ``ValueError`` unless the settings name a token or explicitly allow anonymity."""
    check_token(
        settings.token, settings.allow_anonymous, app="gateway", prefix="STREAMREC_GATEWAY_"
    )


def create_app(
    producer: EventProducer,
    settings: GatewaySettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
    clock: Callable[[], float] = time.time,
    context_dim: int | None = None,
    reward_rule: RewardRule | None = None,
) -> Starlette:
    """Build the gateway app around a producer (injected so tests and services share one).

    ``context_dim`` is the width impressions' named ``features`` are hashed into
    (:func:`contracts.features.hash_features`): the learners' and serving's
    ``STREAMREC_BANDITS_CONTEXT_DIM`` unless given. ``reward_rule`` decides which reward
    kinds are accepted (``STREAMREC_REWARD_*`` unless given).
    """
    settings = settings or GatewaySettings()
    check_auth(settings)
    registry = registry or CollectorRegistry()
    metrics = _Metrics(registry)
    hashing = feature_hash_metrics(registry)
    dim = context_dim if context_dim is not None else BanditsSettings().context_dim

    def decode_impression(raw: bytes) -> Impression:
        impression, hashed = resolve_impression(decode_featured_impression(raw), dim)
        if hashed is not None:
            hashing.count("gateway", hashed)
        return impression

    rule = reward_rule or RewardSettings().rule()

    def decode_configured_reward(raw: bytes) -> Reward:
        reward = decode_reward(raw)
        if (refusal := rule.refusal(reward.kind)) is not None:
            raise EventError(refusal)
        return reward

    decoders: dict[Kind, Callable[[bytes], Click | Impression | Reward]] = {
        "clicks": decode_click,
        "impressions": decode_impression,
        "rewards": decode_configured_reward,
    }
    topics = {
        "clicks": producer.topics.clicks,
        "impressions": producer.topics.impressions,
        "rewards": producer.topics.rewards,
    }
    auth = BearerAuth(settings.token)

    def ingest(kind: Kind, body: bytes) -> Response:
        try:
            raws = split_batch(body)
        except EventError as exc:
            metrics.events.labels(kind, "rejected").inc()
            return JSONResponse(
                {"error": "bad request", "errors": [{"index": None, "reason": exc.reason}]},
                status_code=400,
            )
        if len(raws) > settings.max_batch:
            return JSONResponse(
                {"error": f"batch of {len(raws)} events exceeds {settings.max_batch}"},
                status_code=413,
            )
        if not raws:
            return JSONResponse({"error": "empty batch"}, status_code=400)
        events, errors = [], []
        now = clock()
        for index, raw in enumerate(raws):
            try:
                event = decoders[kind](raw)
                check_clock(event.ts, now)
                events.append(event)
            except EventError as exc:
                errors.append({"index": index, "reason": exc.reason})
        if errors:
            metrics.events.labels(kind, "rejected").inc(len(raws))
            return JSONResponse(
                {
                    "error": f"{len(errors)} of {len(raws)} events invalid; none accepted",
                    "errors": errors[:100],
                },
                status_code=400,
            )
        records = [(e.user_id.encode(), encode(e)) for e in events]
        try:
            producer.produce_batch(topics[kind], records, settings.produce_timeout_s)
        except BatchTooLarge as exc:
            metrics.events.labels(kind, "rejected").inc(len(events))
            return JSONResponse({"error": f"{exc}; split the batch"}, status_code=413)
        except BatchNotAccepted as exc:
            # Outages are logged once by the producer; a partly appended batch is rarer.
            level = logging.WARNING if exc.appended else logging.DEBUG
            log.log(level, "%d %s not accepted: %s", len(events), kind, exc.reason)
            metrics.events.labels(kind, "unavailable").inc(len(events))
            return JSONResponse(
                {
                    "error": f"Kafka unavailable: {exc.reason}; retry the whole batch after "
                    "Retry-After seconds (event ids make retries safe)",
                    "appended": exc.appended,
                },
                status_code=503,
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        metrics.events.labels(kind, "accepted").inc(len(events))
        return JSONResponse({"accepted": len(events)}, status_code=202)

    def endpoint(kind: Kind):  # type: ignore[no-untyped-def]
        route = f"/v1/{kind}"

        async def handle(request: Request) -> Response:
            started = time.perf_counter()
            if not auth.authorised(request):
                response: Response = unauthorised()
            else:
                try:
                    body = await read_body(request, settings.max_body_bytes)
                except BodyTooLarge as exc:
                    response = too_large(exc)
                else:
                    response = await run_in_threadpool(ingest, kind, body)
            metrics.requests.labels(route, str(response.status_code)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
            return response

        return handle

    async def healthz(request: Request) -> Response:
        with anyio.move_on_after(3):
            if await run_in_threadpool(producer.connected):
                return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "kafka unreachable"}, status_code=503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/v1/clicks", endpoint("clicks"), methods=["POST"]),
            Route("/v1/impressions", endpoint("impressions"), methods=["POST"]),
            Route("/v1/rewards", endpoint("rewards"), methods=["POST"]),
            Route("/healthz", healthz),
            Route("/metrics", metrics_endpoint),
        ]
    )


def gateway_producer(
    settings: GatewaySettings, kafka: KafkaSettings, topics: TopicSettings
) -> EventProducer:
    """The gateway's producer: bounded as ``settings`` say, connecting in the background
    so that the gateway starts, and answers 503, while Kafka is down."""
    return EventProducer(
        kafka,
        topics,
        buffer_memory=settings.buffer_memory,
        max_block_ms=settings.max_block_ms,
        retry_after_s=settings.retry_after_s,
        background=True,
    )


def main(settings: GatewaySettings | None = None) -> int:
    """Run the gateway with uvicorn until SIGTERM."""
    import uvicorn

    logs.configure("gateway")
    settings = settings or GatewaySettings()
    try:
        check_auth(settings)
    except ValueError as exc:
        log.error("gateway not started: %s", exc)
        return 2
    producer = gateway_producer(settings, KafkaSettings(), TopicSettings())
    app = create_app(producer, settings)
    if settings.token is None:
        log.warning("gateway accepts unauthenticated requests (STREAMREC_GATEWAY_ALLOW_ANONYMOUS)")
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    finally:
        producer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
