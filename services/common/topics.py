"""Topic administration: create streamrec's topics, replicated as configured."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from contracts.errors import StreamrecError
from services.common.settings import KafkaSettings, TopicSettings

log = logging.getLogger(__name__)


class TopicError(StreamrecError, RuntimeError):
    """Topics could not be created or are not usable as configured."""


def ensure_topics(
    admin_config: Mapping[str, object],
    topics: Mapping[str, int],
    *,
    replication_factor: int = 1,
    configs: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> None:
    """Create each topic with its partition count unless it exists already.

    ``replication_factor`` and the topic ``configs`` (e.g. ``min.insync.replicas``)
    apply to the topics created here; existing topics are left as they are.
    """
    admin = KafkaAdminClient(**admin_config)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, parts, replication_factor, topic_configs=dict(configs or {}))
            for name, parts in topics.items()
            if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=int(timeout * 1000))
            except TopicAlreadyExistsError:
                log.info("topics created concurrently: %s", [t.name for t in missing])
        deadline = time.monotonic() + timeout
        while set(topics) - set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise TopicError(f"topics not visible after {timeout:.0f} s: {sorted(topics)}")
            time.sleep(0.1)
    except KafkaError as exc:
        raise TopicError(f"could not create topics {sorted(topics)}: {exc}") from exc
    finally:
        admin.close()


def create_topics(kafka: KafkaSettings, topics: TopicSettings) -> None:
    """Create the configured topics that do not exist yet (``streamrec topics``)."""
    ensure_topics(
        kafka.admin(),
        topics.all(),
        replication_factor=topics.replication_factor,
        configs={"min.insync.replicas": str(topics.min_insync_replicas)},
    )
