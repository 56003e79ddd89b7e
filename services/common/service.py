"""One shape for every consumer service: a :class:`ServiceSpec` and :func:`run_service`.

A service module declares what it reads and how its processor is built; settings
are read here, in one place, and the process around the runtime (logs, /metrics,
SIGTERM, closing the processor) is the same for all of them::

    SPEC = ServiceSpec(
        name="sequences",
        settings=SequencesSettings,
        inputs=lambda topics: {topics.clicks: decode_click},
        make_processor=lambda wiring: SequencesProcessor(...),
    )

    def main() -> int:
        return run_service(SPEC)

A service's own defaults for shared knobs (its checkpoint interval, Kafka fetch
sizes) apply only where the environment says nothing: ``STREAMREC_RUNTIME_*`` and
``KAFKA_*`` variables always win.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import FrameType
from typing import Any, Generic, Protocol, TypeVar

import redis
from prometheus_client import CollectorRegistry
from pydantic_settings import BaseSettings
from redis.cluster import RedisCluster

from services.common import clients, logs
from services.common.metrics import serve_metrics
from services.common.runtime import ConsumerRuntime, Decoder, Processor
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings

log = logging.getLogger(__name__)


class GroupSettings(Protocol):
    """What every service's settings have: the consumer group it joins."""

    group: str


S = TypeVar("S", bound=GroupSettings)
M = TypeVar("M", bound=BaseSettings)


def with_defaults(settings: M, defaults: Mapping[str, Any]) -> M:
    """``settings`` with ``defaults`` filled in where no source (environment, .env,
    constructor) set the field: a service's default never beats its operator.

    >>> import os
    >>> os.environ["STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S"] = "7.5"
    >>> with_defaults(RuntimeSettings(), {"checkpoint_interval_s": 0.25}).checkpoint_interval_s
    7.5
    >>> del os.environ["STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S"]
    >>> with_defaults(RuntimeSettings(), {"checkpoint_interval_s": 0.25}).checkpoint_interval_s
    0.25
    """
    unset = {
        name: value for name, value in defaults.items() if name not in settings.model_fields_set
    }
    return settings.model_validate({**settings.model_dump(), **unset}) if unset else settings


@dataclass(frozen=True)
class Wiring(Generic[S]):
    """Everything a processor is built from, read once from the environment."""

    name: str
    settings: S
    registry: CollectorRegistry
    kafka: KafkaSettings
    redis_settings: RedisSettings
    topics: TopicSettings
    runtime: RuntimeSettings

    def redis_client(self) -> redis.Redis | RedisCluster:
        """A client for the service's Redis (one per call)."""
        return clients.redis_client(self.redis_settings)


@dataclass(frozen=True)
class ServiceSpec(Generic[S]):
    """A consumer service, declared: what it reads, how its processor is built."""

    name: str
    """The service's name: its logs, metrics label and dead-letter source."""
    settings: Callable[[], S]
    """Its settings class, read from the environment when none are given."""
    inputs: Callable[[TopicSettings], Mapping[str, Decoder]]
    """The topics it consumes and the decoder of each."""
    make_processor: Callable[[Wiring[S]], Processor]
    runtime_defaults: Callable[[S], Mapping[str, Any]] = lambda _settings: {}
    """The service's defaults for :class:`RuntimeSettings` (``STREAMREC_RUNTIME_*`` wins)."""
    kafka_defaults: Callable[[S], Mapping[str, Any]] = lambda _settings: {}
    """The service's defaults for :class:`KafkaSettings` (``KAFKA_*`` wins)."""
    runtime_class: type[ConsumerRuntime] = ConsumerRuntime


def wire(
    spec: ServiceSpec[S],
    registry: CollectorRegistry,
    settings: S | None = None,
    *,
    kafka: KafkaSettings | None = None,
    redis_settings: RedisSettings | None = None,
    topics: TopicSettings | None = None,
    runtime: RuntimeSettings | None = None,
) -> Wiring[S]:
    """The service's settings: those given, the rest from the environment."""
    settings = settings if settings is not None else spec.settings()
    return Wiring(
        name=spec.name,
        settings=settings,
        registry=registry,
        kafka=kafka or with_defaults(KafkaSettings(), spec.kafka_defaults(settings)),
        redis_settings=redis_settings or RedisSettings(),
        topics=topics or TopicSettings(),
        runtime=runtime or with_defaults(RuntimeSettings(), spec.runtime_defaults(settings)),
    )


def build_runtime(
    spec: ServiceSpec[S],
    registry: CollectorRegistry,
    settings: S | None = None,
    **given: Any,
) -> ConsumerRuntime:
    """The service's consumer runtime; settings not ``given`` come from the environment
    (keywords as :func:`wire`)."""
    wiring = wire(spec, registry, settings, **given)
    return spec.runtime_class(
        service=spec.name,
        group=wiring.settings.group,
        inputs=spec.inputs(wiring.topics),
        processor=spec.make_processor(wiring),
        kafka=wiring.kafka,
        redis_settings=wiring.redis_settings,
        topics=wiring.topics,
        settings=wiring.runtime,
        registry=registry,
    )


def run_service(spec: ServiceSpec[Any]) -> int:
    """Run ``spec`` as this process until SIGTERM/SIGINT: logs, /metrics, a final
    checkpoint, then the processor's :meth:`~Processor.close`."""
    return run_runtime(spec.name, lambda registry: build_runtime(spec, registry))


def run_runtime(service: str, build: Callable[[CollectorRegistry], ConsumerRuntime]) -> int:
    """Configure logs, serve metrics, run the runtime ``build`` makes until SIGTERM/SIGINT."""
    logs.configure(service)
    settings = RuntimeSettings()
    registry = CollectorRegistry()
    server, _ = serve_metrics(registry, settings.metrics_port, settings.metrics_host)
    runtime = build(registry)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing the batch, checkpointing, stopping", signum)
        runtime.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runtime.run()
    finally:
        runtime.processor.close()
        server.shutdown()
        server.server_close()
    return 0
