"""The serving HTTP app in memory (no Kafka, no Redis): auth, body cap, typed requests,
the Rank API's candidates, exclusions and features, the OpenAPI document."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from contracts.events import Impression
from contracts.features import hash_features
from services.catalog import CandidateLists, ItemCatalog
from services.serving.api import ServingSettings, check_auth, create_app
from services.serving.policies import PolicyRouter, RandomPolicy
from services.serving.recommender import Recommender, RecommenderConfig

TOKEN = "unit-token"  # noqa: S105 - the test's own token
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONFIG = RecommenderConfig(context_dim=6, item_dim=3, min_candidates=10, max_k=20)
ITEMS = [f"i{n}" for n in range(30)]


class Feed:
    def __init__(self) -> None:
        features = np.arange(len(ITEMS) * 3, dtype=float).reshape(len(ITEMS), 3)
        self.lists = CandidateLists(
            popular=("i0", "i1", "i2"), fresh=("i3",), catalog=ItemCatalog(ITEMS, features)
        )

    def current(self) -> CandidateLists:
        return self.lists


class Log:
    def __init__(self) -> None:
        self.impressions: list[Impression] = []

    def log(self, impression: Impression) -> None:
        self.impressions.append(impression)


@pytest.fixture
def app() -> tuple[TestClient, Log]:
    log = Log()
    recommender = Recommender(
        policies={"random": RandomPolicy()},
        router=PolicyRouter({"random": 1.0}),
        history=None,
        index=None,
        feed=Feed(),
        impressions=log,
        config=CONFIG,
        seed=0,
    )
    settings = ServingSettings(token=SecretStr(TOKEN), max_body_bytes=4096, default_k=5)
    with TestClient(create_app(recommender, settings), headers=AUTH) as client:
        yield client, log


def test_serving_refuses_to_start_without_a_token_unless_anonymity_is_explicit():
    with pytest.raises(ValueError, match="STREAMREC_SERVING_TOKEN"):
        check_auth(ServingSettings())
    with pytest.raises(ValueError, match="STREAMREC_SERVING_TOKEN is empty"):
        check_auth(ServingSettings(token=SecretStr(" ")))
    check_auth(ServingSettings(allow_anonymous=True))


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]
)
def test_every_route_but_health_and_the_document_needs_the_token(app, headers):
    client, log = app
    client.headers.pop("Authorization")
    calls = [
        ("GET", "/v1/recommendations?user_id=u1"),
        ("POST", "/v1/recommendations"),
        ("POST", "/v1/rank"),
        ("GET", "/metrics"),
    ]
    for method, path in calls:
        response = client.request(method, path, json={"user_id": "u1"}, headers=headers)
        assert response.status_code == 401, path
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.json()["reasons"]
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    assert log.impressions == []


def test_an_oversize_body_is_a_413_with_reasons(app):
    client, log = app
    response = client.post("/v1/rank", content=b"{" + b" " * 5000 + b"}")
    assert response.status_code == 413
    assert response.json()["reasons"] == ["send at most 4096 bytes"]
    assert log.impressions == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"user_id": ""}, "length >= 1"),
        ({"user_id": "u" * 129}, "length <= 128"),
        ({"user_id": "u", "k": 0}, ">= 1"),
        ({"user_id": "u", "k": 21}, "<= 20"),
        ({"user_id": "u", "k": "5"}, "Expected `int"),
        ({"user_id": "u", "context": [0.0] * 5}, "length >= 6"),
        ({"user_id": "u", "context": [1e300] * 6}, "<= 1000000000.0"),
        ({"user_id": "u", "extra": 1}, "unknown field"),
        ({"user_id": "u", "candidates": []}, "length >= 1"),
        ({"user_id": "u", "candidates": [{"id": "i1", "features": [1.0]}]}, "length >= 3"),
        ({"user_id": "u", "features": {"a=b": 1}}, "matching regex"),
        ({"user_id": "u", "context": [0.0] * 6, "features": {"a": 1}}, "mutually exclusive"),
        ({"user_id": "u", "candidates": [{"id": "i1"}, {"id": "i1"}]}, "unique"),
        ({"user_id": "u", "candidates": [{"id": "i1"}], "exclude": ["i1"]}, "every candidate"),
    ],
)
def test_bad_rank_requests_are_400s_with_their_reason(app, body, reason):
    client, log = app
    response = client.post("/v1/rank", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "bad request"
    assert any(reason in r for r in response.json()["reasons"]), response.json()
    assert log.impressions == []


@pytest.mark.parametrize(
    "body", [b"not json", b"[" * 50_000 + b"]" * 50_000, b'{"user_id": "u", "k": 1e999}']
)
def test_malformed_or_deep_json_is_a_400(app, body):
    client, _ = app
    for path in ("/v1/rank", "/v1/recommendations"):
        response = client.post(path, content=body[:4000])
        assert response.status_code == 400, response.text
        assert response.json()["reasons"]


def test_client_candidates_are_ranked_with_their_features_and_logged(app):
    client, log = app
    body = {
        "user_id": "u1",
        "k": 3,
        "candidates": [{"id": "i5"}, {"id": "new-item", "features": [9.0, 9.0, 9.0]}, {"id": "i7"}],
        "exclude": ["i7"],
    }
    response = client.post("/v1/rank", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["candidate_source"] == "client"
    assert {i["item_id"] for i in answer["items"]} == {"i5", "new-item"}
    [impression] = log.impressions
    assert impression.candidate_source == "client"
    assert impression.candidates == ["i5", "new-item"]
    assert impression.excluded == ["i7"]
    features = {item.item_id: item.features for item in impression.slate}
    assert features == {"i5": [15.0, 16.0, 17.0], "new-item": [9.0, 9.0, 9.0]}


def test_exclusions_apply_to_retrieved_candidates(app):
    client, log = app
    excluded = ITEMS[:25]
    for _ in range(10):
        response = client.post("/v1/rank", json={"user_id": "u2", "k": 5, "exclude": excluded})
        assert response.status_code == 200, response.text
        assert response.json()["candidate_source"] == "retrieved"
        assert not {i["item_id"] for i in response.json()["items"]} & set(excluded)
    for impression in log.impressions:
        assert impression.candidate_source == "retrieved"
        assert sorted(impression.candidates) == sorted(ITEMS[25:])
        assert impression.excluded == excluded


def test_named_features_are_hashed_into_the_logged_context(app):
    client, log = app
    features = {"country": "de", "tags": ["a", "b"], "age": 31, "premium": False}
    response = client.post("/v1/rank", json={"user_id": "u3", "features": features})
    assert response.status_code == 200, response.text
    [impression] = log.impressions
    assert impression.context == hash_features(features, CONFIG.context_dim).vector.tolist()
    metrics = client.get("/metrics").text
    hashed = hash_features(features, CONFIG.context_dim)
    assert f'streamrec_features_hashed_total{{app="serving"}} {float(hashed.tokens)}' in metrics


def test_the_recommendations_routes_still_answer(app):
    client, log = app
    assert client.get("/v1/recommendations", params={"user_id": "u4"}).status_code == 200
    response = client.post("/v1/recommendations", json={"user_id": "u4", "context": [0.5] * 6})
    assert response.status_code == 200
    assert len(response.json()["items"]) == 5
    assert [i.candidate_source for i in log.impressions] == ["retrieved", "retrieved"]


def test_unknown_routes_and_methods_answer_json_with_reasons(app):
    client, _ = app
    for response in (client.get("/nowhere"), client.get("/v1/rank")):
        assert response.status_code in (404, 405)
        assert response.json()["reasons"]


def test_the_openapi_document_describes_every_route_with_the_deployment_sizes(app):
    client, _ = app
    document = client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1")
    assert set(document["paths"]) == {
        "/v1/recommendations",
        "/v1/rank",
        "/healthz",
        "/metrics",
        "/openapi.json",
    }
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    rank = document["paths"]["/v1/rank"]["post"]
    assert set(rank["responses"]) == {"200", "400", "401", "413", "503"}
    error = {"$ref": "#/components/schemas/ErrorBody"}
    assert rank["responses"]["400"]["content"]["application/json"]["schema"] == error
    query = document["components"]["schemas"]["RankQuery"]["properties"]
    context = query["context"]["anyOf"][0]
    assert context["minItems"] == context["maxItems"] == CONFIG.context_dim
    assert query["k"]["anyOf"][0]["maximum"] == CONFIG.max_k
    assert document["paths"]["/healthz"]["get"]["security"] == []
