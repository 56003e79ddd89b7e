"""Kafka topic definitions: default names, partitioning and what each carries."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PARTITIONS = 4


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's role. Names and partition counts are configurable per deployment."""

    role: str
    default_name: str
    key: str
    value: str
    written_by: str


TOPICS: dict[str, TopicSpec] = {
    spec.role: spec
    for spec in (
        TopicSpec("clicks", "clicks", "user_id", "Click", "gateway, producers"),
        TopicSpec("rewards", "rewards", "user_id", "Reward", "gateway, producers"),
        TopicSpec("impressions", "impressions", "user_id", "Impression", "serving, producers"),
        TopicSpec("feedback", "feedback", "user_id", "Feedback", "joiner"),
        TopicSpec(
            "dead_letter",
            "dead-letter",
            "original key",
            "original bytes; reason and source in headers",
            "every consumer",
        ),
    )
}
