"""Thin factories for Kafka and Redis clients built from typed settings.

Redis URLs name a single server (``redis://``, ``rediss://`` for TLS) or a Redis
Cluster (``redis+cluster://host:port[,host:port...]/0``, ``rediss+cluster://``
for TLS): :func:`redis_from_url` returns :class:`redis.Redis` or
:class:`redis.cluster.RedisCluster` accordingly, and every streamrec component
builds its Redis client through it.

>>> is_cluster_url("redis+cluster://10.0.0.1:7000,10.0.0.2:7000/0")
True
"""

from __future__ import annotations

from typing import Any

import redis
from kafka import KafkaConsumer, KafkaProducer
from kafka.coordinator.assignors.range import RangePartitionAssignor
from redis.cluster import ClusterNode, RedisCluster
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

from services.common.settings import KafkaSettings, RedisSettings

#: Cluster URL schemes and the single-server scheme each one's nodes speak.
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}
_DEFAULT_PORT = 6379

#: What a Redis call raises when Redis is unreachable or failing: besides
#: :class:`redis.RedisError`, the cluster client raises
#: :class:`~redis.exceptions.RedisClusterException` subclasses that are not
#: RedisErrors, e.g. when no node of the cluster answers.
REDIS_ERRORS: tuple[type[Exception], ...] = (redis.RedisError, RedisClusterException)


def redis_client(settings: RedisSettings, **overrides: Any) -> redis.Redis | RedisCluster:
    """A Redis client from settings; see :func:`redis_from_url` for the URL schemes."""
    options: dict[str, Any] = {"socket_timeout": settings.socket_timeout}
    if settings.username:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if settings.ssl_ca_certs:
        options["ssl_ca_certs"] = settings.ssl_ca_certs
    options.update(overrides)
    return redis_from_url(settings.url.get_secret_value(), **options)


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return url.partition("://")[0].lower() in CLUSTER_SCHEMES


def redis_from_url(url: str, **options: Any) -> redis.Redis | RedisCluster:
    """A client for ``url``: :class:`redis.Redis`, or :class:`RedisCluster` for a cluster URL.

    See :func:`parse_cluster_url` for cluster URLs. Options in the URL win over
    ``options``, as with :meth:`redis.Redis.from_url`.
    """
    if not is_cluster_url(url):
        return redis.Redis.from_url(url, **options)
    nodes, url_options = parse_cluster_url(url)
    db = options.pop("db", 0)
    if db != 0:
        raise ValueError(f"Redis Cluster has only database 0, not {db}")
    startup = [ClusterNode(host, port) for host, port in nodes]
    return RedisCluster(startup_nodes=startup, **(options | url_options))


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """The ``(host, port)`` nodes a cluster URL lists and the connection options it carries.

    The nodes are where the client starts to discover the cluster (any one
    reachable node will do; port 6379 where none is given). The rest of the URL
    reads as a ``redis://`` (``rediss://``) URL does, and applies to every node:
    credentials, TLS, query options. A cluster has only database 0, so a path
    or ``db`` option naming another is a :class:`ValueError`.

    >>> nodes, options = parse_cluster_url(
    ...     "rediss+cluster://app:pw@10.0.0.1:7000,[::1]/0?socket_timeout=2")
    >>> nodes
    [('10.0.0.1', 7000), ('::1', 6379)]
    >>> sorted(options), options["connection_class"].__name__
    (['connection_class', 'password', 'socket_timeout', 'username'], 'SSLConnection')
    """
    scheme, _, rest = url.partition("://")
    base = CLUSTER_SCHEMES.get(scheme.lower())
    if base is None:
        raise ValueError(f"not a Redis Cluster URL scheme: {scheme!r}")
    end = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    userinfo, at, hosts = rest[:end].rpartition("@")
    nodes = [_node(base, host) for host in hosts.split(",")]
    options = parse_url(f"{base}://{userinfo}{at}{hosts.split(',', 1)[0]}{rest[end:]}")
    for name in ("host", "port"):
        options.pop(name, None)
    db = options.pop("db", 0)
    if db != 0:
        raise ValueError(f"Redis Cluster has only database 0, but the Redis URL names {db}")
    return nodes, options


def _node(scheme: str, host: str) -> tuple[str, int]:
    parsed = parse_url(f"{scheme}://{host}") if host else {}
    if "host" not in parsed:
        raise ValueError(f"Redis Cluster URL lists an empty or invalid node: {host!r}")
    return str(parsed["host"]), int(parsed.get("port", _DEFAULT_PORT))


def producer(settings: KafkaSettings, **overrides: Any) -> KafkaProducer:
    """An idempotent producer with ``acks=all``: retries never duplicate or reorder a
    record, and a record fails only after ``delivery_timeout_ms``."""
    options: dict[str, Any] = settings.common() | {
        "acks": "all",
        "enable_idempotence": True,
        "linger_ms": settings.linger_ms,
        "delivery_timeout_ms": settings.delivery_timeout_ms,
    }
    options.update(overrides)
    return KafkaProducer(**options)


def consumer(settings: KafkaSettings, group_id: str | None, **overrides: Any) -> KafkaConsumer:
    """A manually committing consumer; the range assignor keeps topics co-partitioned."""
    options: dict[str, Any] = settings.common() | {
        "group_id": group_id,
        "enable_auto_commit": False,
        # Positions come from checkpoints; one Kafka no longer has is the runtime's to
        # handle (and count), never a silent reset.
        "auto_offset_reset": "none",
        "fetch_max_wait_ms": settings.fetch_max_wait_ms,
        "max_poll_interval_ms": settings.max_poll_interval_ms,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
        "max_partition_fetch_bytes": settings.max_partition_fetch_bytes,
        "partition_assignment_strategy": [RangePartitionAssignor],
    }
    options.update(overrides)
    return KafkaConsumer(**options)
