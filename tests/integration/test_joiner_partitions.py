"""The joiner refuses inputs that are not co-partitioned, on the real broker.

Clicks and impressions of a user are joined only if they share a partition
number; with 4 impression partitions and 2 click partitions most clicks would
silently find no impression, so the joiner must not start at all.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from services.common import TopicSettings
from services.common.service import build_runtime
from services.joiner.service import SPEC, JoinerSettings, PartitionMismatch

pytestmark = pytest.mark.integration


@pytest.fixture
def environment(monkeypatch, kafka_bootstrap, redis_url, keyspace):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap)
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("REDIS_NAMESPACE", keyspace.namespace)


def _topics(topic_factory, impressions: int, clicks: int) -> TopicSettings:
    return TopicSettings(
        impressions=topic_factory("impressions", impressions),
        clicks=topic_factory("clicks", clicks),
        feedback=topic_factory("feedback", 1),
        dead_letter=topic_factory("dlq", 1),
    )


def test_the_joiner_refuses_to_start_on_4_impression_and_2_click_partitions(
    environment, topic_factory, unique_name
):
    topics = _topics(topic_factory, impressions=4, clicks=2)
    runtime = build_runtime(
        SPEC, CollectorRegistry(), JoinerSettings(group=unique_name("joiner")), topics=topics
    )
    with pytest.raises(PartitionMismatch, match=r"\(4 partitions\) .* \(2 partitions\)"):
        runtime.run()
    assert runtime.partition_counts == {topics.impressions: 4, topics.clicks: 2}
    assert not runtime._owned, "no partition may be taken before refusing"


def test_the_joiner_starts_on_co_partitioned_inputs(environment, topic_factory, unique_name):
    topics = _topics(topic_factory, impressions=2, clicks=2)
    runtime = build_runtime(
        SPEC, CollectorRegistry(), JoinerSettings(group=unique_name("joiner")), topics=topics
    )
    runtime.open()
    try:
        assert runtime.partition_counts == {topics.impressions: 2, topics.clicks: 2}
    finally:
        runtime.close()
