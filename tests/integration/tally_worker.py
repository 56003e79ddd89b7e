"""A consumer process for runtime tests: tallies clicks per partition.

State per partition is (count, sum of the click's sequence number), checkpointed
with the offsets, so exactly-once shows as count == N and sum == N(N-1)/2.
Run: python -m tests.integration.tally_worker TOPIC GROUP NAMESPACE
(Kafka/Redis from KAFKA_BOOTSTRAP_SERVERS / REDIS_URL).
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

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
from services.common.service import run_runtime
from tests.integration.processes import FAST_FAILOVER_SETTINGS

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


def tally_runtime(
    topic: str,
    group: str,
    processor: TallyProcessor,
    *,
    redis_settings: RedisSettings,
    settings: RuntimeSettings,
    registry: CollectorRegistry,
    bootstrap: str | None = None,
    clock: Callable[[], float] = time.time,
) -> ConsumerRuntime:
    """A tally consumer of ``topic`` (dead letters to ``<topic>-dlq``) with the fault tests'
    short sessions; Kafka from the environment unless ``bootstrap``."""
    address = {"bootstrap_servers": bootstrap} if bootstrap else {}
    return ConsumerRuntime(
        service="tally",
        group=group,
        inputs={topic: decode_click},
        processor=processor,
        kafka=KafkaSettings(**FAST_FAILOVER_SETTINGS, **address),
        redis_settings=redis_settings,
        topics=TopicSettings(dead_letter=f"{topic}-dlq"),
        settings=settings,
        registry=registry,
        clock=clock,
    )


def main() -> int:
    topic, group, namespace = sys.argv[1:4]
    return run_runtime(
        "tally",
        lambda registry: tally_runtime(
            topic,
            group,
            TallyProcessor(),
            redis_settings=RedisSettings(namespace=namespace),
            settings=RuntimeSettings(checkpoint_interval_s=0.2, max_batch=500),
            registry=registry,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
