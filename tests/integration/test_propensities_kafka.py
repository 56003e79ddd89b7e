"""A Thompson policy's impressions on the real Kafka carry the scored candidates and
Monte Carlo propensities (the true top-k marginals, not the sampled scores' top k).

A Beta Thompson policy with no feedback yet has the same posterior for every
candidate, so each of the ``n`` candidates is in the top ``k`` with probability
``k / n``: the logged propensities average that (their Monte Carlo bias is at most
``1 / (draws + 1)``); ranking by the sampled scores alone would log about 1.
"""

from __future__ import annotations

import numpy as np
import pytest
import redis
from pydantic import SecretStr
from starlette.testclient import TestClient

from contracts.events import decode_impression
from contracts.keys import KeySpace
from services.bandits.settings import BanditsSettings
from services.catalog import publish_catalog
from services.common.settings import KafkaSettings, RedisSettings, TopicSettings
from services.serving.api import ServingSettings, ServingStack
from tests.integration.test_serving import drain

pytestmark = pytest.mark.integration
N_ITEMS = 20
K = 4
REQUESTS = 12


def test_thompson_impressions_on_kafka_carry_candidates_and_true_propensities(
    kafka_bootstrap: str,
    redis_url: str,
    redis_client: redis.Redis,
    keyspace: KeySpace,
    topic_factory,
) -> None:
    topics = TopicSettings(
        clicks=topic_factory("clicks"),
        impressions=topic_factory("impressions"),
        feedback=topic_factory("feedback"),
        dead_letter=topic_factory("dead-letter"),
        partitions=1,
    )
    bandits = BanditsSettings(policies={"ts_beta": {"learner": "ts_beta"}})
    ids = [f"i{i}" for i in range(N_ITEMS)]
    features = np.random.default_rng(0).standard_normal((N_ITEMS, bandits.item_dim))
    publish_catalog(redis_client, keyspace, ids, features)
    settings = ServingSettings(
        token=SecretStr("t"),
        seed=0,
        policies={"ts_beta": 1.0},
        min_candidates=N_ITEMS,
        epsilon=0.0,
    )
    stack = ServingStack(
        settings,
        kafka=KafkaSettings(bootstrap_servers=kafka_bootstrap),
        redis_settings=RedisSettings(url=redis_url, namespace=keyspace.namespace),
        topics=topics,
        bandits=bandits,
    )
    try:
        with TestClient(stack.app(), headers={"Authorization": "Bearer t"}) as client:
            for n in range(REQUESTS):
                response = client.get("/v1/recommendations", params={"user_id": f"u{n}", "k": K})
                assert response.status_code == 200, response.text
    finally:
        stack.close()
    logged = [
        decode_impression(r.value) for r in drain(kafka_bootstrap, topics.impressions, 1, REQUESTS)
    ]
    assert len(logged) == REQUESTS
    propensities = []
    for impression in logged:
        assert impression.policy == "ts_beta"
        assert len(impression.candidates) == N_ITEMS
        assert {item.item_id for item in impression.slate} <= set(impression.candidates)
        propensities += [item.propensity for item in impression.slate]
    draws = settings.propensity_draws
    bias = 1 / (draws + 1)
    spread = 4 * 0.5 / np.sqrt(draws + 1) / np.sqrt(len(propensities))
    assert np.mean(propensities) == pytest.approx(K / N_ITEMS + bias / 2, abs=bias / 2 + spread)
    assert max(propensities) < 0.6
