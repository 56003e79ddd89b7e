"""Serving over real HTTP (uvicorn on loopback) with the real broker and Redis.

Covers issue 4's serving acceptance points: one impression per response with the
slate's propensities, cold start for unknown users, last good parameters while
the parameter store is unreachable, 4xx with reasons for bad input, and the
closed loop (simulator → serving → impressions/clicks → joiner → bandits →
Redis → serving).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis
import uvicorn
from kafka import KafkaConsumer, TopicPartition
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from contracts.events import Click, decode_click, decode_feedback, decode_impression
from contracts.ids import item_labels
from contracts.keys import KeySpace
from contracts.params import encode_params
from services.bandits.factory import new_learner
from services.bandits.service import BanditsProcessor
from services.bandits.settings import BanditsSettings
from services.catalog import publish_catalog, write_ranked
from services.common.runtime import ConsumerRuntime, Record
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings
from services.common.topics import ensure_topics
from services.gateway.sdk import EventProducer
from services.index import IndexSpec, SnapshotStore, build_index, publish
from services.joiner.service import JoinerSettings, JoinProcessor
from services.paramstore import ParamStore
from services.sequences import SequenceStore
from services.serving.api import ServingSettings, ServingStack
from services.simulator.command import DEMO_WORLD
from services.simulator.driver import KafkaSink, ServingSource, Simulation, publish_world_catalog
from services.simulator.world import World
from services.stack.kafka import start_broker
from services.stack.servers import free_port, start_redis

pytestmark = pytest.mark.integration

BANDITS = BanditsSettings(policies={"linucb": {"learner": "linucb", "alpha": 0.5}})
N_ITEMS = 40
TOKEN = "serving-test-token"  # noqa: S105 - the tests' own bearer token
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@contextmanager
def serving(
    kafka: str, redis_url: str, keys: KeySpace, topics: TopicSettings, **overrides: object
) -> Iterator[tuple[httpx.Client, ServingStack]]:
    """A ServingStack behind uvicorn on a free port; yields an HTTP client (sending the
    bearer token) and the stack."""
    overrides.setdefault("token", SecretStr(TOKEN))
    settings = ServingSettings(
        port=free_port(),
        seed=0,
        index_poll_s=0.1,
        params_poll_s=0.1,
        lists_refresh_s=0.1,
        **overrides,  # type: ignore[arg-type]
    )
    stack = ServingStack(
        settings,
        kafka=KafkaSettings(bootstrap_servers=kafka),
        redis_settings=RedisSettings(url=redis_url, namespace=keys.namespace, socket_timeout=1),
        topics=topics,
        bandits=BANDITS,
    )
    server = uvicorn.Server(
        uvicorn.Config(
            stack.app(), host="127.0.0.1", port=settings.port, log_config=None, access_log=False
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_until(lambda: server.started, 30, "uvicorn")
    try:
        with httpx.Client(
            base_url=f"http://127.0.0.1:{settings.port}", timeout=30, headers=AUTH
        ) as client:
            yield client, stack
    finally:
        server.should_exit = True
        thread.join(10)
        stack.close()


def drain(bootstrap: str, topic: str, partitions: int, expected: int, wait: float = 20) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    out: list = []
    deadline = time.monotonic() + wait
    while len(out) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=200).values():
            out.extend(records)
    # Anything beyond `expected` would be a second impression for some response.
    for records in consumer.poll(timeout_ms=500).values():
        out.extend(records)
    consumer.close()
    return out


def catalog_features(n: int = N_ITEMS) -> tuple[list[str], np.ndarray]:
    rng = np.random.default_rng(0)
    return [f"i{i}" for i in range(n)], rng.standard_normal((n, BANDITS.item_dim))


@pytest.fixture
def topics(topic_factory: Callable[..., str]) -> TopicSettings:
    return TopicSettings(
        clicks=topic_factory("clicks", 2),
        impressions=topic_factory("impressions", 2),
        feedback=topic_factory("feedback", 2),
        dead_letter=topic_factory("dead-letter", 1),
        partitions=2,
    )


def test_each_response_logs_exactly_one_impression_with_its_propensities(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
) -> None:
    ids, features = catalog_features()
    publish_catalog(redis_client, keyspace, ids, features)
    with serving(kafka_bootstrap, redis_url, keyspace, topics, min_candidates=20) as (client, _):
        answers = []
        for n in range(24):
            if n % 2:
                response = client.get("/v1/recommendations", params={"user_id": f"u{n}", "k": 4})
            else:
                context = np.random.default_rng(n).standard_normal(BANDITS.context_dim)
                response = client.post(
                    "/v1/recommendations",
                    json={"user_id": f"u{n}", "k": 4, "context": context.tolist()},
                )
            assert response.status_code == 200, response.text
            answers.append(response.json())
        assert client.get("/v1/recommendations", params={"k": 4}).status_code == 400
    logged = [decode_impression(r.value) for r in drain(kafka_bootstrap, topics.impressions, 2, 24)]
    assert len(logged) == len(answers)
    by_id = {impression.request_id: impression for impression in logged}
    for answer in answers:
        impression = by_id[answer["request_id"]]
        assert impression.user_id == answer["user_id"]
        assert impression.policy == answer["policy"]
        assert impression.model_version == answer["model_version"]
        assert [(i.item_id, i.position, i.propensity) for i in impression.slate] == [
            (i["item_id"], i["position"], i["propensity"]) for i in answer["items"]
        ]
        assert len(impression.slate) == 4
        if impression.policy == "drn":
            # DRN logs its state and action vectors, and which network placed each item.
            assert [i.team for i in impression.slate] == [i["team"] for i in answer["items"]]
            assert all(i.team in ("exploit", "explore") for i in impression.slate)
            continue
        assert len(impression.context) == BANDITS.context_dim
        # The random policy's pool is the whole catalog's 20-item fill: k/n each.
        if impression.policy == "random":
            assert all(i.propensity == pytest.approx(4 / 20) for i in impression.slate)
        # Features logged are the catalog's, so learners train on what was scored.
        for item in impression.slate:
            assert item.features == pytest.approx(features[ids.index(item.item_id)].tolist())
    assert {impression.policy for impression in logged} == {"random", "linucb", "drn"}


def test_unknown_user_is_a_cold_start_and_a_known_user_gets_index_neighbours(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    tmp_path: Path,
) -> None:
    ids, features = catalog_features()
    catalog = keyspace
    publish_catalog(redis_client, catalog, ids, features)
    write_ranked(redis_client, catalog.catalog_popular(), {"i1": 5.0, "i2": 3.0})
    vectors = np.random.default_rng(1).standard_normal((N_ITEMS, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = SnapshotStore(tmp_path)
    spec = IndexSpec(kind="flat")
    manifest = store.write(build_index(spec, vectors), ids, spec, 1)
    publish(redis_client, keyspace.index_current("items"), manifest)
    history = ["i10", "i11", "i12"]
    clicks = [
        Record(
            topics.clicks,
            0,
            n,
            b"u-known",
            Click(event_id=f"e{n}", user_id="u-known", item_id=i, ts=1.7e9 + n),
            0,
        )
        for n, i in enumerate(history)
    ]
    SequenceStore(redis_client, keys=keyspace).append(clicks)
    query = vectors[[10, 11, 12]].mean(axis=0)
    neighbours = set(np.argsort(-(vectors @ (query / np.linalg.norm(query))))[:5].tolist())

    with serving(
        kafka_bootstrap,
        redis_url,
        keyspace,
        topics,
        policies={"random": 1.0},
        retrieval_n=5,
        min_candidates=0,
        popular_n=2,
        fresh_n=0,
        snapshot_dir=tmp_path,
    ) as (client, stack):
        assert stack.index.wait_for_version(1, timeout=30)
        wait_until(lambda: stack.feed.current().popular, 30, "the popular list")
        cold = client.get("/v1/recommendations", params={"user_id": "never-seen-before", "k": 5})
        assert cold.status_code == 200, cold.text
        assert cold.json()["cold_start"] is True
        # A cold pool is popular + fresh only here (no random fill): the two popular items.
        assert {i["item_id"] for i in cold.json()["items"]} == {"i1", "i2"}

        warm = client.get("/v1/recommendations", params={"user_id": "u-known", "k": 7})
        assert warm.status_code == 200, warm.text
        body = warm.json()
        assert body["cold_start"] is False and body["index_version"] == 1
        shown = {i["item_id"] for i in body["items"]}
        # Pool = the 5 exact neighbours of the mean history vector + the 2 popular items.
        assert shown == {f"i{n}" for n in neighbours} | {"i1", "i2"}
        metrics = client.get("/metrics").text
        assert (
            'streamrec_serving_requests_total{outcome="cold_start",policy="random"} 1.0' in metrics
        )
        assert "streamrec_index_version 1.0" in metrics


def test_parameter_store_unreachable_serves_last_good_params(
    kafka_bootstrap: str, keyspace: KeySpace, topics: TopicSettings, tmp_path: Path
) -> None:
    server = start_redis(tmp_path / "redis")  # this test's own Redis, to stop midway
    try:
        client = redis.Redis.from_url(server.url)
        ids, features = catalog_features()
        publish_catalog(client, keyspace, ids, features)
        learner = new_learner(
            BANDITS.policies["linucb"],
            context_dim=BANDITS.context_dim,
            item_dim=BANDITS.item_dim,
            seed=BANDITS.seed,
        )
        rng = np.random.default_rng(2)
        context = rng.standard_normal((200, BANDITS.context_dim))
        learner.update(
            item_labels(ids)[rng.integers(N_ITEMS, size=200)],
            learner.policy_features(context, np.empty((200, 0))),
            (rng.random(200) < 0.3).astype(float),
        )
        blob = encode_params("linucb", 0, learner.state(), meta={"learner": learner.name})
        version = ParamStore(client, keys=keyspace).publish("linucb", {"p0": blob})
        client.close()

        with serving(kafka_bootstrap, server.url, keyspace, topics, policies={"linucb": 1.0}) as (
            http,
            stack,
        ):
            watcher = stack.policies["linucb"].watcher  # type: ignore[attr-defined]
            assert watcher.wait_for_version(version, timeout=30)
            wait_until(lambda: len(stack.feed.current().catalog) == N_ITEMS, 30, "the catalog")
            before = http.get("/v1/recommendations", params={"user_id": "u1", "k": 3})
            assert before.json()["model_version"] == version

            server.stop()
            wait_until(lambda: watcher.stale, 30, "the watcher to notice")
            for n in range(5):
                answer = http.get("/v1/recommendations", params={"user_id": f"u{n}", "k": 3})
                assert answer.status_code == 200, answer.text
                assert answer.json()["model_version"] == version
                assert len(answer.json()["items"]) == 3
            metrics = http.get("/metrics").text
            assert 'streamrec_params_reader_stale{model="linucb"} 1.0' in metrics
            assert 'streamrec_serving_degraded_total{source="history"}' in metrics
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("method", "request_kwargs", "reason"),
    [
        ("GET", {"params": {"k": 3}}, "user_id is required"),
        ("GET", {"params": {"user_id": "u1", "k": "three"}}, "k must be an integer"),
        ("GET", {"params": {"user_id": "u1", "k": 0}}, "k must be an integer from 1 to 100"),
        ("GET", {"params": {"user_id": "u1", "k": 101}}, "k must be an integer from 1 to 100"),
        ("GET", {"params": {"user_id": "x" * 129}}, "user_id must be a string"),
        ("GET", {"params": {"user_id": "u1", "debug": 1}}, "unknown query parameter 'debug'"),
        ("POST", {"content": b"not json"}, "malformed: JSON is malformed"),
        ("POST", {"json": {"k": 3}}, "missing required field `user_id`"),
        ("POST", {"json": {"user_id": "u1", "extra": 1}}, "unknown field `extra`"),
        ("POST", {"json": {"user_id": 7}}, "Expected `str`, got `int` - at `$.user_id`"),
        ("POST", {"json": {"user_id": "u1", "context": [1.0]}}, "length >= 9 - at `$.context`"),
        ("POST", {"json": {"user_id": "u1", "context": ["a"] * 9}}, "at `$.context[0]`"),
        ("POST", {"json": {"user_id": "u1", "k": 2.5}}, "got `float` - at `$.k`"),
        ("POST", {"json": {"user_id": "u1", "k": 101}}, "<= 100 - at `$.k`"),
    ],
)
def test_bad_input_gets_400_with_reasons(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    method: str,
    request_kwargs: dict,
    reason: str,
) -> None:
    ids, features = catalog_features()
    publish_catalog(redis_client, keyspace, ids, features)
    with serving(kafka_bootstrap, redis_url, keyspace, topics) as (client, _):
        response = client.request(method, "/v1/recommendations", **request_kwargs)
        assert response.status_code == 400
        body = response.json()
        assert body["error"] == "bad request"
        assert any(reason in r for r in body["reasons"]), body
        assert client.put("/v1/recommendations").status_code == 405


def test_closed_loop_feedback_advances_the_served_model(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    unique_name: Callable[[str], str],
) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_bootstrap)
    redis_settings = RedisSettings(url=redis_url, namespace=keyspace.namespace)
    joiner_registry, bandits_registry = CollectorRegistry(), CollectorRegistry()
    runtimes = [
        ConsumerRuntime(
            service="joiner",
            group=unique_name("joiner"),
            inputs={topics.impressions: decode_impression, topics.clicks: decode_click},
            processor=JoinProcessor(
                JoinerSettings(window_s=3.5, lateness_s=0.5, idle_close_s=0.5),
                topics,
                joiner_registry,
            ),
            kafka=kafka,
            redis_settings=redis_settings,
            topics=topics,
            registry=joiner_registry,
        ),
        ConsumerRuntime(
            service="bandits",
            group=unique_name("bandits"),
            inputs={topics.feedback: decode_feedback},
            processor=BanditsProcessor(
                BANDITS, ParamStore(redis_client, keys=keyspace), bandits_registry
            ),
            kafka=kafka,
            redis_settings=redis_settings,
            topics=topics,
            settings=RuntimeSettings(checkpoint_interval_s=0.25),
            registry=bandits_registry,
        ),
    ]
    threads = [threading.Thread(target=r.run, daemon=True) for r in runtimes]
    for thread in threads:
        thread.start()
    world = World(DEMO_WORLD, seed=5)
    publish_world_catalog(world, redis_client, keyspace)
    sink = KafkaSink(EventProducer(kafka, topics))
    try:
        with serving(kafka_bootstrap, redis_url, keyspace, topics, policies={"linucb": 1.0}) as (
            client,
            stack,
        ):
            wait_until(lambda: len(stack.feed.current().catalog), 30, "the catalog")
            source = ServingSource(client, slate_size=DEMO_WORLD.slate_size)
            simulation = Simulation(world, source, sink, rate=100, seed=5)
            driver = threading.Thread(target=simulation.run, args=(40,), daemon=True)
            driver.start()
            try:
                # Feedback reaches the learner, a new version is published, and
                # serving answers with it: the loop is closed.
                wait_until(lambda: source.version("linucb") >= 2, 45, "a served model version")
            finally:
                simulation.stop()
                driver.join(30)
                source.close()
            assert not simulation.errors
            updates = bandits_registry.get_sample_value(
                "streamrec_bandits_updates_total", {"policy": "linucb"}
            )
            matched = joiner_registry.get_sample_value(
                "streamrec_joiner_clicks_total", {"outcome": "matched"}
            )
            assert updates and updates > 0 and matched and matched > 0
            stats = simulation.stats["linucb"]
            assert stats.requests > 0 and stats.clicks > 0
    finally:
        for runtime in runtimes:
            runtime.stop()
        for thread in threads:
            thread.join(30)
        sink.close()


# -- issue "Nothing lost, nothing doubled, nothing unbounded", items 6 and 9 ----------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'{"user_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "at `$.user_id`"),
        (b'{"user_id": "u1", "context": ' + b"[" * 100_000, "at `$.context[0]`"),
        (
            b'{"user_id": "u1", "k": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}",
            "at `$.k`",
        ),
        (b"[" * 100_000 + b"]" * 100_000, "Expected `object`, got `array`"),
    ],
    ids=["arrays", "unclosed-context", "objects", "top-level"],
)
def test_deeply_nested_json_is_a_400_not_a_500(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topics: TopicSettings,
    body: bytes,
    reason: str,
) -> None:
    """The typed decoder refuses a nested value where it expects another type, before
    descending into it (decode_json would turn a recursion error into a 400 too)."""
    publish_catalog(redis_client, keyspace, *catalog_features())
    with serving(kafka_bootstrap, redis_url, keyspace, topics) as (client, _):
        for path in ("/v1/recommendations", "/v1/rank"):
            response = client.post(path, content=body)
            assert response.status_code == 400, response.text
            assert reason in response.json()["reasons"][0]


def test_serving_starts_and_answers_while_kafka_is_down_and_logs_impressions_once_it_is_back(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    unique_name: Callable[[str], str],
) -> None:
    """Kafka down at startup: serving starts at once and answers (impression_ack=false),
    counts each slate it could not log and says so in /healthz and the log; when the
    broker is back the producer connects and impressions arrive again.

    Before, the producer's constructor failed after 30 s and serving did not start.
    """
    broker = start_broker(tmp_path / "kafka")
    try:
        topics = TopicSettings(
            clicks=unique_name("clicks"), impressions=unique_name("impressions"), partitions=2
        )
        ensure_topics({"bootstrap_servers": broker.bootstrap}, {topics.impressions: 2})
        broker.stop_node(0)
        publish_catalog(redis_client, keyspace, *catalog_features())
        started = time.monotonic()
        with serving(broker.bootstrap, redis_url, keyspace, topics) as (client, stack):
            assert time.monotonic() - started < 10
            wait_until(lambda: len(stack.feed.current().catalog), 30, "the catalog")

            def slates(n: int, prefix: str) -> set[str]:
                ids = set()
                for i in range(n):
                    answer = client.get(
                        "/v1/recommendations", params={"user_id": f"{prefix}{i}", "k": 3}
                    )
                    assert answer.status_code == 200, answer.text
                    ids.add(answer.json()["request_id"])
                return ids

            unlogged = slates(10, "down")
            metrics = client.get("/metrics").text
            assert 'streamrec_serving_degraded_total{source="impressions"} 10.0' in metrics
            assert 'streamrec_serving_impressions_total{outcome="failed"} 10.0' in metrics
            health = client.get("/healthz").json()
            assert health["status"] == "ok" and health["impressions_logged"] is False

            broker.start_node(0)
            wait_until(lambda: stack.producer.ready, 60, "the producer to connect")
            logged = slates(10, "up")
            wait_until(lambda: client.get("/healthz").json()["impressions_logged"], 30, "logging")
        seen = {
            decode_impression(r.value).request_id
            for r in drain(broker.bootstrap, topics.impressions, 2, len(logged))
        }
        assert logged <= seen
        assert not unlogged & seen
    finally:
        broker.stop()
