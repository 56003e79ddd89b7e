"""Thin factories for Kafka and Redis clients built from typed settings."""

from __future__ import annotations

from typing import Any

import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.range import RangePartitionAssignor

from services.common.settings import KafkaSettings, RedisSettings


def redis_client(settings: RedisSettings, **overrides: Any) -> redis.Redis:
    """A Redis client from settings; the URL may be ``rediss://`` for TLS."""
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout}
    if settings.username:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.ssl_ca_certs:
        options["ssl_ca_certs"] = settings.ssl_ca_certs
    options.update(overrides)
    return redis.Redis.from_url(settings.url.get_secret_value(), **options)


def producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """A producer with ``acks=all`` and idempotence-friendly retries by default."""
    options: dict[str, Any] = settings.common() | {
        "acks": "all",
        "linger_ms": settings.linger_ms,
        "retries": 5,
        "max_in_flight_requests_per_connection": 1,
    }
    options.update(overrides)
    return KafkaProducer(**options)


def consumer(settings: KafkaSettings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A manually committing consumer; the range assignor keeps topics co-partitioned."""
    options: dict[str, Any] = settings.common() | {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_partition_fetch_bytes": settings.max_partition_fetch_bytes,
        "partition_assignment_strategy": [RangePartitionAssignor],
    }
    options.update(overrides)
    return KafkaConsumer(**options)
