"""The embedded stack: Apache Kafka, Redis and every service on one machine."""

from __future__ import annotations

from services.stack.kafka import EmbeddedKafka, start_broker, start_cluster
from services.stack.servers import (
    EmbeddedRedis,
    ManagedProcess,
    ServerError,
    free_port,
    start_redis,
)

__all__ = [
    "EmbeddedKafka",
    "EmbeddedRedis",
    "ManagedProcess",
    "ServerError",
    "free_port",
    "start_broker",
    "start_cluster",
    "start_redis",
]
