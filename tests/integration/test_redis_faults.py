"""Redis faults with real processes: a blackholed Redis, and a Redis Cluster master failover.

test_faults covers a Redis that is stopped (connections refused) and restarted.
Here Redis does not go away cleanly:

* **blackhole**: the server is frozen with SIGSTOP. The kernel still accepts
  connections and buffers requests, but nothing answers, so every call hangs
  until the client's socket timeout (``REDIS_SOCKET_TIMEOUT``). A request that
  timed out is not a request that failed: one that was already sent on an
  open connection runs when the server resumes, after the client gave up on it.
* **failover**: the master that holds the model's slot (and the checkpoints') is
  SIGKILLed in a Redis Cluster with replicas; a replica is promoted with
  whatever the asynchronous replication had copied, so the last writes the
  master acknowledged may be gone.

The reference for every check is the single-process LinUCB model computed
in-process from the same feedback (see test_bandit_loop): the published model
must equal it within 1e-9, so a lost or a double-applied event fails the test.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis.crc import key_slot

from contracts.keys import KeySpace
from services.common.checkpoint import CheckpointStore
from services.common.clients import REDIS_ERRORS, redis_client, redis_from_url
from services.common.settings import RedisSettings
from services.paramstore import ParamStore, ParamWatcher
from services.serving.policies import watch_learner
from services.stack.redis_cluster import EmbeddedRedisCluster, start_redis_cluster
from services.stack.servers import start_redis
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import (
    _applied,
    _assert_same_model,
    _env,
    _feedback_stream,
    _produce,
    _published,
    _reference,
)
from tests.integration.test_faults import _assignments, _create, _topic_names

pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: The model every test publishes (the one policy of test_bandit_loop's POLICIES).
MODEL = "linucb"
#: What the bandits service logs when a checkpoint, or the publish after it, failed.
CHECKPOINT_FAILED = "checkpoint failed (will retry)"
#: Records the service has consumed (applied in memory, checkpointed or not).
CONSUMED = "streamrec_consumer_events_total"


def _counts(watcher: ParamWatcher) -> float:
    """Feedback applied in the version the watcher is serving."""
    return float(watcher.current()[1].state()["counts"].sum())


def _stale_gauge(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value("streamrec_params_reader_stale", {"model": MODEL})


def _freeze_after_a_checkpoint(client: redis.Redis, keys: KeySpace, pid: int) -> None:
    """SIGSTOP Redis (``pid``) as soon as the next checkpoint has been written.

    That is the moment the service is about to publish what it checkpointed:
    the publish, not the checkpoint, is the call that meets the blackhole.
    Keyspace notifications of the checkpoint hashes say when it was written; a
    short GIL switch interval lets this thread act on one at once, ahead of the
    producer thread (the service needs a millisecond or two to send the publish).
    """
    client.config_set("notify-keyspace-events", "Kh")
    events = client.pubsub(ignore_subscribe_messages=True)
    events.psubscribe(f"__keyspace@0__:{keys.namespace}:ckpt:*")
    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if events.get_message(timeout=1.0) is not None:
                os.kill(pid, signal.SIGSTOP)
                return
        raise AssertionError("no checkpoint written in 30 s")
    finally:
        sys.setswitchinterval(switch)
        events.close()


def _scrape(log: Path, sample: str) -> float:
    """A sample of the service's own /metrics (its port is in its log); 0 if absent."""
    port = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
    assert port is not None, "the service logs its metrics port"
    with urllib.request.urlopen(f"http://127.0.0.1:{port[1]}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    found = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample
    ]
    return sum(found)


