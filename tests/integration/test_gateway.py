"""The gateway over real HTTP (uvicorn on loopback) into the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from kafka import KafkaConsumer, TopicPartition
from pydantic import SecretStr

from contracts.events import decode_click, decode_impression
from contracts.features import hash_features
from services.bandits.settings import BanditsSettings
from services.common import clients
from services.common.settings import KafkaSettings, TopicSettings
from services.common.topics import ensure_topics
from services.gateway import EventProducer, GatewaySettings, check_auth, create_app
from services.gateway.app import gateway_producer
from services.stack.kafka import start_broker
from services.stack.servers import free_port
from tests.integration.processes import ROOT, wait_for

pytestmark = pytest.mark.integration
TS = 1.7e9


@contextmanager
def running(producer: EventProducer, settings: GatewaySettings) -> Iterator[httpx.Client]:
    """The gateway app around ``producer`` behind uvicorn; yields an authorised client."""
    app = create_app(producer, settings, clock=lambda: TS + 10)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.port}",
            headers={"Authorization": "Bearer s3cret"},
            timeout=60,
        ) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(10)
        producer.close()


def gateway_settings(**overrides) -> GatewaySettings:
    return GatewaySettings(
        port=free_port(),
        token=SecretStr("s3cret"),
        max_batch=1000,
        max_body_bytes=1024 * 1024,
        **overrides,
    )


@pytest.fixture
def gateway(kafka_bootstrap, topic_factory):
    topics = TopicSettings(
        clicks=topic_factory("clicks", 2), impressions=topic_factory("impressions", 2)
    )
    producer = EventProducer(KafkaSettings(bootstrap_servers=kafka_bootstrap), topics)
    with running(producer, gateway_settings()) as client:
        yield client, topics, kafka_bootstrap


def _drain(bootstrap: str, topic: str, partitions: int, expected: int, wait: float = 20) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list = []
    deadline = time.monotonic() + wait
    while len(out) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    consumer.close()
    return out


def click(i: int, **kw) -> dict:
    return {"event_id": f"c{i}", "user_id": f"u{i % 7}", "item_id": f"i{i}", "ts": TS} | kw


def test_batch_of_clicks_reaches_kafka_keyed_by_user(gateway):
    client, topics, bootstrap = gateway
    response = client.post("/v1/clicks", json=[click(i) for i in range(50)])
    assert response.status_code == 202, response.text
    assert response.json() == {"accepted": 50}
    records = _drain(bootstrap, topics.clicks, 2, 50)
    assert sorted(decode_click(r.value).event_id for r in records) == sorted(
        f"c{i}" for i in range(50)
    )
    assert all(r.key == decode_click(r.value).user_id.encode() for r in records)


def test_single_impression_is_accepted(gateway):
    client, topics, bootstrap = gateway
    impression = {
        "request_id": "r1",
        "user_id": "u1",
        "ts": TS,
        "policy": "linucb",
        "slate": [{"item_id": "i1", "position": 0, "propensity": 0.5}],
    }
    assert client.post("/v1/impressions", json=impression).status_code == 202
    [record] = _drain(bootstrap, topics.impressions, 2, 1)
    assert decode_impression(record.value).slate[0].item_id == "i1"


def test_impression_features_are_hashed_into_its_context_before_producing(gateway):
    client, topics, bootstrap = gateway
    features = {"country": "de", "premium": True, "tags": ["a", "b"], "age": 31}
    impression = {
        "request_id": "r-features",
        "user_id": "u1",
        "ts": TS,
        "policy": "linucb",
        "slate": [{"item_id": "i1", "position": 0, "propensity": 0.5}],
        "features": features,
    }
    both = impression | {"request_id": "r-both", "context": [1.0] * 9}
    refused = client.post("/v1/impressions", json=both)
    assert refused.status_code == 400
    assert "mutually exclusive" in refused.text
    assert client.post("/v1/impressions", json=impression).status_code == 202, refused.text
    [record] = _drain(bootstrap, topics.impressions, 2, 1)
    logged = decode_impression(record.value)
    assert logged.request_id == "r-features"
    dim = BanditsSettings().context_dim
    assert logged.context == hash_features(features, dim).vector.tolist()
    metrics = client.get("/metrics").text
    assert 'streamrec_features_hashed_total{app="gateway"} 5.0' in metrics


def test_invalid_events_are_listed_by_index_and_nothing_is_accepted(gateway):
    client, topics, bootstrap = gateway
    body = [click(0), click(1, ts="yesterday"), click(2, event_id=""), click(3, ts=TS + 86400)]
    response = client.post("/v1/clicks", json=body)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert [e["index"] for e in errors] == [1, 2, 3]
    assert "Expected `float`" in errors[0]["reason"]
    assert "length >= 1" in errors[1]["reason"]
    assert "future" in errors[2]["reason"]
    assert _drain(bootstrap, topics.clicks, 2, 1, wait=3) == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'[{"event_id": "c1"', "malformed"),
        (b'{"event_id": "c1", "user_id": "u", "item_id": "i", "ts": NaN}', "malformed"),
        (b'{"event_id": "c1", "user_id": "u", "item_id": "i", "ts": 1e999}', "invalid"),
        (
            b'{"schema_version": 2, "event_id": "c", "user_id": "u", "item_id": "i", "ts": 1.7e9}',
            "invalid",
        ),
    ],
)
def test_poison_bodies_get_400_with_reason(gateway, body, reason):
    client, _, _ = gateway
    response = client.post("/v1/clicks", content=body)
    assert response.status_code == 400
    assert response.json()["errors"][0]["reason"].startswith(reason)


def test_oversize_body_and_batch_get_413(gateway):
    client, _, _ = gateway
    huge = b"[" + b" " * (10 * 1024 * 1024) + b"]"
    assert client.post("/v1/clicks", content=huge).status_code == 413
    many = json.dumps([click(i) for i in range(1001)])
    assert client.post("/v1/clicks", content=many).status_code == 413


def test_bearer_token_is_required(gateway):
    client, _, _ = gateway
    response = client.post("/v1/clicks", json=click(1), headers={"Authorization": "Bearer no"})
    assert response.status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}
    metrics = client.get("/metrics").text
    assert 'streamrec_gateway_requests_total{code="401",route="/v1/clicks"} 1.0' in metrics


def test_without_a_token_the_gateway_refuses_to_start_unless_anonymity_is_explicit(
    kafka_bootstrap,
):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_GATEWAY_")} | {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "STREAMREC_GATEWAY_PORT": str(free_port()),
    }
    refused = subprocess.run(
        [sys.executable, "-m", "services.cli", "run", "gateway"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "STREAMREC_GATEWAY_TOKEN" in refused.stderr + refused.stdout
    with pytest.raises(ValueError, match="STREAMREC_GATEWAY_TOKEN is empty"):
        check_auth(GatewaySettings(token=SecretStr("  ")))
    check_auth(GatewaySettings(allow_anonymous=True))


def test_events_round_trip_gateway_to_kafka_to_a_runtime_consumer(
    gateway, redis_url, redis_client, keyspace, unique_name, tmp_path
):
    """HTTP in, consumed and applied by the shared runtime in its own process."""
    from services.common.topics import ensure_topics
    from tests.integration.processes import wait_for
    from tests.integration.test_runtime import _tally, _worker

    client, topics, bootstrap = gateway
    ensure_topics({"bootstrap_servers": bootstrap}, {f"{topics.clicks}-dlq": 1})
    for start in range(0, 2000, 500):
        body = [click(i, event_id=f"e{i}") for i in range(start, start + 500)]
        assert client.post("/v1/clicks", json=body).status_code == 202
    group = unique_name("roundtrip")
    worker = _worker(topics.clicks, group, keyspace, bootstrap, redis_url, tmp_path / "w.log")
    try:
        wait_for(lambda: _tally(redis_client, keyspace, group, 2)[0] == 2000, 60, "all clicks")
        assert _tally(redis_client, keyspace, group, 2) == (2000, sum(range(2000)))
    finally:
        worker.terminate()
        worker.wait(30)


# -- deep JSON (issue "Nothing lost, nothing doubled, nothing unbounded", item 9) -----


@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,
        b'[{"a": ' * 100_000,
        b'[{"event_id": "c1"}, ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"]",
    ],
    ids=["arrays", "objects", "second-event"],
)
def test_deeply_nested_json_is_a_400_not_a_500(gateway, body):
    client, topics, bootstrap = gateway
    response = client.post("/v1/clicks", content=body)
    assert response.status_code == 400, response.text
    assert response.json()["errors"][0]["reason"].startswith("malformed"), response.text


# -- Kafka outages (issue "Nothing lost, nothing doubled, nothing unbounded", item 5) -


def clicks_batch(name: str, n: int, *, pad: int = 0) -> list[dict]:
    """``n`` clicks with ids ``{name}-{i}``; ``pad`` lengthens the item ids."""
    return [click(i, event_id=f"{name}-{i}", item_id=f"i{i}" + "x" * pad) for i in range(n)]


def event_ids(bootstrap: str, topic: str, partitions: int) -> Counter[str]:
    """How often each event id is in ``topic``, read from the beginning to its end offsets."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    ends = consumer.end_offsets(tps)
    seen: Counter[str] = Counter()
    deadline = time.monotonic() + 30
    while any(consumer.position(tp) < ends[tp] for tp in tps):
        assert time.monotonic() < deadline, "could not read the topic to its end"
        for records in consumer.poll(timeout_ms=200).values():
            seen.update(decode_click(r.value).event_id for r in records)
    consumer.close()
    return seen


