"""The serving API on the real stack (Kafka, Redis, a published catalog and index):
auth, the body cap, the Rank API end to end, serving and the gateway hashing named
features identically, and the API fuzzed against its own OpenAPI document.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, given, settings
from pydantic import SecretStr
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.testclient import TestClient

from contracts.events import Impression, decode_impression
from contracts.features import hash_features
from contracts.keys import KeySpace
from services.catalog import publish_catalog, write_ranked
from services.common.settings import KafkaSettings, TopicSettings
from services.common.topics import ensure_topics
from services.gateway import EventProducer, GatewaySettings
from services.gateway import create_app as gateway_app
from services.index import IndexSpec, SnapshotStore, build_index, publish
from services.serving.api import ServingStack
from tests.integration.test_serving import (
    AUTH,
    BANDITS,
    N_ITEMS,
    TOKEN,
    catalog_features,
    drain,
    serving,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> TopicSettings:
    return TopicSettings(
        clicks=topic_factory("clicks", 1),
        impressions=topic_factory("impressions", 1),
        feedback=topic_factory("feedback", 1),
        dead_letter=topic_factory("dead-letter", 1),
        partitions=1,
    )


def published(client: redis.Redis, keys: KeySpace, snapshots: Path) -> list[str]:
    """A catalog, a popular list and an index version 1 of it; returns the item ids."""
    ids, features = catalog_features()
    publish_catalog(client, keys, ids, features)
    write_ranked(client, keys.catalog_popular(), {"i1": 5.0, "i2": 3.0})
    vectors = np.random.default_rng(1).standard_normal((N_ITEMS, 8)).astype(np.float32)
    store = SnapshotStore(snapshots)
    spec = IndexSpec(kind="flat")
    publish(
        client, keys.index_current("items"), store.write(build_index(spec, vectors), ids, spec, 1)
    )
    return ids


def logged(bootstrap: str, topic: str, n: int) -> dict[str, Impression]:
    return {
        impression.request_id: impression
        for impression in (decode_impression(r.value) for r in drain(bootstrap, topic, 1, n))
    }


def test_without_the_token_or_over_the_cap_nothing_is_served_or_logged(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    tmp_path: Path,
) -> None:
    published(redis_client, keyspace, tmp_path)
    with serving(
        kafka_bootstrap, redis_url, keyspace, topics, snapshot_dir=tmp_path, max_body_bytes=2048
    ) as (client, _):
        wait_until(lambda: client.get("/healthz").status_code == 200, 30, "healthz")
        body = {"user_id": "u1", "k": 3}
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer not-the-token"}):
            for method, path in (
                ("POST", "/v1/rank"),
                ("POST", "/v1/recommendations"),
                ("GET", "/v1/recommendations?user_id=u1"),
                ("GET", "/metrics"),
            ):
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (path, response.text)
                assert response.json()["reasons"]
        oversize = body | {"exclude": [f"x{n}" for n in range(400)]}
        response = client.post("/v1/rank", json=oversize)
        assert response.status_code == 413
        assert response.json()["reasons"]
        # The one request that passes is the one impression logged.
        answer = client.post("/v1/rank", json=body)
        assert answer.status_code == 200, answer.text
    assert list(logged(kafka_bootstrap, topics.impressions, 2)) == [answer.json()["request_id"]]


def test_the_rank_api_end_to_end_and_the_gateway_hashing_the_same_features(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    tmp_path: Path,
) -> None:
    ids = published(redis_client, keyspace, tmp_path)
    features = {"country": "de", "premium": True, "tags": ["sports", "news"], "age": 34}
    with serving(
        kafka_bootstrap,
        redis_url,
        keyspace,
        topics,
        snapshot_dir=tmp_path,
        policies={"linucb": 1.0},
        min_candidates=30,
    ) as (client, stack):
        assert stack.index.wait_for_version(1, timeout=30)
        wait_until(lambda: len(stack.feed.current().catalog) == N_ITEMS, 30, "the catalog")
        # Client candidates: exactly those are ranked, their features override the catalog's.
        candidates = [{"id": "i3"}, {"id": "i4", "features": [7.0] * 8}, {"id": "brand-new"}]
        client_answer = client.post(
            "/v1/rank",
            json={"user_id": "u1", "k": 5, "candidates": candidates, "exclude": ["i3"]},
        )
        assert client_answer.status_code == 200, client_answer.text
        assert client_answer.json()["candidate_source"] == "client"
        assert {i["item_id"] for i in client_answer.json()["items"]} == {"i4", "brand-new"}
        # Exclusions apply to retrieved candidates: popular, fresh, random fill alike.
        excluded = ["i1", "i2", *ids[10:35]]
        retrieved = []
        for n in range(5):
            answer = client.post(
                "/v1/rank", json={"user_id": f"u{n}", "k": 10, "exclude": excluded}
            )
            assert answer.status_code == 200, answer.text
            assert answer.json()["candidate_source"] == "retrieved"
            assert not {i["item_id"] for i in answer.json()["items"]} & set(excluded)
            retrieved.append(answer.json()["request_id"])
        # Named features, hashed into the context.
        featured = client.post("/v1/rank", json={"user_id": "u9", "k": 3, "features": features})
        assert featured.status_code == 200, featured.text
        shown = featured.json()["items"]
        both = client.post(
            "/v1/rank",
            json={"user_id": "u9", "features": features, "context": [0.0] * BANDITS.context_dim},
        )
        assert both.status_code == 400
        assert "mutually exclusive" in both.json()["reasons"][0]
        metrics = client.get("/metrics").text
        assert 'streamrec_features_hashed_total{app="serving"} 5.0' in metrics

    # The same features posted to the gateway with the impression a client logs itself.
    producer = EventProducer(KafkaSettings(bootstrap_servers=kafka_bootstrap), topics)
    app = gateway_app(
        producer,
        GatewaySettings(token=SecretStr("g")),
        context_dim=BANDITS.context_dim,
    )
    posted = {
        "request_id": "from-gateway",
        "user_id": "u9",
        "ts": time.time(),
        "policy": "linucb",
        "slate": [
            {"item_id": i["item_id"], "position": i["position"], "propensity": i["propensity"]}
            for i in shown
        ],
        "features": features,
    }
    with TestClient(app, headers={"Authorization": "Bearer g"}) as gateway:
        assert gateway.post("/v1/impressions", json=posted).status_code == 202
    producer.close()

    impressions = logged(kafka_bootstrap, topics.impressions, 8)
    client_logged = impressions[client_answer.json()["request_id"]]
    assert client_logged.candidate_source == "client"
    assert client_logged.candidates == ["i4", "brand-new"]
    assert client_logged.excluded == ["i3"]
    assert {i.item_id: i.features for i in client_logged.slate}["i4"] == [7.0] * 8
    for request_id in retrieved:
        impression = impressions[request_id]
        assert impression.candidate_source == "retrieved"
        assert impression.excluded == excluded
        assert impression.candidates and not set(impression.candidates) & set(excluded)
    expected = hash_features(features, BANDITS.context_dim).vector.tolist()
    served = impressions[featured.json()["request_id"]]
    assert served.context == expected
    assert impressions["from-gateway"].context == served.context


# -- the API fuzzed against its OpenAPI document -------------------------------------


@pytest.fixture(scope="module")
def fuzzed_stack(
    kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServingStack]:
    """One serving stack for every fuzzed operation, with a catalog and an index."""
    suffix = uuid.uuid4().hex[:8]
    topics = TopicSettings(
        clicks=f"clicks-{suffix}",
        impressions=f"impressions-{suffix}",
        feedback=f"feedback-{suffix}",
        dead_letter=f"dead-letter-{suffix}",
        partitions=1,
    )
    ensure_topics(
        {"bootstrap_servers": kafka_bootstrap},
        {topics.clicks: 1, topics.impressions: 1, topics.feedback: 1, topics.dead_letter: 1},
    )
    keys = KeySpace(f"t{suffix}")
    snapshots = tmp_path_factory.mktemp("snapshots")
    client = redis.Redis.from_url(redis_url)
    published(client, keys, snapshots)
    client.close()
    with serving(kafka_bootstrap, redis_url, keys, topics, snapshot_dir=snapshots) as (_, stack):
        assert stack.index.wait_for_version(1, timeout=30)
        wait_until(lambda: len(stack.feed.current().catalog) == N_ITEMS, 30, "the catalog")
        yield stack


@pytest.fixture(scope="module")
def api_schema(fuzzed_stack: ServingStack) -> schemathesis.BaseSchema:
    """The document as the running app serves it, calls going to that app in process."""
    return schemathesis.openapi.from_asgi("/openapi.json", fuzzed_stack.app())


def errors_have_reasons(ctx: object, response: schemathesis.Response, case: object) -> None:
    """Every 4xx says why: ``{"error", "reasons": [...]}``."""
    if 400 <= response.status_code < 500:
        body = response.json()
        assert body.get("error"), body
        assert isinstance(body.get("reasons"), list) and body["reasons"], body


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    errors_have_reasons,
]
OPERATIONS = [
    ("GET", "/v1/recommendations", GenerationMode.POSITIVE),
    ("GET", "/v1/recommendations", GenerationMode.NEGATIVE),
    ("POST", "/v1/recommendations", GenerationMode.POSITIVE),
    ("POST", "/v1/recommendations", GenerationMode.NEGATIVE),
    ("POST", "/v1/rank", GenerationMode.POSITIVE),
    ("POST", "/v1/rank", GenerationMode.NEGATIVE),
    ("GET", "/healthz", GenerationMode.POSITIVE),
    ("GET", "/metrics", GenerationMode.POSITIVE),
    ("GET", "/openapi.json", GenerationMode.POSITIVE),
]


@pytest.mark.parametrize(("method", "path", "mode"), OPERATIONS)
def test_no_generated_request_gets_a_5xx_and_every_4xx_says_why(
    api_schema: schemathesis.BaseSchema, method: str, path: str, mode: GenerationMode
) -> None:
    """Requests generated from the document (valid ones, and for the routes with input
    invalid ones too), sent with the token: the answers conform to the document."""
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, checks=CHECKS)

    fuzz()


def test_the_served_document_is_what_the_fuzzer_loaded(fuzzed_stack: ServingStack) -> None:
    with TestClient(fuzzed_stack.app()) as client:
        document = client.get("/openapi.json").json()
        assert client.get("/metrics").status_code == 401
        assert (
            client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        )
    assert document["security"] == [{"bearerAuth": []}]
