"""The gateway over real HTTP (uvicorn on loopback) into the real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import uvicorn
from kafka import KafkaConsumer, TopicPartition
from pydantic import SecretStr

from contracts.events import decode_click, decode_impression
from services.common.settings import KafkaSettings, TopicSettings
from services.gateway import EventProducer, GatewaySettings, check_auth, create_app
from services.stack.servers import free_port
from tests.integration.processes import ROOT

pytestmark = pytest.mark.integration
TS = 1.7e9


@pytest.fixture
def gateway(kafka_bootstrap, topic_factory):
    topics = TopicSettings(
        clicks=topic_factory("clicks", 2), impressions=topic_factory("impressions", 2)
    )
    producer = EventProducer(KafkaSettings(bootstrap_servers=kafka_bootstrap), topics)
    settings = GatewaySettings(
        port=free_port(), token=SecretStr("s3cret"), max_batch=1000, max_body_bytes=1024 * 1024
    )
    app = create_app(producer, settings, clock=lambda: TS + 10)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    with httpx.Client(
        base_url=f"http://127.0.0.1:{settings.port}",
        headers={"Authorization": "Bearer s3cret"},
        timeout=30,
    ) as client:
        yield client, topics, kafka_bootstrap
    server.should_exit = True
    thread.join(10)
    producer.close()


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
