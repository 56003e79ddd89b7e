"""The sequences service against the real broker and Redis: order, cap, exactly-once."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest
import redis
from kafka import KafkaProducer
from redis.backoff import NoBackoff
from redis.retry import Retry

from contracts.events import Click, decode_click, encode
from contracts.keys import KeySpace
from services.common import (
    ConsumerRuntime,
    KafkaSettings,
    Record,
    RedisSettings,
    RuntimeSettings,
    TopicSettings,
)
from services.common.topics import ensure_topics
from services.sequences.reader import SequenceEntry, Sequences, window_features
from services.sequences.service import SequencesProcessor
from services.sequences.store import (
    TOTAL_FIELD,
    SequenceStore,
    mark_field,
    member,
    score_of,
    ts_of,
)
from services.stack.servers import free_port
from tests.integration.processes import FAST_FAILOVER, FAST_FAILOVER_SETTINGS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000.0


def _click(event: str, user: str, item: str, ts: float) -> Click:
    return Click(event_id=event, user_id=user, item_id=item, ts=ts)


def _records(clicks: list[Click], partition: int = 0, first_offset: int = 0) -> list[Record]:
    return [
        Record("clicks", partition, first_offset + i, c.user_id.encode(), c, 0)
        for i, c in enumerate(clicks)
    ]


def _dump(client: redis.Redis, keys: KeySpace, user: str) -> tuple[list, dict]:
    return (
        client.zrange(keys.sequence(user), 0, -1, withscores=True),
        client.hgetall(keys.user_features(user)),
    )


def test_out_of_order_and_duplicate_clicks_give_a_time_ordered_capped_sequence(
    redis_client, keyspace
):
    store = SequenceStore(redis_client, keys=keyspace, max_len=4, ttl_s=600)
    clicks = [
        _click("e1", "u1", "a", T0 + 10),
        _click("e2", "u1", "b", T0 + 5),  # late
        _click("e1", "u1", "a", T0 + 10),  # duplicate event, new offset
        _click("e3", "u1", "c", T0 + 30),
        _click("e4", "u1", "d", T0 + 20),  # late
        _click("e5", "u1", "e", T0 + 1),  # so late it falls outside the cap at once
        _click("e6", "u1", "f", T0 + 40),
        _click("x1", "u2", "a", T0 + 3),
    ]
    stats = store.append(_records(clicks))
    assert (stats.applied, stats.added, stats.duplicates, stats.redelivered) == (8, 7, 1, 0)

    with Sequences(redis_client, keys=keyspace) as reader:
        assert reader.get("u1", n=10) == [
            SequenceEntry("a", T0 + 10),
            SequenceEntry("d", T0 + 20),
            SequenceEntry("c", T0 + 30),
            SequenceEntry("f", T0 + 40),
        ]
        assert reader.get("u2") == [SequenceEntry("a", T0 + 3)]
        assert reader.features("u1", T0 + 40).total == 6  # b and e were dropped by the cap
    for key in (keyspace.sequence("u1"), keyspace.user_features("u1")):
        assert 590 <= redis_client.ttl(key) <= 600
    assert redis_client.hget(keyspace.user_features("u1"), mark_field("clicks", 0)) == b"6"

    # A later write refreshes the TTL of both keys.
    redis_client.expire(keyspace.sequence("u1"), 5)
    store.append(_records([_click("e7", "u1", "g", T0 + 50)], first_offset=8))
    assert redis_client.ttl(keyspace.sequence("u1")) > 590


def test_redelivered_and_restored_batches_change_nothing(redis_client, keyspace):
    rng = random.Random(7)
    clicks = [
        _click(f"e{i}", f"u{i % 5}", f"i{rng.randrange(30)}", T0 + i + rng.uniform(-40, 0))
        for i in range(300)
    ]
    records = _records(clicks, partition=2)
    store = SequenceStore(redis_client, keys=keyspace, max_len=10, records_per_call=7)
    first = store.append(records)
    assert first.applied == 300
    users = [f"u{u}" for u in range(5)]
    before = {u: _dump(redis_client, keyspace, u) for u in users}
    assert all(len(seq) == 10 for seq, _ in before.values())

    # The same batch again (a crash before the checkpoint) ...
    assert store.append(records).redelivered == 300
    # ... or a restore from an earlier checkpoint: an overlapping suffix.
    assert store.append(records[120:]).redelivered == 180
    # ... or after Redis lost the script (restart, SCRIPT FLUSH).
    redis_client.script_flush()
    assert store.append(records[250:]).redelivered == 50
    assert {u: _dump(redis_client, keyspace, u) for u in users} == before
    assert sum(int(h[TOTAL_FIELD.encode()]) for _, h in before.values()) == 300

    # Records beyond the mark are still applied when they come with old ones.
    more = _records([_click("late", "u0", "z", T0 + 1_000)], partition=2, first_offset=300)
    stats = store.append(records[290:] + more)
    assert (stats.applied, stats.redelivered) == (1, 10)
    assert Sequences(redis_client, keys=keyspace).get("u0", n=1) == [SequenceEntry("z", T0 + 1e3)]


def test_a_user_with_thousands_of_clicks_in_one_batch(redis_client, keyspace):
    # More (score, member) pairs than one Lua unpack() can take at once.
    clicks = [_click(f"e{i}", "heavy", f"i{i}", T0 + i) for i in range(2_500)]
    store = SequenceStore(redis_client, keys=keyspace, max_len=200)
    assert store.append(_records(clicks)).added == 2_500
    seq = Sequences(redis_client, keys=keyspace).get("heavy", n=500)
    assert [e.item_id for e in seq] == [f"i{i}" for i in range(2_300, 2_500)]


def test_reader_round_trip(redis_client, keyspace):
    rng = random.Random(1)
    now = T0 + 100_000
    clicks = [
        _click(f"e{i}", f"u{i % 3}", f"item:{i}", now - rng.uniform(0, 30 * 3_600))
        for i in range(240)
    ]
    SequenceStore(redis_client, keys=keyspace, max_len=50).append(_records(clicks))
    reader = Sequences(redis_client, keys=keyspace)

    for user in ("u0", "u1", "u2"):
        mine = sorted(
            (score_of(c.ts), member(c.item_id, c.event_id).encode(), c)
            for c in clicks
            if c.user_id == user
        )[-50:]
        entries = [SequenceEntry(c.item_id, ts_of(s)) for s, _, c in mine]
        assert reader.get(user, n=50) == entries
        assert reader.get(user, n=5) == entries[-5:]
        until = ts_of(mine[30][0])
        assert reader.get(user, n=4, until=until) == entries[27:31]
        f = reader.features(user, now)
        assert f == window_features([e.ts for e in entries], now, length=50, total=80)
        assert f.counts[0] >= 1 and f.counts[-1] <= 50
        past = now - 10 * 3_600
        assert reader.features(user, past) == window_features(
            [e.ts for e in entries], past, length=50, total=80
        )

    many = reader.get_many(["u2", "nobody", "u0", "u2"], n=3)
    assert list(many) == ["u2", "nobody", "u0"]
    assert many["nobody"] == []
    assert many["u0"] == reader.get("u0", n=3)
    features = reader.features_many(["u1", "nobody"], now, windows_s=(60.0, 86_400.0))
    assert features["nobody"] == window_features([], now, windows_s=(60.0, 86_400.0))
    assert features["u1"] == reader.features("u1", now, windows_s=(60.0, 86_400.0))
    with pytest.raises(ValueError, match="n must be >= 1"):
        reader.get("u0", n=0)

    with Sequences(os.environ.get("STREAMREC_REDIS") or _url(redis_client), keys=keyspace) as own:
        assert own.get("u1") == reader.get("u1")


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


def test_processor_rejects_future_clicks_and_gives_up_after_retries(redis_client, keyspace):
    store = SequenceStore(redis_client, keys=keyspace)
    processor = SequencesProcessor(store, clock=lambda: T0)
    records = _records(
        [_click("ok", "u1", "a", T0 - 5), _click("skewed", "u1", "b", T0 + 2 * 3_600)]
    )
    rejected = processor.apply(records, ctx=None)  # type: ignore[arg-type]
    assert [(r.record.offset, r.reason.split(":")[0]) for r in rejected] == [(1, "invalid")]
    assert Sequences(redis_client, keys=keyspace).get("u1") == [SequenceEntry("a", T0 - 5)]

    # No retries inside the client, so only the processor's own are counted.
    dead = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    slept: list[float] = []
    broken = SequencesProcessor(
        SequenceStore(dead, keys=keyspace), retries=3, backoff_s=0.01, sleep=slept.append
    )
    assert broken.snapshot(0) == b""
    with pytest.raises(redis.ConnectionError):
        broken.apply(records[:1], ctx=None)  # type: ignore[arg-type]
    assert slept == [0.01, 0.02, 0.04]


def test_a_batch_that_cannot_be_written_is_never_checkpointed(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name
):
    # Checkpoints go to the live Redis, sequence writes to a dead one: the
    # runtime's checkpoint on the way out must not cover the failed batch.
    topic = topic_factory("clicks", partitions=1)
    group = unique_name("sequences")
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
    producer.send(topic, key=b"u1", value=encode(_click("e1", "u1", "a", T0))).get(10)
    producer.close()
    dead = redis.Redis(host="127.0.0.1", port=free_port(), retry=Retry(NoBackoff(), 0))
    runtime = ConsumerRuntime(
        service="sequences",
        group=group,
        inputs={topic: decode_click},
        processor=SequencesProcessor(SequenceStore(dead, keys=keyspace), retries=1, backoff_s=0.01),
        kafka=KafkaSettings(
            bootstrap_servers=kafka_bootstrap,
            **FAST_FAILOVER_SETTINGS,
        ),
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        topics=TopicSettings(clicks=topic, dead_letter=f"{topic}-dlq"),
        settings=RuntimeSettings(checkpoint_interval_s=0.2),
    )
    with pytest.raises(Exception) as failure:  # noqa: B017 - the chain is checked below
        runtime.run()
    # The refusal can surface wrapped (kafka-python re-raises errors of the
    # revoke callback that closing the consumer runs); the cause chain tells.
    chain, error = [], failure.value
    while error is not None:
        chain.append(type(error))
        error = error.__context__
    assert not redis_client.exists(keyspace.checkpoint(group, 0))
    assert redis.ConnectionError in chain, chain


# -- the service as a process: SIGKILL mid-stream, restart, exactly-once ---------------

MAX_LEN = 20


def _stream(users: int, n: int, seed: int) -> list[Click]:
    """Clicks in send order: some late (out of order), some resent (same event)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        user = f"user-{rng.randrange(users)}"
        late = rng.random() < 0.15
        ts = T0 + i * 0.05 - (rng.uniform(1, 1_500) if late else 0.0)
        click = _click(f"ev-{i}", user, f"item-{rng.randrange(400)}", ts)
        out.append(click)
        # A resent click follows its original at once; it is never a late one, so
        # the original is still in the sequence and the resend is recognised.
        if not late and rng.random() < 0.03:
            out.append(click)
    return out


