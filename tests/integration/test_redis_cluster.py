"""Every Redis code path of streamrec against a real 3-master Redis Cluster.

The cluster is embedded (:func:`services.stack.redis_cluster.start_redis_cluster`)
and reached through a ``redis+cluster://`` URL, as a deployment would configure
``REDIS_URL``. Names are picked so that the state under test spreads over all
three masters; the key layout tests ask the servers themselves (``CLUSTER
KEYSLOT``, ``CLUSTER GETKEYSINSLOT``) where the keys went.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from prometheus_client import CollectorRegistry
from redis.backoff import ExponentialBackoff
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import CrossSlotTransactionError, RedisClusterException
from redis.retry import Retry
from redis.utils import str_if_bytes

from contracts.events import Click
from contracts.keys import KeySpace
from contracts.params import encode_params
from services.bandits import LinUCB, learner_from_params
from services.catalog import CandidateFeed, publish_catalog, write_ranked
from services.common.checkpoint import Checkpoint, CheckpointStore, Fenced
from services.common.clients import REDIS_ERRORS, redis_client, redis_from_url
from services.common.runtime import Record
from services.common.settings import RedisSettings
from services.index import IndexSpec, ReloadableIndex, SnapshotStore, build_index, publish
from services.index.snapshot import SnapshotError, read_pointer
from services.paramstore import ParamStore, ParamWatcher
from services.sequences.reader import Sequences
from services.sequences.store import SequenceStore
from services.simulator.driver import publish_world_catalog
from services.simulator.world import World, WorldConfig
from services.stack.redis_cluster import (
    EmbeddedRedisCluster,
    cluster_info,
    slot_ranges,
    start_redis_cluster,
)

pytestmark = pytest.mark.integration
MASTERS = 3
T0 = 1_700_000_000.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedisCluster]:
    started = start_redis_cluster(tmp_path_factory.mktemp("redis-cluster"), masters=MASTERS)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(cluster: EmbeddedRedisCluster) -> Iterator[RedisCluster]:
    made = redis_from_url(cluster.url)
    assert isinstance(made, RedisCluster)
    try:
        yield made
    finally:
        made.close()


def one_per_node(
    cluster: EmbeddedRedisCluster, key_of: Callable[[str], str], base: str
) -> list[str]:
    """Names ``base-N`` whose keys (``key_of(name)``) land on master 0, 1, ... in turn."""
    found: dict[int, str] = {}
    for i in range(10_000):
        name = f"{base}-{i}"
        found.setdefault(cluster.node_of_slot(key_slot(key_of(name).encode())), name)
        if len(found) == len(cluster.nodes):
            return [found[node] for node in range(len(cluster.nodes))]
    raise AssertionError(f"no names of {base!r} cover every node")


def node_of(cluster: EmbeddedRedisCluster, client: RedisCluster, key: str) -> int:
    """The master that holds ``key``, by the server's own CLUSTER KEYSLOT."""
    return cluster.node_of_slot(int(client.cluster_keyslot(key)))


