"""The embedded stack: a Kafka-protocol broker, Redis and every service on one machine."""

from __future__ import annotations

from services.stack.servers import (
    EmbeddedBroker,
    EmbeddedRedis,
    ManagedProcess,
    ensure_topics,
    free_port,
    start_broker,
    start_redis,
)

__all__ = [
    "EmbeddedBroker",
    "EmbeddedRedis",
    "ManagedProcess",
    "ensure_topics",
    "free_port",
    "start_broker",
    "start_redis",
]
