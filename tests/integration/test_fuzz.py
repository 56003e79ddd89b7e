"""Poison fuzz: thousands of generated malformed events, interleaved with good ones.

Three real processes (gateway, sequences, bandits) against the real broker and
Redis. Bad events go through the gateway (each must get a 4xx with a reason and
nothing produced) and straight into the clicks and feedback topics (each must be
dead-lettered with a reason naming its category and its exact source offset).
Headers are input too: good values under malformed producer stamps or control
headers the topic does not carry are dead-lettered, and a spoofed huge sequence
number does not silence the real source it imitates. Every good event must be
applied exactly once: the sequences' per-user totals and the bandits' published
model are checked against the good events alone.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable

import httpx
import pytest
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from contracts.events import MAX_MESSAGE_BYTES, encode
from contracts.keys import KeySpace
from services.common.runtime import CONTROL_HEADER, SEQ_HEADER, SOURCE_HEADER
from services.paramstore import ParamStore
from services.sequences.store import TOTAL_FIELD
from services.stack.servers import free_port
from tests.integration.processes import ServiceProcess, wait_for
from tests.integration.test_bandit_loop import (
    _applied,
    _assert_same_model,
    _env,
    _feedback_stream,
    _published,
    _reference,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "fuzz-token"
#: Makes a bad event from a good one: its bytes and the reason prefix(es) expected.
Mutation = Callable[[random.Random, dict], tuple[bytes, str | tuple[str, ...]]]


def _json(event: dict) -> bytes:
    return json.dumps(event).encode()


def _pick_field(rng: random.Random, event: dict) -> str:
    return rng.choice(
        sorted(k for k, v in event.items() if k != "schema_version" and v is not None)
    )


def _truncated(rng: random.Random, event: dict) -> tuple[bytes, tuple[str, str]]:
    raw = _json(event)
    # The decoder validates as it parses: a cut inside a field's value may fail validation first.
    return raw[: rng.randrange(1, len(raw) - 1)], ("malformed", "invalid")


def _wrong_type(rng: random.Random, event: dict) -> tuple[bytes, str]:
    field = _pick_field(rng, event)
    junk = rng.choice([[1, 2], {"a": 1}, True, "text", None, 3.5])
    if isinstance(event[field], str) and isinstance(junk, str):
        junk = 7
    if isinstance(event[field], float | int) and not isinstance(event[field], bool):
        junk = rng.choice([[1, 2], {"a": 1}, "text", None])
    if isinstance(event[field], list):
        junk = rng.choice(["text", 5, {"a": 1}])
    return _json(event | {field: junk}), "invalid"


def _non_finite(rng: random.Random, event: dict) -> tuple[bytes, str]:
    literal = rng.choice(["NaN", "Infinity", "-Infinity"])
    raw = _json(event | {"ts": 0.5}).replace(b'"ts": 0.5', f'"ts": {literal}'.encode())
    return raw, "malformed"


def _huge_number(rng: random.Random, event: dict) -> tuple[bytes, str]:
    raw = _json(event | {"ts": 0.5})
    huge = rng.choice(["1e999", "-1e999"])
    return raw.replace(b'"ts": 0.5', f'"ts": {huge}'.encode()), "invalid"


def _oversize_string(rng: random.Random, event: dict) -> tuple[bytes, str]:
    field = rng.choice(["user_id", "item_id"])
    return _json(event | {field: "x" * rng.randrange(129, 4000)}), "invalid"


def _too_large(rng: random.Random, event: dict) -> tuple[bytes, str]:
    size = MAX_MESSAGE_BYTES + rng.randrange(1, 20_000)
    return _json(event | {"user_id": "y" * size}), "too large"


def _unknown_field(rng: random.Random, event: dict) -> tuple[bytes, str]:
    return _json(event | {f"extra_{rng.randrange(100)}": rng.random()}), "invalid"


def _schema_version(rng: random.Random, event: dict) -> tuple[bytes, str]:
    return _json(event | {"schema_version": rng.choice([0, 2, 99, -1, "1"])}), "invalid"


def _empty_id(rng: random.Random, event: dict) -> tuple[bytes, str]:
    return _json(event | {"user_id": ""}), "invalid"


def _non_utf8(rng: random.Random, event: dict) -> tuple[bytes, str]:
    raw = _json(event | {"user_id": "PLACEHOLDER"})
    garbage = bytes(rng.randrange(0x80, 0x100) for _ in range(rng.randrange(1, 6)))
    return raw.replace(b"PLACEHOLDER", b"\xff" + garbage), "malformed"


def _nested_garbage(rng: random.Random, event: dict) -> tuple[bytes, str]:
    depth = rng.randrange(5, 60)
    nested: object = rng.random()
    for _ in range(depth):
        nested = [nested] if rng.random() < 0.5 else {"k": nested}
    return _json(event | {_pick_field(rng, event): nested}), "invalid"


def _not_an_object(rng: random.Random, event: dict) -> tuple[bytes, str]:
    return rng.choice([b"42", b'"click"', b"null", b"true", b"[[]]"]), "invalid"


def _binary_noise(rng: random.Random, event: dict) -> tuple[bytes, str]:
    return b"\x00" + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), "malformed"


def _missing_field(rng: random.Random, event: dict) -> tuple[bytes, str]:
    dropped = rng.choice(["user_id", "ts"])
    return _json({k: v for k, v in event.items() if k != dropped}), "invalid"


def _bad_range(rng: random.Random, event: dict) -> tuple[bytes, str]:
    if "reward" in event:
        field, value = rng.choice([("reward", 2), ("propensity", 1.5), ("position", -1)])
    else:
        field, value = "position", rng.choice([-1, 100, 5000])
    return _json(event | {field: value}), "invalid"


MUTATIONS: list[Mutation] = [
    _truncated,
    _wrong_type,
    _non_finite,
    _huge_number,
    _oversize_string,
    _too_large,
    _unknown_field,
    _schema_version,
    _empty_id,
    _non_utf8,
    _nested_garbage,
    _not_an_object,
    _binary_noise,
    _missing_field,
    _bad_range,
]


Headers = list[tuple[str, bytes]]


def _poison_headers(rng: random.Random) -> tuple[Headers, str]:
    """Headers that must sink a record whatever its value: a malformed producer
    stamp, or a control header on a topic whose readers expect none."""
    source = (SOURCE_HEADER, b"fuzz:0")
    bad_seq = rng.choice([b"", b"-1", b"12a", b"1e3", b"\xff", b"9" * 19])
    bad_source = rng.choice([b"\xff\xfe:0", b"nocolon", b"a:b", b"", b"x" * 200 + b":0"])
    return rng.choice(
        [
            ([source], "invalid header"),
            ([source, (SEQ_HEADER, bad_seq)], "invalid header"),
            ([(SOURCE_HEADER, bad_source), (SEQ_HEADER, b"0")], "invalid header"),
            ([(SEQ_HEADER, b"3")], "invalid header"),
            ([(CONTROL_HEADER, b"1")], "unexpected control record"),
        ]
    )


def _click(i: int, source: str, now: float) -> dict:
    return {
        "schema_version": 1,
        "event_id": f"{source}-{i}",
        "user_id": f"u{i % 97}",
        "item_id": f"i{i % 31}",
        "ts": now + i / 1000,
    }


def _duplicated_slate(rng: random.Random, now: float) -> tuple[bytes, str]:
    item = {"item_id": "i1", "position": 0, "propensity": 0.5}
    slate = [item, item | {"position": 1}] if rng.random() < 0.5 else [item, item]
    body = {"request_id": "r", "user_id": "u", "ts": now, "policy": "linucb", "slate": slate}
    return _json(body), "invalid"


def _drain(bootstrap: str, topic: str, expected: int, wait: float) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    out: list = []
    deadline = time.monotonic() + wait
    while len(out) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    consumer.close()
    return out


def _sequence_total(client: redis.Redis, keys: KeySpace, users: set[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for user in sorted(users):
        pipe.hget(keys.user_features(user), TOTAL_FIELD)
    return sum(int(n) for n in pipe.execute() if n is not None)


def test_poison_fuzz_rejects_or_dead_letters_every_bad_event_and_applies_every_good_one(
    kafka_bootstrap, redis_url, redis_client, keyspace, topic_factory, unique_name, tmp_path
):
    rng = random.Random(20261122)
    now = time.time()
    topics = {
        "clicks": topic_factory("clicks", 2),
        "feedback": topic_factory("feedback", 2),
        "impressions": topic_factory("impressions", 2),
        "dead_letter": topic_factory("dlq", 1),
    }
    port = free_port()
    env = _env(kafka_bootstrap, redis_url, keyspace, unique_name("fuzz"), **topics) | {
        "STREAMREC_SEQUENCES_GROUP": unique_name("sequences"),
        "STREAMREC_GATEWAY_PORT": str(port),
        "STREAMREC_GATEWAY_TOKEN": TOKEN,
    }
    services = [
        ServiceProcess(name, env, tmp_path / f"{name}.log").start()
        for name in ("gateway", "sequences", "bandits")
    ]
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, linger_ms=5, max_request_size=2**20)
    good_feedback = _feedback_stream(4_000, seed=21)
    good_clicks: list[dict] = []
    bad_sent: list = []  # (future, value, expected reason prefix)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=30,
        ) as http:
            wait_for(lambda: _healthy(http), 60, "the gateway")
            rejected = 0
            for i in range(1_500):
                good = _click(i, "gw", now)
                if i % 10 == 9:
                    raw, reason = _duplicated_slate(rng, now)
                    route = "/v1/impressions"
                else:
                    raw, reason = rng.choice(MUTATIONS)(rng, good)
                    route = "/v1/clicks"
                response = http.post(route, content=raw)
                assert response.status_code in (400, 413), (raw[:200], response.text[:200])
                if response.status_code == 400:
                    assert response.json()["errors"][0]["reason"].startswith(reason), raw[:200]
                rejected += 1
                if i % 50 == 0:  # a bad event inside a good batch sinks the whole batch
                    batch = [_json(_click(10**6 + i + k, "gw", now)) for k in range(5)]
                    batch.insert(rng.randrange(6), raw)
                    body = b"[" + b",".join(batch) + b"]"
                    assert http.post("/v1/clicks", content=body).status_code in (400, 413)
                if i % 3 == 0:
                    batch_events = [_click(i * 10 + k, "gwok", now) for k in range(3)]
                    response = http.post("/v1/clicks", json=batch_events)
                    assert response.status_code == 202, response.text
                    assert response.json()["accepted"] == 3
                    good_clicks += batch_events
            assert rejected == 1_500

            stamped = 0  # records of one real emitter, numbered 0, 1, 2, ... on partition 0
            for i in range(3_000):
                good = _click(i, "kf", now)
                good_clicks.append(good)
                producer.send(topics["clicks"], key=good["user_id"].encode(), value=_json(good))
                if i % 4 == 0:  # the good value again, under headers that must sink it
                    raw = _json(good)
                    headers, reason = _poison_headers(rng)
                    future = producer.send(topics["clicks"], value=raw, headers=headers)
                elif i % 4 == 1:  # a real stamped source, then a spoof of it that jumps ahead
                    real = _click(i, "stamped", now)
                    good_clicks.append(real)
                    stamp = [(SOURCE_HEADER, b"emitter:0"), (SEQ_HEADER, b"%d" % stamped)]
                    producer.send(topics["clicks"], value=_json(real), headers=stamp, partition=0)
                    stamped += 1
                    raw, reason = _json(_click(i, "spoof", now)), "sequence gap"
                    spoof = [(SOURCE_HEADER, b"emitter:0"), (SEQ_HEADER, b"%d" % (10**17 + i))]
                    future = producer.send(topics["clicks"], value=raw, headers=spoof, partition=0)
                else:
                    raw, reason = rng.choice(MUTATIONS)(rng, good)
                    future = producer.send(topics["clicks"], key=b"u1", value=raw)
                bad_sent.append((future, raw, reason))
            for i, feedback in enumerate(good_feedback):
                producer.send(
                    topics["feedback"], key=feedback.user_id.encode(), value=encode(feedback)
                )
                if i % 5 == 0:  # the same feedback again: applying it would double it
                    raw = encode(feedback)
                    headers, reason = _poison_headers(rng)
                    future = producer.send(topics["feedback"], value=raw, headers=headers)
                else:
                    base = json.loads(encode(feedback))
                    raw, reason = MUTATIONS[i % len(MUTATIONS)](rng, base)
                    future = producer.send(topics["feedback"], key=b"u1", value=raw)
                bad_sent.append((future, raw, reason))
            producer.flush()
            where = {}
            for future, raw, reason in bad_sent:
                meta = future.get(10)
                where[(meta.topic, meta.partition, meta.offset)] = (raw, reason)

            store = ParamStore(redis_client, keys=keyspace)
            users = {c["user_id"] for c in good_clicks}
            wait_for(lambda: _applied(store) == len(good_feedback), 90, "all good feedback")
            wait_for(
                lambda: _sequence_total(redis_client, keyspace, users) == len(good_clicks),
                90,
                "all good clicks in the sequences",
            )
            dead = _drain(kafka_bootstrap, topics["dead_letter"], len(where), wait=60)
            time.sleep(1.0)
            assert _applied(store) == len(good_feedback)
            assert _sequence_total(redis_client, keyspace, users) == len(good_clicks)
            _assert_same_model(_published(store)[1], _reference(good_feedback))
            assert _healthy(http)
        assert all(service.alive() for service in services), "no service may die"
    finally:
        producer.close()
        codes = [service.stop() for service in services]
    # uvicorn re-raises SIGTERM after its graceful shutdown: -15 is the gateway's clean exit.
    assert codes[0] in (0, -15) and codes[1:] == [0, 0]
    assert "Application shutdown complete" in (tmp_path / "gateway.log").read_text()

    assert len(dead) == len(where)
    seen = set()
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        key = (
            headers["streamrec-dlq-topic"],
            int(headers["streamrec-dlq-partition"]),
            int(headers["streamrec-dlq-offset"]),
        )
        raw, reason = where[key]
        assert record.value == raw
        assert headers["streamrec-dlq-reason"].startswith(reason), (raw[:100], headers)
        assert headers["streamrec-dlq-service"] == (
            "sequences" if key[0] == topics["clicks"] else "bandits"
        )
        seen.add(key)
    assert seen == set(where)
    assert len(where) == 3_000 + len(good_feedback)


def _healthy(http: httpx.Client) -> bool:
    try:
        return http.get("/healthz").status_code == 200
    except httpx.HTTPError:
        return False