def eventually(check: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def next_update(subscriber: redis.client.PubSub, timeout: float = 10.0) -> int | None:
    """The next version published on a subscribed channel (None on timeout)."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        message = subscriber.get_message(timeout=left)
        if message is not None and message["type"] == "message":
            return int(message["data"])
    return None


def blob(model: str, value: float) -> bytes:
    return encode_params(model, 0, {"x": np.full(4, value)})


def clicks(users: list[str], per_user: int) -> list[Record]:
    """``per_user`` clicks for each user, interleaved, as records of one partition."""
    out: list[Record] = []
    for n in range(per_user):
        for user in users:
            click = Click(event_id=f"e{n}-{user}", user_id=user, item_id=f"i{n}", ts=T0 + n)
            out.append(Record("clicks", 0, len(out), user.encode(), click, 0))
    return out


# -- the cluster itself and client selection ---------------------------------------------


def test_the_embedded_cluster_has_three_agreeing_masters(cluster: EmbeddedRedisCluster) -> None:
    views = []
    for port in cluster.nodes:
        node = redis.Redis(host="127.0.0.1", port=port, decode_responses=True)
        try:
            info = cluster_info(node)
            assert info["cluster_state"] == "ok"
            assert info["cluster_known_nodes"] == str(MASTERS)
            assert info["cluster_slots_assigned"] == "16384"
            views.append(sorted(map(tuple, node.execute_command("CLUSTER", "SLOTS"))))
        finally:
            node.close()
    assert all(view == views[0] for view in views)
    assert [(start, end) for start, end, *_ in views[0]] == slot_ranges(MASTERS)


def test_cluster_urls_give_a_cluster_client_with_the_settings_options(
    cluster: EmbeddedRedisCluster,
) -> None:
    settings = RedisSettings(url=cluster.url, socket_timeout=2.5)
    made = redis_client(settings)
    try:
        assert isinstance(made, RedisCluster)
        assert made.get_connection_kwargs()["socket_timeout"] == 2.5
        assert {node.port for node in made.get_primaries()} == set(cluster.nodes)
        assert made.ping()
    finally:
        made.close()
    # One node is enough to discover the rest.
    first = f"redis+cluster://127.0.0.1:{cluster.nodes[0]}/"
    made = redis_from_url(first)
    try:
        assert isinstance(made, RedisCluster) and len(made.get_primaries()) == MASTERS
    finally:
        made.close()
    with pytest.raises(ValueError, match="only database 0"):
        redis_from_url(f"redis+cluster://127.0.0.1:{cluster.nodes[0]}/1")
    # A plain URL to a cluster node stays a single-node client, which is redirected.
    plain = redis_from_url(f"redis://127.0.0.1:{cluster.nodes[0]}/0")
    try:
        assert type(plain) is redis.Redis
        elsewhere = one_per_node(cluster, str, "key")[1]
        with pytest.raises(redis.ResponseError, match=f"{cluster.nodes[1]}"):
            plain.get(elsewhere)
    finally:
        plain.close()


# -- checkpoints -------------------------------------------------------------------------


def test_checkpoint_claim_save_fence_and_clear_on_the_cluster(
    cluster: EmbeddedRedisCluster, client: RedisCluster, keyspace: KeySpace
) -> None:
    groups = one_per_node(cluster, lambda g: keyspace.checkpoint(g, 0), "group")
    for group in groups:
        first = CheckpointStore(client, keyspace, group)
        second = CheckpointStore(client, keyspace, group)
        found, epochs = first.claim([0, 1, 2])
        assert found == {} and epochs == {0: 1, 1: 1, 2: 1}
        first.save({p: Checkpoint(offsets={"t": 10 + p}, state=b"a", epoch=1) for p in (0, 1, 2)})
        assert first.load([0, 1, 2])[2].offsets == {"t": 12}

        found, epochs = second.claim([1])
        assert epochs == {1: 2} and found[1].offsets == {"t": 11} and found[1].state == b"a"
        with pytest.raises(Fenced) as fenced:
            first.save({p: Checkpoint(offsets={"t": 20}, epoch=1) for p in (0, 1)})
        assert fenced.value.partitions == [1]
        assert first.load([0])[0].offsets == {"t": 10}, "all or nothing"
        second.save({1: Checkpoint(offsets={"t": 30}, state=b"b", epoch=2)})
        assert first.load([1])[1].state == b"b"

    # clear() scans every master and deletes this group's checkpoints only, not its epochs.
    assert CheckpointStore(client, keyspace, groups[0]).clear() == 3
    for group in groups[1:]:
        assert sorted(CheckpointStore(client, keyspace, group).load([0, 1, 2])) == [0, 1, 2]
    found, epochs = CheckpointStore(client, keyspace, groups[0]).claim([0, 1])
    assert found == {} and epochs == {0: 2, 1: 3}


# -- the parameter store ---------------------------------------------------------------


def test_every_key_of_one_model_lands_in_one_slot(
    cluster: EmbeddedRedisCluster, client: RedisCluster, keyspace: KeySpace
) -> None:
    store = ParamStore(client, keys=keyspace, keep_versions=2, blob_ttl_s=60)
    models = one_per_node(cluster, keyspace.params_current, "model")
    for model in models:
        for n in range(4):  # replaced blobs, pruned manifests, fences
            store.publish(model, {"p0": blob(model, n)}, fence={"p0": n + 1}, owner="g")
            store.publish(model, {"p1": blob(model, n)})
        store.rollback(model, reason="the pin is in the model's slot too")
    found: dict[str, list[str]] = {}
    for key in client.scan_iter(f"{keyspace.namespace}:params:*"):
        found.setdefault(key.decode().split("{")[1].split("}")[0], []).append(key.decode())
    assert sorted(found) == sorted(models)
    for index, model in enumerate(models):
        keys = found[model]
        kinds = {key.split("}:")[1].split(":")[0] for key in keys}
        assert kinds == {
            "current",
            "parts",
            "fence",
            "manifest",
            "blob",
            "history",
            "refs",
            "sizes",
            "retention",
            "pin",
        }
        slots = {int(client.cluster_keyslot(key)) for key in keys}
        assert len(slots) == 1, f"{model}: keys over slots {slots}"
        (slot,) = slots
        assert cluster.node_of_slot(slot) == index
        # Asked of the master that owns the slot: these keys are all there.
        in_slot = {str_if_bytes(k) for k in client.cluster_get_keys_in_slot(slot, 999)}
        assert {key for key in in_slot if key.startswith(f"{keyspace.namespace}:")} == set(keys)
    # The one cross-model key, outside the scripts, is a plain set.
    assert store.models() == sorted(models)


def test_paramstore_publish_then_latest_and_learner_read_on_every_master(
    cluster: EmbeddedRedisCluster, client: RedisCluster, keyspace: KeySpace
) -> None:
    store = ParamStore(client, keys=keyspace)
    rng = np.random.default_rng(3)
    for model in one_per_node(cluster, keyspace.params_current, "linucb"):
        whole = LinUCB(dim=3, alpha=0.5, seed=1)
        for partition in (0, 1):
            items, X = rng.integers(0, 5, size=40), rng.normal(size=(40, 3))
            rewards = (rng.random(40) < 0.3).astype(float)
            whole.update(items, X, rewards)
            part = LinUCB(dim=3, alpha=0.5, seed=1)
            part.update(items, X, rewards)
            state = encode_params(model, 1, part.state(), meta={"learner": "linucb"})
            assert store.publish(model, {f"p{partition}": state}) == partition + 1
        assert store.versions(model) == [1, 2]
        version, header, arrays = store.latest(model, combine=LinUCB.merge)
        assert version == 2 and header["parts"] == ["p0", "p1"]
        assert store.head(model) == (2, header["digest"])
        learner = learner_from_params(version, header, arrays, seed=1)
        probe = rng.normal(size=(5, 3))
        np.testing.assert_allclose(
            learner.score(np.arange(5), probe), whole.score(np.arange(5), probe), rtol=1e-9
        )


def test_paramstore_from_a_cluster_url(cluster: EmbeddedRedisCluster, keyspace: KeySpace) -> None:
    with ParamStore.from_url(cluster.url, keys=keyspace) as store:
        assert store.publish("m", {"main": blob("m", 7.0)}) == 1
        assert store.latest("m")[2]["x"][0] == 7.0
    with ParamStore.from_settings(
        RedisSettings(url=cluster.url, namespace=keyspace.namespace)
    ) as store:
        assert store.current_version("m") == 1


def test_watcher_hot_reloads_and_publishes_reach_subscribers(
    cluster: EmbeddedRedisCluster,
    client: RedisCluster,
    keyspace: KeySpace,
    unique_name: Callable[[str], str],
) -> None:
    model = unique_name("hot")
    store = ParamStore(client, keys=keyspace)
    # The channel shares the model's hash tag; PUBLISH in the script reaches every node.
    subscriber = client.pubsub()
    subscriber.subscribe(keyspace.params_channel(model))
    try:
        with ParamWatcher(store, model, poll_interval_s=0.05) as watcher:
            for value in (1.0, 2.0, 3.0):
                published = store.publish(model, {"main": blob(model, value)})
                assert watcher.wait_for_version(published, timeout=30)
                assert watcher.current()[1][1]["x"][0] == value
                assert next_update(subscriber) == published
    finally:
        subscriber.close()


# -- index pointer, candidates, catalog, sequences -------------------------------------


def test_index_pointer_publish_read_and_reload(
    cluster: EmbeddedRedisCluster, client: RedisCluster, keyspace: KeySpace, tmp_path: Path
) -> None:
    snapshots = SnapshotStore(tmp_path / "snapshots")
    spec = IndexSpec(kind="flat", metric="l2")
    vectors = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)
    ids = [f"item{i}" for i in range(50)]
    names = one_per_node(cluster, keyspace.index_current, "idx")
    keys = [keyspace.index_current(name) for name in names]
    for key in keys:
        assert read_pointer(client, key) is None
    first = snapshots.write(build_index(spec, vectors), ids, spec, 1)
    second = snapshots.write(build_index(spec, vectors[::-1].copy()), ids[::-1], spec, 2)
    for key in keys:
        assert publish(client, key, first).version == 1
        assert publish(client, key, second).version == 2
        with pytest.raises(SnapshotError, match="already names"):
            publish(client, key, first)
        pointer = read_pointer(client, key)
        assert pointer is not None and pointer.version == 2
    with ReloadableIndex(client, keys[0], poll_interval=0.05) as index:
        assert index.wait_for_version(2, timeout=30)
        found, _ = index.search(vectors[:1], k=1)
        assert found[0][0] == "item0"


def test_candidate_lists_and_catalog_transactions(client: RedisCluster, keyspace: KeySpace) -> None:
    popular, fresh = keyspace.catalog_popular(), keyspace.catalog_fresh()
    assert len({key_slot(k.encode()) for k in (popular, fresh, keyspace.catalog_version())}) == 1
    write_ranked(client, popular, {"i1": 5.0, "i2": 9.0, "i3": 1.0})
    write_ranked(client, fresh, {"i3": T0})
    write_ranked(client, popular, {"i2": 2.0, "i4": 3.0})  # replaced whole
    features = np.arange(8, dtype=float).reshape(4, 2)
    assert publish_catalog(client, keyspace, ["i1", "i2", "i3", "i4"], features) == 1
    world = World(WorldConfig(n_users=10, n_items=6, n_candidates=4, slate_size=2), seed=1)
    assert publish_world_catalog(world, client, keyspace) == 2
    items = world.catalog()
    feed = CandidateFeed(client, keyspace, item_dim=world.item_features(items).shape[1])
    try:
        lists = feed.current()
        assert lists.popular == ("i4", "i2") and lists.fresh == ("i3",)
        assert lists.catalog_version == 2 and sorted(lists.catalog.item_ids) == sorted(items)
    finally:
        feed.close()
    # The cluster really refuses a MULTI over two slots: the shared tag is what makes these work.
    other = KeySpace(keyspace.namespace).sequence("someone")
    assert key_slot(other.encode()) != key_slot(popular.encode())
    pipe = client.pipeline(transaction=True)
    pipe.delete(popular)
    pipe.delete(other)
    with pytest.raises(CrossSlotTransactionError):
        pipe.execute()


def test_sequences_append_and_read_across_masters(
    cluster: EmbeddedRedisCluster, client: RedisCluster, keyspace: KeySpace
) -> None:
    users = [f"u{i}" for i in range(30)]
    assert {node_of(cluster, client, keyspace.sequence(u)) for u in users} == {0, 1, 2}
    store = SequenceStore(client, keys=keyspace, max_len=5, ttl_s=600, records_per_call=7)
    records = clicks(users, per_user=8)
    stats = store.append(records)
    assert (stats.applied, stats.added, stats.redelivered) == (240, 240, 0)
    assert store.append(records).redelivered == 240  # exactly once
    with Sequences(cluster.url, keys=keyspace) as reader:
        got = reader.get_many(users, n=10)
        assert all([e.item_id for e in got[u]] == ["i3", "i4", "i5", "i6", "i7"] for u in users)
        features = reader.features_many(users, now=T0 + 7)
        assert all(f.length == 5 and f.total == 8 and f.recency_s == 0 for f in features.values())
        assert reader.get("nobody") == []


# -- faults: a master restarts empty -----------------------------------------------------


def test_a_restarted_master_loses_its_slots_data_and_every_path_recovers(
    cluster: EmbeddedRedisCluster, keyspace: KeySpace, unique_name: Callable[[str], str]
) -> None:
    model = unique_name("fault")
    victim = cluster.node_of_slot(key_slot(keyspace.params_current(model).encode()))
    client = redis_from_url(
        cluster.url, socket_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.2), 2)
    )
    assert isinstance(client, RedisCluster)
    store = ParamStore(client, keys=keyspace)
    sequences = SequenceStore(client, keys=keyspace, ttl_s=600)
    users = [f"u{i}" for i in range(30)]
    registry = CollectorRegistry()
    watcher: ParamWatcher[Any] = ParamWatcher(store, model, poll_interval_s=0.05, registry=registry)
    subscriber = client.pubsub()
    subscriber.subscribe(keyspace.params_channel(model))
    try:
        store.publish(model, {"main": blob(model, 1.0)})
        assert watcher.wait_ready(timeout=30)[0] == 1
        assert sequences.append(clicks(users, per_user=2)).applied == 60

        cluster.stop_node(victim)
        assert eventually(lambda: watcher.stale)
        version, (_, arrays) = watcher.current()
        assert version == 1 and arrays["x"][0] == 1.0, "the last good version keeps serving"
        cluster.start_node(victim)

        # The victim came back without data or scripts: versions count from 1 again,
        # and the watcher still sees that this v1 is not the one it serves.
        assert store.publish(model, {"main": blob(model, 2.0)}) == 1
        assert eventually(lambda: watcher.current()[1][1]["x"][0] == 2.0)
        assert eventually(lambda: not watcher.stale)
        # The append script is reloaded where it went missing; users on the victim
        # start over, the others are redelivered and skipped.
        lost = sum(node_of(cluster, client, keyspace.sequence(u)) == victim for u in users)
        assert 0 < lost < len(users)
        stats = sequences.append(clicks(users, per_user=2))
        assert (stats.applied, stats.redelivered) == (2 * lost, 60 - 2 * lost)
        # A subscriber whose node restarted resubscribes on the next read after the error
        # (updates published while it was away are lost: pub/sub is no queue).
        received: list[int | None] = []

        def notified() -> bool:
            published = store.publish(model, {"main": blob(model, 3.0)})
            try:
                received.append(next_update(subscriber, timeout=1))
            except redis.ConnectionError:
                return False
            return received[-1] == published

        assert eventually(notified), f"updates received after the restart: {received}"
    finally:
        subscriber.close()
        watcher.close()
        client.close()
        if not cluster.processes[victim].alive():
            cluster.start_node(victim)


def test_a_whole_cluster_outage_degrades_every_reader_and_recovers(
    cluster: EmbeddedRedisCluster,
    keyspace: KeySpace,
    unique_name: Callable[[str], str],
    tmp_path: Path,
) -> None:
    model, group = unique_name("outage"), unique_name("group")
    client = redis_from_url(
        cluster.url, socket_timeout=1.0, retry=Retry(ExponentialBackoff(cap=0.1), 1)
    )
    assert isinstance(client, RedisCluster)
    store = ParamStore(client, keys=keyspace)
    store.publish(model, {"main": blob(model, 1.0)})
    write_ranked(client, keyspace.catalog_popular(), {"i1": 1.0})
    checkpoints = CheckpointStore(client, keyspace, group)
    epochs = checkpoints.claim([0])[1]
    registry = CollectorRegistry()
    watcher: ParamWatcher[Any] = ParamWatcher(store, model, poll_interval_s=3600, registry=registry)
    feed = CandidateFeed(client, keyspace, item_dim=2, refresh_s=3600)
    index = ReloadableIndex(client, keyspace.index_current("main"), poll_interval=3600)
    try:
        assert watcher.wait_ready(timeout=30)[0] == 1
        assert feed.current().popular == ("i1",)
        for node in range(len(cluster.nodes)):
            cluster.stop_node(node)
        # Once a topology refresh reaches no node, the cluster client raises
        # RedisClusterUnreachableError, which is no redis.RedisError.
        errors: list[Exception] = []

        def unreachable() -> bool:
            try:
                client.get(keyspace.params_current(model))
            except Exception as exc:  # noqa: BLE001 - collected and checked below
                errors.append(exc)
            return bool(errors) and isinstance(errors[-1], RedisClusterException)

        assert eventually(unreachable)
        assert not isinstance(errors[-1], redis.RedisError)
        # Every reader degrades instead of failing, and the writers' callers see
        # an error they handle (REDIS_ERRORS).
        assert watcher.refresh() is False and watcher.stale
        assert watcher.current()[0] == 1
        assert sample(registry, model=model, reason="redis") >= 1
        assert feed.refresh() is False and feed.current().popular == ("i1",)
        assert index.refresh() is False
        with pytest.raises(REDIS_ERRORS):
            checkpoints.save({0: Checkpoint(offsets={"t": 1}, epoch=epochs[0])})

        cluster.start_nodes(range(len(cluster.nodes)))
        # Back, empty: the watcher follows the new v1, the feed the empty lists.
        assert eventually(lambda: store_publishes(store, model))
        assert watcher.refresh() is True and not watcher.stale
        assert watcher.current()[1][1]["x"][0] == 2.0
        assert feed.refresh() is True and feed.current().popular == ()
        checkpoints.save({0: Checkpoint(offsets={"t": 1}, epoch=epochs[0])})
        assert checkpoints.load([0])[0].offsets == {"t": 1}
    finally:
        index.close()
        feed.close()
        watcher.close()
        client.close()
        stopped = [n for n, process in enumerate(cluster.processes) if not process.alive()]
        if stopped:
            cluster.start_nodes(stopped)


def store_publishes(store: ParamStore, model: str) -> bool:
    """Publish version 1 of ``model`` (value 2.0) once the cluster takes writes again."""
    try:
        return store.publish(model, {"main": blob(model, 2.0)}) == 1
    except REDIS_ERRORS:
        return False


def sample(registry: CollectorRegistry, **labels: str) -> float:
    return registry.get_sample_value("streamrec_params_reader_errors_total", labels) or 0.0