def test_a_batch_that_fails_midway_is_a_503_saying_how_many_events_were_appended(
    kafka_bootstrap, topic_factory
):
    """kafka-python raises from send() midway through a batch; the answer is still a 503.

    A client whose max_request_size is below one event's size is the real client
    path where send() raises after earlier records of the batch were appended.
    Before, the exception escaped as a 500 with part of the batch in Kafka.
    """
    topics = TopicSettings(clicks=topic_factory("clicks", 1), impressions="unused")
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    producer = EventProducer(kafka, topics, producer=clients.producer(kafka, max_request_size=450))
    batch = clicks_batch("ok", 5) + [click(5, event_id="big", item_id="i" * 128, user_id="u" * 128)]
    batch += clicks_batch("after", 3)
    with running(producer, gateway_settings()) as client:
        response = client.post("/v1/clicks", json=batch)
        assert response.status_code == 503, response.text
        assert response.json()["appended"] == 5
        assert response.headers["retry-after"] == "2"
        wait_for(lambda: producer.pending_bytes == 0, 30, "the appended events to settle")
        # Exactly the appended prefix reached Kafka; nothing after it ever will.
        assert set(event_ids(kafka_bootstrap, topics.clicks, 1)) == {f"ok-{i}" for i in range(5)}


def test_a_gateway_started_without_kafka_answers_503_at_once():
    """The gateway starts and answers while no broker is reachable (it connects in the
    background), instead of failing in the producer's constructor after 30 s."""
    settings = gateway_settings(produce_timeout_s=2, max_block_ms=500)
    dead = KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")
    started = time.monotonic()
    producer = gateway_producer(settings, dead, TopicSettings())
    assert time.monotonic() - started < 1
    with running(producer, settings) as client:
        for _ in range(3):
            started = time.monotonic()
            response = client.post("/v1/clicks", json=clicks_batch("b", 3))
            assert time.monotonic() - started < 1
            assert response.status_code == 503
            assert response.json()["appended"] == 0
            assert "not connected" in response.json()["error"]
        assert client.get("/healthz").status_code == 503


