"""Session fixtures: a real Apache Kafka broker and a real Redis.

By default both are embedded (a single-node KRaft Apache Kafka and redis-server
on loopback, see services/stack) and started once per session. ``STREAMREC_KAFKA=host:port`` and ``STREAMREC_REDIS=redis://...``
point the same tests at existing servers instead.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from contracts.keys import KeySpace
from services.common.topics import ensure_topics
from services.stack.kafka import start_broker
from services.stack.servers import start_redis


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if env := os.environ.get("STREAMREC_KAFKA"):
        yield env
        return
    broker = start_broker(tmp_path_factory.mktemp("broker"))
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if env := os.environ.get("STREAMREC_REDIS"):
        yield env
        return
    server = start_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def keyspace() -> KeySpace:
    """A Redis namespace of this test's own."""
    return KeySpace(f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
def unique_name() -> Callable[[str], str]:
    """Makes names (topics, groups, models) unique to this test."""
    suffix = uuid.uuid4().hex[:8]
    return lambda base: f"{base}-{suffix}"


@pytest.fixture
def topic_factory(kafka_bootstrap: str, unique_name: Callable[[str], str]) -> Callable[..., str]:
    """Creates a uniquely named topic: ``topic_factory("clicks", partitions=4)``."""

    def create(base: str, partitions: int = 1) -> str:
        name = unique_name(base)
        ensure_topics({"bootstrap_servers": kafka_bootstrap}, {name: partitions})
        return name

    return create


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path