def test_a_blackholed_redis_times_out_and_every_feedback_is_applied_once_when_it_answers(
    kafka_bootstrap, unique_name, tmp_path
):
    """SIGSTOP Redis mid-stream, right after a checkpoint was written; SIGCONT it 6 s later.

    While it is frozen the bandits service keeps consuming. The publish that
    follows the checkpoint times out (``REDIS_SOCKET_TIMEOUT``, 1 s here), and
    so do the checkpoints after it: each is logged, counted
    (``streamrec_consumer_checkpoint_failures_total``) and retried; the service
    neither hangs nor exits. A reader keeps serving the version it had and
    reports itself stale. After SIGCONT every feedback is applied exactly once,
    even though Redis then runs the requests that timed out on connections
    opened before the freeze, and the reader follows.
    """
    server = start_redis(tmp_path / "redis")
    keys = KeySpace(unique_name("blackhole"))
    settings = RedisSettings(url=server.url, namespace=keys.namespace, socket_timeout=1.0)
    # The test's own reads, and a reader configured as serving configures its own.
    probe, reader = redis_client(settings), redis_client(settings)
    store = ParamStore(probe, keys=keys)
    registry = CollectorRegistry()
    watcher = watch_learner(
        ParamStore(reader, keys=keys, registry=registry), MODEL, "linucb", registry=registry
    )
    topics = _topic_names(unique_name)
    _create(kafka_bootstrap, topics)
    feedback = _feedback_stream(30_000, seed=14)
    log = tmp_path / "b.log"
    env = _env(kafka_bootstrap, server.url, keys, unique_name("bandits"), **topics)
    bandits = ServiceProcess("bandits", env | {"REDIS_SOCKET_TIMEOUT": "1"}, log).start()
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topics["feedback"], feedback, 3000.0)
    )
    frozen = False
    try:
        producer.start()
        wait_for(
            lambda: _applied(store) > 4_000 and watcher.version is not None,
            60,
            "progress before the freeze",
        )
        _freeze_after_a_checkpoint(probe, keys, server.process.pid)
        frozen, frozen_at = True, time.monotonic()
        consumed = _scrape(log, CONSUMED)
        # Each blackholed call fails after the socket timeout (1 s).
        wait_for(lambda: watcher.stale, 20, "the reader to notice Redis does not answer")
        serving_version, served = watcher.current()[0], _counts(watcher)
        assert _stale_gauge(registry) == 1.0
        wait_for(
            lambda: CHECKPOINT_FAILED in log.read_text() or not bandits.alive(),
            20,
            "a checkpoint to time out",
        )
        assert bandits.alive(), "the service must ride out a blackholed Redis"
        time.sleep(max(0.0, frozen_at + 6 - time.monotonic()))
        assert bandits.alive(), "the service must ride out a blackholed Redis"
        assert _scrape(log, "streamrec_consumer_checkpoint_failures_total") >= 1
        assert _scrape(log, CONSUMED) > consumed, "the service consumes on while Redis hangs"
        assert watcher.current()[0] == serving_version and _counts(watcher) == served
        assert 0 < served < len(feedback)

        server.process.signal(signal.SIGCONT)
        frozen = False
        producer.join()
        wait_for(lambda: _applied(store) == len(feedback), 120, "all feedback applied")
        # A stale checkpoint or publish run late, or a double application, would show here.
        time.sleep(2.0)
        assert _applied(store) == len(feedback)
        _assert_same_model(_published(store)[1], _reference(feedback))
        wait_for(lambda: not watcher.stale, 30, "the reader to recover")
        wait_for(lambda: _counts(watcher) == len(feedback), 30, "the reader on the newest params")
        assert watcher.version is not None and watcher.version > serving_version
        assert _stale_gauge(registry) == 0.0
        assert bandits.alive()
    finally:
        if frozen:
            server.process.signal(signal.SIGCONT)
        if producer.is_alive():
            producer.join()
        watcher.close(5)
        bandits.stop()
        probe.close()
        reader.close()
        server.stop()
    assert "Traceback" not in log.read_text()


@pytest.fixture
def replicated_cluster(tmp_path: Path) -> Iterator[EmbeddedRedisCluster]:
    """Three masters with a replica each; a dead master is replaced within seconds."""
    cluster = start_redis_cluster(
        tmp_path / "redis-cluster", masters=3, replicas=1, node_timeout_ms=1000
    )
    try:
        yield cluster
    finally:
        cluster.stop()


def _group_on(cluster: EmbeddedRedisCluster, keys: KeySpace, node: int, name: Callable) -> str:
    """A consumer group name whose checkpoints live on master ``node``."""
    for i in range(10_000):
        group = name(f"bandits{i}")
        if cluster.node_of_slot(key_slot(keys.checkpoint_epochs(group).encode())) == node:
            return group
    raise AssertionError(f"no group name lands on node {node}")


def _try(read: Callable[[], int], default: int = -1) -> Callable[[], int]:
    """``read``, or ``default`` while the cluster cannot answer (a failover)."""

    def attempt() -> int:
        try:
            return read()
        except REDIS_ERRORS:
            return default

    return attempt


def _replication_offset(node: redis.Redis) -> int:
    """How many bytes of writes the node has sent to its replication stream."""
    return int(node.info("replication")["master_repl_offset"])


