"""The sequences service: ``clicks`` → each user's capped, time-ordered sequence in Redis.

Exactly-once lives with the writes (:mod:`services.sequences.store`): every
user's applied offsets are stored with their sequence, so the per-partition
checkpoint state is empty and a restart simply resumes at the checkpointed
offsets; whatever is redelivered in between is skipped by the store.

A Redis failure during a batch is retried with exponential backoff, then
raised: the process dies, the supervisor restarts it, and the batch is
redelivered and applied once. The runtime checkpoints on its way out, also
after an error, and by then it has advanced the offsets past the failed batch;
so once a batch has failed, :meth:`SequencesProcessor.snapshot` refuses, which
keeps that checkpoint from being written.

Run: ``streamrec run sequences`` or ``python -m services.sequences.service``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import EventError, check_clock, decode_click
from services.common import (
    Checkpoint,
    Context,
    Processor,
    Record,
    Rejection,
)
from services.common.clients import REDIS_ERRORS
from services.common.service import ServiceSpec, Wiring, run_service
from services.sequences.store import DEFAULT_MAX_LEN, DEFAULT_TTL_S, AppendStats, SequenceStore

log = logging.getLogger(__name__)

SERVICE = "sequences"


class SequencesSettings(BaseSettings):
    """Sequences service settings (``STREAMREC_SEQUENCES_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_SEQUENCES_", env_file=".env", extra="ignore"
    )

    group: str = SERVICE
    """``STREAMREC_SEQUENCES_GROUP``: the Kafka consumer group (and checkpoint group)."""
    max_len: int = Field(DEFAULT_MAX_LEN, ge=1)
    """``STREAMREC_SEQUENCES_MAX_LEN``: clicks kept per user; older ones are dropped."""
    ttl_s: int = Field(DEFAULT_TTL_S, ge=1)
    """``STREAMREC_SEQUENCES_TTL_S``: a user's keys expire this long after their last click."""
    redis_retries: int = Field(5, ge=0)
    """``STREAMREC_SEQUENCES_REDIS_RETRIES``: retries of a failed batch write before exiting
    (on top of the Redis client's own reconnect attempts)."""
    retry_backoff_s: float = Field(0.2, ge=0)
    """``STREAMREC_SEQUENCES_RETRY_BACKOFF_S``: first retry delay, doubled each time."""


class SequencesMetrics:
    """The service's own series, next to the runtime's ``streamrec_consumer_*``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.clicks = Counter(
            "streamrec_sequences_clicks_total",
            "Click records by outcome: added, duplicate (event already stored), "
            "redelivered (offset already applied).",
            ["outcome"],
            registry=registry,
        )
        self.redis_retries = Counter(
            "streamrec_sequences_redis_retries_total",
            "Batch writes retried after a Redis error.",
            registry=registry,
        )

    def record(self, stats: AppendStats) -> None:
        self.clicks.labels("added").inc(stats.added)
        self.clicks.labels("duplicate").inc(stats.duplicates)
        self.clicks.labels("redelivered").inc(stats.redelivered)


class SequencesProcessor(Processor):
    """Appends each batch of clicks to the users' sequences; holds no state of its own."""

    def __init__(
        self,
        store: SequenceStore,
        *,
        retries: int = 5,
        backoff_s: float = 0.2,
        metrics: SequencesMetrics | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.store = store
        self.retries = retries
        self.backoff_s = backoff_s
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        # A click stamped far ahead would sit on top of its user's sequence until
        # it expires; producers that bypass the gateway's check meet it here.
        now = self.clock()
        good, rejected = [], []
        for record in records:
            try:
                check_clock(record.value.ts, now)
                good.append(record)
            except EventError as exc:
                rejected.append(Rejection(record, exc.reason))
        stats = self._append(good)
        if self.metrics is not None:
            self.metrics.record(stats)
        return rejected

    def _append(self, records: list[Record]) -> AppendStats:
        # Retrying the whole batch is safe: what was applied before the error is
        # skipped by the offset marks.
        attempt = 0
        while True:
            try:
                return self.store.append(records)
            except REDIS_ERRORS as exc:
                if attempt == self.retries:
                    raise  # the runtime then exits without checkpointing this batch
                delay = self.backoff_s * 2**attempt
                attempt += 1
                log.warning("sequence write failed (retry %d in %.1f s): %s", attempt, delay, exc)
                if self.metrics is not None:
                    self.metrics.redis_retries.inc()
                self.sleep(delay)

    def snapshot(self, partition: int) -> bytes:
        """Empty: the offsets that matter are stored with each user's writes."""
        return b""

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        """Resume at the checkpointed offsets; the store skips what it already has."""
        return None

    def revoke(self, partition: int) -> None:
        """Nothing to drop: the state is in Redis, keyed by user."""


def _processor(wiring: Wiring[SequencesSettings]) -> SequencesProcessor:
    settings = wiring.settings
    store = SequenceStore(
        wiring.redis_client(),
        keys=wiring.redis_settings.keys(),
        max_len=settings.max_len,
        ttl_s=settings.ttl_s,
    )
    return SequencesProcessor(
        store,
        retries=settings.redis_retries,
        backoff_s=settings.retry_backoff_s,
        metrics=SequencesMetrics(wiring.registry),
    )


SPEC = ServiceSpec(
    name=SERVICE,
    settings=SequencesSettings,
    inputs=lambda topics: {topics.clicks: decode_click},
    make_processor=_processor,
)


def main() -> int:
    """Run the sequences service until SIGTERM."""
    return run_service(SPEC)


if __name__ == "__main__":
    sys.exit(main())
