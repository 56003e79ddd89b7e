"""Fencing against a real Redis: a process that lost its partitions cannot write over the new owner.

Each claim of a partition bumps its ownership epoch (CheckpointStore.claim);
checkpoints only land under the current epoch, and publishes carry the epoch as
a fencing token (ParamStore.publish). The end-to-end case, a SIGSTOPped bandits
process that wakes after a takeover, is in test_faults.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from kafka import KafkaProducer, TopicPartition
from prometheus_client import CollectorRegistry

from contracts.params import encode_params
from services.common import Checkpoint, CheckpointStore, RedisSettings, RuntimeSettings
from services.common.checkpoint import Fenced
from services.common.topics import ensure_topics
from services.paramstore import ParamStore, StalePublish
from tests.integration.tally_worker import TALLY, TallyProcessor, tally_runtime
from tests.integration.test_runtime import _click

pytestmark = pytest.mark.integration


def test_a_claim_fences_the_previous_owner_out_of_every_checkpoint_it_writes(
    redis_client, keyspace, unique_name
):
    group = unique_name("fence")
    first = CheckpointStore(redis_client, keyspace, group)
    second = CheckpointStore(redis_client, keyspace, group)

    found, epochs = first.claim([0, 1])
    assert found == {} and epochs == {0: 1, 1: 1}
    mine = {p: Checkpoint(offsets={"t": 10 + p}, state=b"a", epoch=1) for p in (0, 1)}
    first.save(mine)
    assert first.load([0])[0].offsets == {"t": 10}

    found, epochs = second.claim([1])
    assert epochs == {1: 2} and found[1].offsets == {"t": 11} and found[1].state == b"a"

    mine = {p: Checkpoint(offsets={"t": 20 + p}, state=b"stale", epoch=1) for p in (0, 1)}
    with pytest.raises(Fenced) as fenced:
        first.save(mine)
    assert fenced.value.partitions == [1]
    stored = first.load([0, 1])
    assert stored[0].offsets == {"t": 10}, "all or nothing: the unfenced partition is not written"
    assert stored[1].offsets == {"t": 11} and stored[1].state == b"a"

    second.save({1: Checkpoint(offsets={"t": 30}, state=b"b", epoch=2)})
    assert first.load([1])[1].offsets == {"t": 30}

    # A rebuild deletes the checkpoints, not the epochs: tokens keep rising.
    assert first.clear() == 2
    found, epochs = first.claim([0, 1])
    assert found == {} and epochs == {0: 2, 1: 3}

    # Redis lost its data: nobody has claimed since, so the running owner may write.
    redis_client.delete(keyspace.checkpoint_epochs(group))
    first.save({0: Checkpoint(offsets={"t": 40}, state=b"c", epoch=2)})
    assert first.load([0])[0].offsets == {"t": 40}


def test_a_lower_fencing_token_never_replaces_a_published_part(redis_client, keyspace):
    registry = CollectorRegistry()
    store = ParamStore(redis_client, keys=keyspace, registry=registry)

    def blob(value: float) -> bytes:
        return encode_params("m", 0, {"x": np.array([value])})

    def served() -> dict[str, float]:
        _, parts = store.latest_parts("m")
        return {name: float(part.arrays["x"][0]) for name, part in parts.items()}

    def publish(parts: dict[str, bytes], fence: dict[str, int], owner: str = "g") -> int:
        return store.publish("m", parts, fence=fence, owner=owner)

    assert publish({"p0": blob(1.0)}, {"p0": 1}) == 1
    assert publish({"p0": blob(2.0)}, {"p0": 2}) == 2
    with pytest.raises(StalePublish) as stale:
        publish({"p0": blob(1.5)}, {"p0": 1})
    assert stale.value.parts == ["p0"]
    assert store.current_version("m") == 2 and served() == {"p0": 2.0}

    # A mixed publish keeps the fresh part and skips the stale one.
    assert publish({"p0": blob(1.7), "p1": blob(9.0)}, {"p0": 1, "p1": 1}) == 3
    assert served() == {"p0": 2.0, "p1": 9.0}
    # The same owner publishes again under its own token; unfenced publishes always land.
    assert publish({"p0": blob(3.0)}, {"p0": 2}) == 4
    assert store.publish("m", {"p0": blob(4.0)}) == 5
    assert served() == {"p0": 4.0, "p1": 9.0}
    assert registry.get_sample_value("streamrec_params_fenced_parts_total", {"model": "m"}) == 2
    # Another owner (a rebuild under a new consumer group) starts its own tokens.
    assert publish({"p0": blob(5.0)}, {"p0": 1}, owner="g-v2") == 6
    with pytest.raises(StalePublish):
        publish({"p0": blob(6.0)}, {"p0": 0}, owner="g-v2")
    assert served() == {"p0": 5.0, "p1": 9.0}


def test_a_runtime_fenced_by_a_new_owner_drops_and_stops_fetching_the_partition(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name
):
    topic = topic_factory("fenced", partitions=2)
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {f"{topic}-dlq": 1})
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    for i in range(200):
        producer.send(topic, partition=i % 2, value=_click(i))
    producer.flush()
    group = unique_name("fenced")
    processor = TallyProcessor()
    runtime = tally_runtime(
        topic,
        group,
        processor,
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        settings=RuntimeSettings(checkpoint_interval_s=3600),
        registry=CollectorRegistry(),
        bootstrap=kafka_bootstrap,
    )
    store = CheckpointStore(redis_client, keyspace, group)
    runtime.open()
    try:
        deadline = time.monotonic() + 60
        while sum(t[0] for t in processor.tally.values()) < 200 and time.monotonic() < deadline:
            runtime.poll_once()
        assert processor.tally == {0: [100, 9900], 1: [100, 10000]}
        assert runtime.checkpoint(force=True)

        store.claim([1])  # another process takes partition 1 over
        for i in range(200, 220):
            producer.send(topic, partition=i % 2, value=_click(i))
        producer.flush()
        deadline = time.monotonic() + 30
        while processor.tally[0][0] < 110 and time.monotonic() < deadline:
            runtime.poll_once()
        assert not runtime.checkpoint(force=True), "the write must be fenced"
        assert sorted(processor.tally) == [0], "partition 1's state is dropped"
        assert store.load([0])[0].offsets == {topic: 100}, "nothing of the fenced write landed"
        assert TALLY.unpack(store.load([1])[1].state) == (100, 10000)
        assert runtime._consumer is not None
        assert TopicPartition(topic, 1) in runtime._consumer.paused()

        # The next checkpoint covers what this process still owns.
        assert runtime.checkpoint(force=True)
        assert store.load([0])[0].offsets == {topic: 110}
        assert TALLY.unpack(store.load([0])[0].state) == tuple(processor.tally[0])
    finally:
        producer.close()
        runtime.close()
