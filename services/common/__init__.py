"""The shared consumer runtime: settings, clients, checkpoints, metrics, the loop."""

from __future__ import annotations

from services.common.checkpoint import Checkpoint, CheckpointStore
from services.common.runtime import ConsumerRuntime, Context, Processor, Record, Rejection
from services.common.settings import KafkaSettings, RedisSettings, RuntimeSettings, TopicSettings

__all__ = [
    "Checkpoint",
    "CheckpointStore",
    "ConsumerRuntime",
    "Context",
    "KafkaSettings",
    "Processor",
    "Record",
    "RedisSettings",
    "Rejection",
    "RuntimeSettings",
    "TopicSettings",
]
