"""Graded rewards end to end on the real broker and Redis: gateway in, joiner, feedback out.

Events go through the gateway (``POST /v1/impressions``, ``/v1/clicks`` and
``/v1/rewards``, the last refusing a kind the rule does not configure) into Kafka;
the joiner, configured through ``STREAMREC_REWARD_*``, reads the rewards topic as
its third stream and combines several signals per item, drops a duplicate reward
event by its id, and counts a reward that comes after its impression closed as late.
"""

from __future__ import annotations

import time

import pytest
from kafka import KafkaConsumer
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from starlette.testclient import TestClient

from contracts.events import Feedback, decode_feedback
from services.common import TopicSettings
from services.common.service import build_runtime
from services.common.settings import KafkaSettings
from services.gateway import EventProducer, GatewaySettings, create_app
from services.joiner.service import SPEC, JoinerSettings

pytestmark = pytest.mark.integration
AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture
def environment(monkeypatch, kafka_bootstrap, redis_url, keyspace):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_NAMESPACE", keyspace.namespace)
    monkeypatch.setenv("STREAMREC_REWARD_WEIGHTS", '{"click": 0.5, "purchase": 1, "dwell": 0.5}')
    monkeypatch.setenv("STREAMREC_REWARD_COMBINE", "sum")


def _post(client: TestClient, kind: str, events: list[dict]) -> None:
    response = client.post(f"/v1/{kind}", json=events, headers=AUTH)
    assert response.status_code == 202, response.text


def test_signals_combine_duplicates_drop_and_late_rewards_count_on_the_real_stack(
    environment, kafka_bootstrap, topic_factory, unique_name
):
    topics = TopicSettings(
        impressions=topic_factory("impressions"),
        clicks=topic_factory("clicks"),
        rewards=topic_factory("rewards"),
        feedback=topic_factory("feedback"),
        dead_letter=topic_factory("dlq"),
    )
    producer = EventProducer(KafkaSettings(bootstrap_servers=kafka_bootstrap), topics)
    app = create_app(producer, GatewaySettings(token=SecretStr("s3cret")))
    registry = CollectorRegistry()
    settings = JoinerSettings(
        group=unique_name("joiner"), window_s=2, lateness_s=1, idle_close_s=0.3
    )
    joiner = build_runtime(SPEC, registry, settings, topics=topics)
    assert topics.rewards in joiner.inputs, "a graded rule reads the rewards topic"
    now = time.time()

    def reward(event_id: str, item: str, kind: str, value: float, ts: float) -> dict:
        return {
            "event_id": event_id,
            "user_id": "u1",
            "request_id": "r1",
            "item_id": item,
            "kind": kind,
            "value": value,
            "ts": ts,
        }

    with TestClient(app) as client:
        slate = [{"item_id": i, "position": p, "propensity": 0.5} for p, i in enumerate("abc")]
        _post(
            client,
            "impressions",
            [{"request_id": "r1", "user_id": "u1", "ts": now, "policy": "ts_beta", "slate": slate}],
        )
        _post(
            client,
            "clicks",
            [
                {
                    "event_id": "c1",
                    "user_id": "u1",
                    "item_id": "a",
                    "ts": now + 0.5,
                    "request_id": "r1",
                }
            ],
        )
        _post(
            client,
            "rewards",
            [
                reward("e1", "a", "purchase", 0.3, now + 0.6),
                reward("e2", "b", "purchase", 0.4, now + 0.7),
                reward("e3", "b", "dwell", 0.9, now + 0.8),
            ],
        )
        _post(client, "rewards", [reward("e2", "b", "purchase", 0.4, now + 0.7)])  # a retry
        refused = client.post(
            "/v1/rewards", json=[reward("e9", "a", "rating", 1.0, now)], headers=AUTH
        )
        assert refused.status_code == 400
        assert "not configured" in refused.json()["errors"][0]["reason"]

        consumer = KafkaConsumer(
            topics.feedback, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest"
        )
        feedback: dict[str, Feedback] = {}
        joiner.open()
        try:
            deadline = time.monotonic() + 60
            while len(feedback) < 3 and time.monotonic() < deadline:
                joiner.poll_once()
                for batch in consumer.poll(timeout_ms=50).values():
                    for record in batch:
                        fb = decode_feedback(record.value)
                        feedback[fb.item_id] = fb
            # A purchase after the impression closed: counted late, no second feedback.
            _post(client, "rewards", [reward("e4", "c", "purchase", 1.0, now + 1.0)])
            late = "streamrec_joiner_rewards_total"
            deadline = time.monotonic() + 30
            while (
                registry.get_sample_value(late, {"outcome": "late"}) is None
                and time.monotonic() < deadline
            ):
                joiner.poll_once()
            for batch in consumer.poll(timeout_ms=200).values():
                assert not batch, "a late reward emits no feedback"
        finally:
            consumer.close()
            joiner.close()
    assert feedback["a"].reward == pytest.approx(0.5 + 0.3)
    assert feedback["a"].signals == {"click": 1.0, "purchase": 0.3}
    assert feedback["b"].reward == pytest.approx(0.4 + 0.5 * 0.9)
    assert feedback["b"].signals == {"purchase": 0.4, "dwell": 0.9}
    assert (feedback["c"].reward, feedback["c"].signals) == (0.0, {})
    sample = registry.get_sample_value
    assert sample("streamrec_joiner_rewards_total", {"outcome": "matched"}) == 3
    assert sample("streamrec_joiner_rewards_total", {"outcome": "duplicate"}) == 1
    assert sample("streamrec_joiner_rewards_total", {"outcome": "late"}) == 1
