"""Prometheus metrics of the consumer runtime, registered in an injected registry.

Names follow ``streamrec_<area>_<what>[_<unit>]`` (docs/operations.md, "What each
panel means"), counters declared with their ``_total`` suffix so the declared name
is the scraped one (tests/unit/test_metric_names.py); the runtime's series are
shared by every service and carry a ``service`` label.
"""

from __future__ import annotations

import logging
import threading
import weakref
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from contracts.features import HashedFeatures

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class ConsumerMetrics:
    """The series every consumer service exposes."""

    def __init__(self, registry: CollectorRegistry, service: str) -> None:
        self.service = service
        self.events = Counter(
            "streamrec_consumer_events_total",
            "Records consumed, by outcome (applied, dead_letter, duplicate, control, rebuilt).",
            ["service", "topic", "outcome"],
            registry=registry,
        )
        self.dead_letters = Counter(
            "streamrec_consumer_dead_letters_total",
            "Records sent to the dead-letter topic, by reason category.",
            ["service", "reason"],
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "streamrec_consumer_batch_seconds",
            "Time to decode and apply one polled batch.",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.batch_records = Histogram(
            "streamrec_consumer_batch_records",
            "Records per polled batch.",
            ["service"],
            buckets=(1, 10, 100, 500, 1000, 2000, 5000, 10000),
            registry=registry,
        )
        self.lag = Gauge(
            "streamrec_consumer_lag_records",
            "High watermark of the last fetch minus the consumed position, per partition.",
            ["service", "topic", "partition"],
            registry=registry,
        )
        self.checkpoint_seconds = Histogram(
            "streamrec_consumer_checkpoint_seconds",
            "Time to write one checkpoint (state + offsets) to Redis.",
            ["service"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.checkpoint_timestamp = Gauge(
            "streamrec_consumer_checkpoint_timestamp_seconds",
            "Unix time of the last successful checkpoint (age = time() - this).",
            ["service"],
            registry=registry,
        )
        self.checkpoint_failures = Counter(
            "streamrec_consumer_checkpoint_failures_total",
            "Checkpoints that could not be written (Redis unreachable, ...).",
            ["service"],
            registry=registry,
        )
        self.send_failures = Counter(
            "streamrec_consumer_send_failures_total",
            "Emitted or dead-lettered records Kafka did not acknowledge (the service then "
            "exits without checkpointing their input, and a restart re-emits them).",
            ["service"],
            registry=registry,
        )
        self.poll_errors = Counter(
            "streamrec_consumer_poll_errors_total",
            "Polls that failed on a retriable Kafka error (broker unreachable, ...); retried.",
            ["service"],
            registry=registry,
        )
        self.out_of_range = Counter(
            "streamrec_consumer_offsets_out_of_range_total",
            "Positions Kafka no longer had: behind the log start (deleted by retention) or "
            "ahead of the log end (log truncated or topic recreated).",
            ["service", "topic", "where"],
            registry=registry,
        )
        self.skipped = Counter(
            "streamrec_consumer_records_skipped_total",
            "Records never applied because Kafka deleted them before they were read.",
            ["service", "topic"],
            registry=registry,
        )
        self.paused = Gauge(
            "streamrec_consumer_paused_partitions",
            "Partitions paused because their checkpoint is past the log end "
            "(STREAMREC_RUNTIME_OFFSET_RESET=pause) until an operator acts.",
            ["service"],
            registry=registry,
        )
        self.assigned = Gauge(
            "streamrec_consumer_assigned_partitions",
            "Partition numbers this process owns.",
            ["service"],
            registry=registry,
        )
        self.rebalances = Counter(
            "streamrec_consumer_rebalances_total",
            "Partition assignments, revocations, losses (eviction) and fenced checkpoints.",
            ["service", "kind"],
            registry=registry,
        )


class FeatureHashMetrics:
    """Named features hashed into context vectors (:mod:`contracts.features`), by app.

    ``streamrec_features_collisions_total / streamrec_features_hashed_total`` is the
    collision rate: the share of tokens that shared a bucket with another token of
    the same request. A high rate says the context dimension is too small for the
    features clients send.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.hashed = Counter(
            "streamrec_features_hashed_total",
            "Distinct named-feature tokens hashed into context vectors, by app.",
            ["app"],
            registry=registry,
        )
        self.collisions = Counter(
            "streamrec_features_collisions_total",
            "Hashed tokens that landed in a bucket another token of the same request used, by app.",
            ["app"],
            registry=registry,
        )

    def count(self, app: str, hashed: HashedFeatures) -> None:
        self.hashed.labels(app).inc(hashed.tokens)
        if hashed.collisions:
            self.collisions.labels(app).inc(hashed.collisions)


_HASH_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, FeatureHashMetrics] = (
    weakref.WeakKeyDictionary()
)
_HASH_METRICS_LOCK = threading.Lock()


def feature_hash_metrics(registry: CollectorRegistry) -> FeatureHashMetrics:
    """The feature-hashing series of ``registry``, created on first use."""
    with _HASH_METRICS_LOCK:
        metrics = _HASH_METRICS.get(registry)
        if metrics is None:
            metrics = _HASH_METRICS[registry] = FeatureHashMetrics(registry)
        return metrics


def serve_metrics(
    registry: CollectorRegistry, port: int = 0, host: str = "127.0.0.1"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` for ``registry``; port 0 picks a free port (see ``server_port``)."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server, thread