def test_a_killed_master_fails_over_to_a_replica_without_its_last_writes_and_stays_exact(
    kafka_bootstrap, replicated_cluster, unique_name, tmp_path
):
    """SIGKILL the master that holds the model and the checkpoints, mid-stream, after it
    acknowledged checkpoints and publishes its replica never got, together with one
    of the two bandits processes.

    Replication is asynchronous; to lose the tail for sure, the replica is frozen
    and its link dropped before the kill, so the master alone acknowledges
    newer checkpoints of every partition of the process killed with it (and
    publishes). The replica is then let go and promoted (cluster-node-timeout
    1 s) with the older state. The surviving process rides out the failover
    and takes over the dead one's partitions from the older checkpoints the
    promoted replica holds. Each checkpoint is state and offsets written
    together, so re-reading from an earlier one is exact: the published model
    ends equal to a single LinUCB fed every feedback once.
    """
    cluster = replicated_cluster
    keys = KeySpace(unique_name("failover"))
    client, reader = redis_from_url(cluster.url), redis_from_url(cluster.url)
    store = ParamStore(client, keys=keys)
    slot = int(client.cluster_keyslot(keys.params_current(MODEL)))
    assert slot == key_slot(keys.params_current(MODEL).encode())
    victim = cluster.node_of_slot(slot)
    (replica,) = cluster.replicas_of(victim)
    master = redis.Redis(host="127.0.0.1", port=cluster.nodes[victim], socket_timeout=2.0)
    group = _group_on(cluster, keys, victim, unique_name)
    checkpoints = CheckpointStore(client, keys, group)
    registry = CollectorRegistry()
    watcher = watch_learner(
        ParamStore(reader, keys=keys, registry=registry), MODEL, "linucb", registry=registry
    )
    topics = _topic_names(unique_name)
    _create(kafka_bootstrap, topics)
    feedback = _feedback_stream(30_000, seed=15)
    logs = tmp_path / "b1.log", tmp_path / "b2.log"
    env = _env(kafka_bootstrap, cluster.url, keys, group, **topics)
    survivor = ServiceProcess("bandits", env, logs[0]).start()
    doomed = ServiceProcess("bandits", env, logs[1]).start()
    producer = threading.Thread(
        target=_produce, args=(kafka_bootstrap, topics["feedback"], feedback, 3000.0)
    )
    applied = _try(lambda: _applied(store))

    def offsets(parts: list[int]) -> dict[int, int]:
        found = checkpoints.load(parts)
        return {p: sum(found[p].offsets.values()) if p in found else 0 for p in parts}

    replica_frozen = False
    try:
        wait_for(
            lambda: all(_assignments(log) and _assignments(log)[-1] for log in logs),
            60,
            "both processes to own partitions",
        )
        producer.start()
        wait_for(lambda: applied() > 5_000, 60, "progress before the kill")
        parts = [int(p) for p in _assignments(logs[1])[-1].split(", ")]
        cluster.processes[replica].signal(signal.SIGSTOP)
        replica_frozen = True
        master.execute_command("CLIENT", "KILL", "TYPE", "replica")
        cut, at_cut = _replication_offset(master), offsets(parts)
        version = store.current_version(MODEL) or 0
        wait_for(
            lambda: (
                all(o > at_cut[p] for p, o in offsets(parts).items())
                and (store.current_version(MODEL) or 0) > version
            ),
            30,
            "checkpoints and publishes only the master has",
        )
        unreplicated = _replication_offset(master) - cut
        killed_at = applied()
        doomed.kill()
        cluster.kill_node(victim)
        cluster.processes[replica].signal(signal.SIGCONT)
        replica_frozen = False
        assert cluster.wait_failover(victim) == replica
        assert cluster.node_of_slot(slot) == replica
        assert unreplicated > 0, "the master must have acknowledged writes the replica lacks"
        assert survivor.alive(), "the service must ride out a failover"
        wait_for(
            lambda: _assignments(logs[0])[-1] == "0, 1, 2, 3",
            60,
            "the survivor to take over from the older checkpoints",
        )
        producer.join()
        wait_for(lambda: applied() == len(feedback), 120, "all feedback applied")
        time.sleep(1.5)  # a double application would show in later publishes
        assert applied() == len(feedback)
        _assert_same_model(_published(store)[1], _reference(feedback))
        wait_for(lambda: _counts(watcher) == len(feedback), 30, "the reader on the newest params")
        assert not watcher.stale
        assert survivor.alive()
    finally:
        if replica_frozen:
            cluster.processes[replica].signal(signal.SIGCONT)
        if producer.is_alive():
            producer.join()
        watcher.close(5)
        survivor.stop()
        if doomed.alive():
            doomed.stop()
        master.close()
        client.close()
        reader.close()
    assert 0 < killed_at < len(feedback) * 0.8, "the kill must land mid-stream"
    assert "Traceback" not in logs[0].read_text()
