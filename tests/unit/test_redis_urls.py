"""Which Redis client a URL gives, without a server: single node or cluster, options, db."""

from __future__ import annotations

import pytest
import redis
from redis.connection import SSLConnection
from redis.exceptions import RedisClusterException

from services.common.clients import (
    is_cluster_url,
    parse_cluster_url,
    redis_client,
    redis_from_url,
)
from services.common.settings import RedisSettings


@pytest.mark.parametrize(
    ("url", "cluster"),
    [
        ("redis://127.0.0.1:6379/0", False),
        ("rediss://redis:6380/2", False),
        ("unix:///run/redis.sock", False),
        ("redis+cluster://127.0.0.1:7000/0", True),
        ("REDISS+CLUSTER://a:7000,b:7001/", True),
    ],
)
def test_the_scheme_says_whether_a_url_names_a_cluster(url: str, cluster: bool) -> None:
    assert is_cluster_url(url) is cluster


def test_single_node_urls_give_a_plain_client_with_the_settings_options() -> None:
    settings = RedisSettings(url="rediss://app@redis:6380/3", password="pw", socket_timeout=1.5)
    client = redis_client(settings)  # connects lazily: no server needed
    try:
        assert type(client) is redis.Redis
        pool = client.connection_pool
        assert pool.connection_class is SSLConnection
        kwargs = pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis", 6380, 3)
        assert (kwargs["username"], kwargs["password"]) == ("app", "pw")
        assert kwargs["socket_timeout"] == 1.5
    finally:
        client.close()


def test_cluster_urls_list_their_startup_nodes_and_carry_credentials_and_tls() -> None:
    nodes, options = parse_cluster_url(
        "rediss+cluster://app:p%40ss@10.0.0.1:7000,node-2,[::1]:7002/0?socket_timeout=2"
    )
    assert nodes == [("10.0.0.1", 7000), ("node-2", 6379), ("::1", 7002)]
    assert options == {
        "username": "app",
        "password": "p@ss",
        "socket_timeout": 2.0,
        "connection_class": SSLConnection,
    }
    nodes, options = parse_cluster_url("redis+cluster://127.0.0.1:7000")
    assert nodes == [("127.0.0.1", 7000)] and options == {}


@pytest.mark.parametrize(
    "url",
    ["redis+cluster://127.0.0.1:7000/1", "redis+cluster://127.0.0.1:7000/0?db=2"],
)
def test_a_cluster_url_naming_another_database_than_0_is_refused(url: str) -> None:
    with pytest.raises(ValueError, match="only database 0"):
        redis_from_url(url)
    with pytest.raises(ValueError, match="only database 0"):
        redis_client(RedisSettings(url=url))


def test_a_cluster_url_with_a_db_option_or_without_nodes_is_refused() -> None:
    with pytest.raises(ValueError, match="only database 0"):
        redis_from_url("redis+cluster://127.0.0.1:7000/0", db=4)
    for url in ("redis+cluster:///0", "redis+cluster://a:7000,,b:7001/0"):
        with pytest.raises(ValueError, match="empty or invalid node"):
            parse_cluster_url(url)
    with pytest.raises(ValueError, match="not a Redis Cluster URL"):
        parse_cluster_url("redis://127.0.0.1:7000/0")


def test_a_cluster_url_builds_a_cluster_client() -> None:
    # A cluster client discovers the cluster as it is built; with no node there,
    # the cluster client (not a lazily connecting single-node one) says so.
    with pytest.raises(RedisClusterException, match="Redis Cluster cannot be connected"):
        redis_from_url("redis+cluster://127.0.0.1:1/0", socket_timeout=0.5)


def test_a_namespace_with_braces_is_refused() -> None:
    # A brace in the prefix would become the key's hash tag on a cluster, and a
    # group's epochs and checkpoints could land in different slots.
    with pytest.raises(ValueError, match="must not contain braces"):
        RedisSettings(namespace="a{b")
    assert RedisSettings(namespace="prod-v2").keys().checkpoint("g", 0) == "prod-v2:ckpt:{g}:0"
