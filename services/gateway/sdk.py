"""A small producer SDK for services that write events to Kafka directly.

Events are validated exactly as the gateway and the consumers validate them
(encode, then decode with the contracts' limits) before they are sent, keyed by
user so that clicks and impressions of one user share a partition.
"""

from __future__ import annotations

from collections.abc import Iterable

from kafka import KafkaProducer
from kafka.errors import KafkaError
from kafka.producer.future import FutureRecordMetadata

from contracts.events import Click, Impression, decode_click, decode_impression, encode
from services.common import clients
from services.common.settings import KafkaSettings, TopicSettings


class EventProducer:
    """Validates and produces Click and Impression events (``acks=all``)."""

    def __init__(
        self,
        kafka: KafkaSettings | None = None,
        topics: TopicSettings | None = None,
        *,
        producer: KafkaProducer | None = None,
    ) -> None:
        self.topics = topics or TopicSettings()
        self._producer = producer or clients.producer(kafka or KafkaSettings())

    def send_click(self, click: Click) -> FutureRecordMetadata:
        """Validate and send one click; raises ``EventError`` if it is invalid."""
        raw = encode(click)
        decode_click(raw)
        return self._producer.send(self.topics.clicks, key=click.user_id.encode(), value=raw)

    def send_impression(self, impression: Impression) -> FutureRecordMetadata:
        """Validate and send one impression; raises ``EventError`` if it is invalid."""
        raw = encode(impression)
        decode_impression(raw)
        return self._producer.send(
            self.topics.impressions, key=impression.user_id.encode(), value=raw
        )

    def send_raw(self, topic: str, user_id: str, raw: bytes) -> FutureRecordMetadata:
        """Send bytes already validated by the caller (the gateway's batch path)."""
        return self._producer.send(topic, key=user_id.encode(), value=raw)

    def wait(self, futures: Iterable[FutureRecordMetadata], timeout: float = 30.0) -> None:
        """Block until every send is acknowledged; raises the first Kafka error."""
        self._producer.flush(timeout)
        for future in futures:
            future.get(timeout=0)

    def connected(self) -> bool:
        """Whether the broker answers with metadata for the clicks topic."""
        try:
            return bool(self._producer.partitions_for(self.topics.clicks))
        except KafkaError:
            return False

    def flush(self, timeout: float = 30.0) -> None:
        self._producer.flush(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self._producer.close(timeout=timeout)
