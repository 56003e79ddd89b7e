"""A consumer process for runtime tests: tallies clicks per partition.

State per partition is (count, sum of the click's sequence number), checkpointed
with the offsets, so exactly-once shows as count == N and sum == N(N-1)/2.
Run: python -m tests.integration.tally_worker TOPIC GROUP NAMESPACE
(Kafka/Redis from KAFKA_BOOTSTRAP_SERVERS / REDIS_URL).
"""

from __future__ import annotations

import struct
import sys

from contracts.events import decode_click
from services.common import (
    Checkpoint,
    ConsumerRuntime,
    Context,
    KafkaSettings,
    Processor,
    Record,
    RedisSettings,
    Rejection,
    RuntimeSettings,
    TopicSettings,
)
from services.common.process import run_consumer_service

TALLY = struct.Struct("<qq")


class TallyProcessor(Processor):
    def __init__(self) -> None:
        self.tally: dict[int, list[int]] = {}

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        rejected = []
        for record in records:
            if record.value.item_id == "reject-me":
                rejected.append(Rejection(record, "unknown item: reject-me"))
                continue
            tally = self.tally[record.partition]
            tally[0] += 1
            tally[1] += int(record.value.event_id[1:])
        return rejected

    def snapshot(self, partition: int) -> bytes:
        return TALLY.pack(*self.tally[partition])

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> None:
        state = checkpoint.state if checkpoint and checkpoint.state else TALLY.pack(0, 0)
        self.tally[partition] = list(TALLY.unpack(state))
        return None

    def revoke(self, partition: int) -> None:
        del self.tally[partition]


def main() -> int:
    topic, group, namespace = sys.argv[1:4]
    redis_settings = RedisSettings(namespace=namespace)
    topics = TopicSettings(dead_letter=f"{topic}-dlq")
    return run_consumer_service(
        "tally",
        lambda registry: ConsumerRuntime(
            service="tally",
            group=group,
            inputs={topic: decode_click},
            processor=TallyProcessor(),
            kafka=KafkaSettings(max_poll_interval_ms=3000, session_timeout_ms=3000),
            redis_settings=redis_settings,
            topics=topics,
            settings=RuntimeSettings(checkpoint_interval_s=0.2, max_batch=500),
            registry=registry,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
