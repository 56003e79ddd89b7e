from __future__ import annotations

import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition


def test_broker_round_trip_with_headers(kafka_bootstrap: str, topic_factory) -> None:
    topic = topic_factory("roundtrip", partitions=2)
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    producer.send(topic, key=b"u1", value=b"hello", headers=[("reason", b"x")], partition=1).get(10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap, fetch_max_wait_ms=10)
    tp = TopicPartition(topic, 1)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    records = consumer.poll(timeout_ms=5000)[tp]
    consumer.close()
    assert [(r.key, r.value, r.headers) for r in records] == [(b"u1", b"hello", [("reason", b"x")])]


def test_redis_answers(redis_client: redis.Redis, keyspace) -> None:
    key = keyspace.sequence("u1")
    redis_client.rpush(key, "a", "b")
    assert redis_client.lrange(key, 0, -1) == [b"a", b"b"]