def test_broker_outage_answers_503_within_the_bound_keeps_memory_bounded_and_loses_nothing(
    tmp_path, unique_name
):
    """A broker stopped under load, then started again.

    - every answer during the outage is a 503 with Retry-After, within
      produce_timeout_s + max_block_ms (plus HTTP overhead);
    - the events awaiting acknowledgement never exceed buffer_memory, however
      much is posted: batches that do not fit are refused at once;
    - guarantee: a 503 with ``appended == 0`` means none of the batch is in
      Kafka, ever (checked on batches that are never retried); a 503'd batch
      retried until 202 is in Kafka entirely, each event at least once, and an
      event is there twice only if an earlier attempt said it was appended.
    """
    settings = gateway_settings(
        produce_timeout_s=2, max_block_ms=500, retry_after_s=1, buffer_memory=320 * 1024
    )
    bound = settings.produce_timeout_s + settings.max_block_ms / 1000 + 1.0
    broker = start_broker(tmp_path / "kafka")
    try:
        topics = TopicSettings(clicks=unique_name("clicks"), impressions=unique_name("imps"))
        ensure_topics({"bootstrap_servers": broker.bootstrap}, {topics.clicks: 2})
        kafka = KafkaSettings(bootstrap_servers=broker.bootstrap)
        producer = gateway_producer(settings, kafka, topics)
        wait_for(lambda: producer.ready, 30, "the producer to connect")
        batches: dict[str, list[dict]] = {"warm": clicks_batch("warm", 10)}
        appended: dict[str, list[int]] = {}  # batch -> `appended` of each 503
        peak = [0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], producer.pending_bytes)
                time.sleep(0.005)

        with running(producer, settings) as client, ThreadPoolExecutor(8) as pool:

            def post(name: str) -> httpx.Response:
                started = time.monotonic()
                response = client.post("/v1/clicks", json=batches[name])
                took = time.monotonic() - started
                if response.status_code == 503:
                    assert took < bound, (name, took)
                    assert response.headers["retry-after"] == "1"
                    appended.setdefault(name, []).append(response.json()["appended"])
                return response

            assert post("warm").status_code == 202
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            broker.stop_node(0)

            # Right after the stop nothing has failed yet: concurrent batches are let
            # through until the buffer is full (~140 KiB each), the rest refused at once.
            names = [f"burst{n}" for n in range(8)]
            batches |= {name: clicks_batch(name, 200) for name in names}
            answers = list(pool.map(post, names))
            assert {r.status_code for r in answers} == {503}
            assert sorted(appended[name][0] for name in names).count(200) == 2
            assert sorted(appended[name][0] for name in names).count(0) == 6

            # Then Kafka is known down: answers are immediate, one probe per second.
            fast = 0
            for n in range(40):
                name = f"late{n}"
                batches[name] = clicks_batch(name, 20)
                started = time.monotonic()
                assert post(name).status_code == 503
                fast += time.monotonic() - started < 0.5
                time.sleep(0.05)
            assert fast >= 30
            assert client.get("/healthz").status_code == 503
            assert peak[0] <= settings.buffer_memory
            assert producer.pending_bytes > 0

            broker.start_node(0)
            # Retry every 503'd batch until it is accepted, except some refused ones.
            abandoned = {name for name, seen in appended.items() if seen == [0]}
            abandoned = set(sorted(abandoned)[::2])
            retried = [name for name in appended if name not in abandoned]
            deadline = time.monotonic() + 90
            for name in retried:
                while post(name).status_code != 202:
                    assert time.monotonic() < deadline, f"{name} never accepted"
                    time.sleep(0.5)
            wait_for(lambda: producer.pending_bytes == 0, 60, "buffered events to settle")
            sampling.set()
            assert peak[0] <= settings.buffer_memory

        seen = event_ids(broker.bootstrap, topics.clicks, 2)
        for name in ["warm", *retried]:
            missing = {e["event_id"] for e in batches[name]} - set(seen)
            assert not missing, f"{name}: {sorted(missing)[:5]}"
        for name in abandoned:
            assert not {e["event_id"] for e in batches[name]} & set(seen), name
        for event_id, count in seen.items():
            if count > 1:
                name = event_id.rsplit("-", 1)[0]
                assert any(appended.get(name, [])), f"{event_id} doubled but never appended"
    finally:
        broker.stop()