def _expected(clicks: list[Click], max_len: int) -> dict[str, tuple[list[SequenceEntry], int]]:
    """Per user: the latest ``max_len`` distinct clicks by time, and how many were distinct."""
    distinct: dict[str, dict[str, Click]] = defaultdict(dict)
    for click in clicks:
        distinct[click.user_id].setdefault(member(click.item_id, click.event_id), click)
    out = {}
    for user, by_member in distinct.items():
        ranked = sorted((score_of(c.ts), m.encode(), c) for m, c in by_member.items())
        kept = [SequenceEntry(c.item_id, ts_of(s)) for s, _, c in ranked[-max_len:]]
        out[user] = (kept, len(by_member))
    return out


def _service(env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "services.sequences.service"],
            cwd=ROOT,
            env=os.environ | env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _totals(client: redis.Redis, keys: KeySpace, users: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for user in users:
        pipe.hget(keys.user_features(user), TOTAL_FIELD)
    return sum(int(n) for n in pipe.execute() if n is not None)


def _wait_for(predicate, timeout: float, what: str, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def test_sigkill_mid_stream_then_restart_gives_exact_sequences(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name, tmp_path
):
    topic = topic_factory("clicks", partitions=4)
    dlq = f"{topic}-dlq"
    ensure_topics({"bootstrap_servers": kafka_bootstrap}, {dlq: 1})
    clicks = _stream(users=500, n=30_000, seed=42)
    future = _click("from-the-future", "user-7", "item-0", time.time() + 86_400)
    expected = _expected(clicks, MAX_LEN)
    users = sorted(expected)
    total = sum(n for _, n in expected.values())

    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5, acks="all")
    sent: list[tuple[Click, object]] = []

    def produce(batch: list[Click]) -> None:
        for click in batch:
            sent.append(
                (click, producer.send(topic, key=click.user_id.encode(), value=encode(click)))
            )
        producer.flush()

    # Two thirds now; the rest after the kill, so the kill is surely mid-stream.
    cut = 2 * len(clicks) // 3
    produce(clicks[:cut] + [future])
    group = unique_name("sequences")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": keyspace.namespace,
        "STREAMREC_TOPIC_CLICKS": topic,
        "STREAMREC_TOPIC_DEAD_LETTER": dlq,
        "STREAMREC_SEQUENCES_GROUP": group,
        "STREAMREC_SEQUENCES_MAX_LEN": str(MAX_LEN),
        **FAST_FAILOVER,
        "STREAMREC_RUNTIME_CHECKPOINT_INTERVAL_S": "0.2",
        "STREAMREC_RUNTIME_MAX_BATCH": "500",
    }
    log = tmp_path / "sequences.log"
    service = _service(env, log)
    try:
        # Late enough that users' early clicks have left their capped sequences:
        # re-adding those on redelivery is what the offset marks must prevent.
        _wait_for(lambda: _totals(redis_client, keyspace, users) > total // 3, 60, "progress")
    finally:
        service.send_signal(signal.SIGKILL)
        service.wait()
    killed_at = _totals(redis_client, keyspace, users)
    assert 0 < killed_at < total, "the kill must land mid-stream"
    # Whatever was applied after the last checkpoint is redelivered; to be sure a
    # lot is, two partitions also lose their checkpoint and restart from offset 0.
    redis_client.delete(keyspace.checkpoint(group, 0), keyspace.checkpoint(group, 1))

    produce(clicks[cut:])
    producer.close()
    service = _service(env, log)
    try:
        _wait_for(
            lambda: _totals(redis_client, keyspace, users) >= total, 60, "all clicks", every=0.2
        )
        time.sleep(1.0)  # a double application would show in what is written after
        assert service.poll() is None, log.read_text()[-3000:]
    finally:
        service.send_signal(signal.SIGTERM)
        assert service.wait(30) == 0, log.read_text()[-3000:]

    reader = Sequences(redis_client, keys=keyspace)
    got = reader.get_many(users, n=MAX_LEN + 5)
    wrong = [u for u in users if got[u] != expected[u][0]]
    assert not wrong, f"{len(wrong)} users differ, e.g. {wrong[0]}"
    assert _totals(redis_client, keyspace, users) == total
    pipe = redis_client.pipeline(transaction=False)
    for user in users:
        pipe.hget(keyspace.user_features(user), TOTAL_FIELD)
    assert [int(n) for n in pipe.execute()] == [expected[u][1] for u in users]
    # Each user's mark is the offset of its last click in its partition.
    last: dict[tuple[str, int], int] = {}
    for click, sent_future in sent:
        meta = sent_future.get(10)
        if click is not future:
            last[(click.user_id, meta.partition)] = meta.offset
    for (user, partition), offset in last.items():
        mark = redis_client.hget(keyspace.user_features(user), mark_field(topic, partition))
        assert mark is not None and int(mark) == offset
    assert got["user-7"][-1].ts < future.ts  # dead-lettered, not appended
