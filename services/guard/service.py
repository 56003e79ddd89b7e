"""``streamrec run guard``: watches each policy's live feedback and rolls back a harmful update.

For every guarded policy the guard runs the sequential test of
:mod:`services.guard.sequential` on its feedback, against the ``random`` policy's
feedback of the same seconds (or the policy's own past), as one-second buckets of
impression time close (:mod:`services.guard.watch`). When the statistic reaches the
threshold it pins the model (the policy's name) to the last good version -- the
newest retained version that served the policy ``rollback_margin_s`` before the
estimated change point -- with :meth:`~services.paramstore.ParamStore.pin`
(``by="guard"``, the reason: rates, clicks, statistic, threshold), logs the same,
sets ``streamrec_guard_tripped{policy}`` to 1 and counts
``streamrec_guard_alarms_total{policy}``. Serving then answers with the pinned
version while the learners go on learning.

While any pin of a model stands the guard does not act on it. A person removes the
guard's pin (``streamrec models unpin``); the guard notices within
``pin_check_s`` and starts the policy's test afresh from the next bucket, with a new
reference. Any change of a model's pin restarts its test in the same way.

**State and exactly-once.** The counts are kept per partition of ``feedback``
(:class:`~services.guard.watch.PartitionCounts`) and checkpointed with that
partition's offsets, so a restart resumes at the checkpoint and counts each
feedback once. The test itself runs over all partitions this process owns: run one
replica (deploy/ does), or each replica tests its share of the traffic (the bound
holds for each, detection is slower). The reset points travel in every partition's
checkpoint. A pin is the guard's only effect, and it is idempotent across
restarts: a replayed alarm finds the guard's pin already standing and does nothing.

Run: ``streamrec run guard`` or ``python -m services.guard.service``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import Feedback, decode_feedback
from services.common import Checkpoint, Context, Processor, Record, Rejection
from services.common.clients import REDIS_ERRORS
from services.common.service import ServiceSpec, Wiring, run_service
from services.guard.sequential import Design
from services.guard.watch import Alarm, PartitionCounts, Watch
from services.paramstore import ModelNotFound, ParamStore, Pin, VersionInfo

log = logging.getLogger(__name__)

SERVICE = "guard"
#: Who the guard's pins are by.
GUARD = "guard"


class GuardSettings(BaseSettings):
    """Guard settings (``STREAMREC_GUARD_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_GUARD_", env_file=".env", extra="ignore"
    )

    group: str = SERVICE
    """``STREAMREC_GUARD_GROUP``: the Kafka consumer group (and checkpoint group)."""
    policies: list[str] = Field(default_factory=lambda: ["linucb", "ts", "ts_beta", "egreedy"])
    """``STREAMREC_GUARD_POLICIES``: JSON list of the policies guarded; each policy's model
    in the parameter store has its name."""
    reference: str = "random"
    """``STREAMREC_GUARD_REFERENCE``: the policy each is compared with over the same seconds,
    or ``self`` to compare each with its own recent past."""
    drop: float = Field(0.3, gt=0, lt=1)
    """``STREAMREC_GUARD_DROP``: the relative drop of the lift (or click rate) the test is
    tuned for."""
    threshold: float = Field(14.5, gt=0)
    """``STREAMREC_GUARD_THRESHOLD``: ``h``; expected false alarms per policy are at most
    ``3600 / bucket_s * exp(-h)`` an hour (1.8e-3 at the defaults)."""
    bucket_s: float = Field(1.0, gt=0)
    """``STREAMREC_GUARD_BUCKET_S``: seconds of impression time per bucket."""
    reference_s: float = Field(300.0, gt=0)
    """``STREAMREC_GUARD_REFERENCE_S``: seconds before a candidate change point that form
    its reference."""
    window_s: float = Field(120.0, gt=0)
    """``STREAMREC_GUARD_WINDOW_S``: candidate change points lie this far back at most."""
    min_clicks: int = Field(200, ge=1)
    """``STREAMREC_GUARD_MIN_CLICKS``: clicks a reference must hold (of the policy and of the
    reference policy) before the test runs."""
    z: float = Field(2.0, ge=0)
    """``STREAMREC_GUARD_Z``: standard errors below the reference's estimate that the test
    takes as the level before the change."""
    lateness_s: float = Field(2.0, ge=0)
    """``STREAMREC_GUARD_LATENESS_S``: a bucket closes when feedback this much newer arrived."""
    rollback_margin_s: float = Field(30.0, ge=0)
    """``STREAMREC_GUARD_ROLLBACK_MARGIN_S``: pin the version that served this long before
    the estimated change point (which lags the start of a harm that builds up gradually:
    by 11 to 16 s on the simulator, benchmarks/results/guard.json)."""
    pin_check_s: float = Field(1.0, gt=0)
    """``STREAMREC_GUARD_PIN_CHECK_S``: how often the models' pins are read (to see an unpin)."""

    @model_validator(mode="after")
    def _check(self) -> GuardSettings:
        if not self.policies:
            raise ValueError("STREAMREC_GUARD_POLICIES is empty")
        if self.reference in self.policies:
            raise ValueError(f"the reference {self.reference!r} is also a guarded policy")
        return self

    def design(self) -> Design:
        return Design(
            drop=self.drop,
            threshold=self.threshold,
            z=self.z,
            reference_buckets=max(1, round(self.reference_s / self.bucket_s)),
            window_buckets=max(1, round(self.window_s / self.bucket_s)),
            min_reference_clicks=self.min_clicks,
        )

    def watch(self) -> Watch:
        return Watch(
            self.policies,
            reference=self.reference,
            design=self.design(),
            bucket_s=self.bucket_s,
            lateness_s=self.lateness_s,
            margin_buckets=round(self.rollback_margin_s / self.bucket_s),
        )


class PinStore(Protocol):
    """What the guard needs of :class:`~services.paramstore.ParamStore`."""

    def pin_of(self, model: str) -> Pin | None: ...

    def pin(self, model: str, version: int, *, reason: str, by: str = "operator") -> Pin: ...

    def history(self, model: str) -> list[VersionInfo]: ...


class GuardMetrics:
    def __init__(self, registry: CollectorRegistry, design: Design, bucket_s: float) -> None:
        self.tripped = Gauge(
            "streamrec_guard_tripped",
            "1 while the guard's pin of the policy's model stands, else 0.",
            ["policy"],
            registry=registry,
        )
        self.alarms = Counter(
            "streamrec_guard_alarms_total",
            "Alarms of the guard's sequential test, by policy (each pins the last good version).",
            ["policy"],
            registry=registry,
        )
        self.statistic = Gauge(
            "streamrec_guard_statistic",
            "The test's log likelihood ratio at the newest closed bucket, by policy.",
            ["policy"],
            registry=registry,
        )
        self.threshold = Gauge(
            "streamrec_guard_threshold",
            "The statistic at which the guard alarms.",
            registry=registry,
        )
        self.false_alarm_bound = Gauge(
            "streamrec_guard_false_alarm_bound_per_hour",
            "The bound on expected false alarms per policy an hour at the configured threshold.",
            registry=registry,
        )
        self.late = Counter(
            "streamrec_guard_late_total",
            "Feedback not counted: it arrived after its bucket closed in its partition.",
            registry=registry,
        )
        self.pin_failures = Counter(
            "streamrec_guard_pin_failures_total",
            "Alarms whose pin failed (Redis error, or no retained version to roll back to).",
            ["policy"],
            registry=registry,
        )
        self.threshold.set(design.threshold)
        self.false_alarm_bound.set(design.false_alarms_per_hour(bucket_s=bucket_s))


class GuardProcessor(Processor):
    """Per-partition feedback counts; the test over all owned partitions; pins on alarm."""

    def __init__(
        self,
        settings: GuardSettings,
        store: PinStore,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.store = store
        self.watch = settings.watch()
        self.metrics = GuardMetrics(
            registry or CollectorRegistry(), self.watch.design, settings.bucket_s
        )
        self.clock = clock
        self.partitions: dict[int, PartitionCounts] = {}
        #: Per policy, the pin last read (None: none stands); absent until first read.
        self.pins: dict[str, Pin | None] = {}
        self._checked = -math.inf
        for policy in settings.policies:
            self.metrics.tripped.labels(policy).set(0)
            self.metrics.statistic.labels(policy).set(0)
            self.metrics.alarms.labels(policy)
            self.metrics.pin_failures.labels(policy)

    # -- the batch path ---------------------------------------------------------------

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        late = 0
        for record in records:
            fb: Feedback = record.value
            if not self.watch.counts(fb.policy):
                continue
            counts = self.partitions[record.partition]
            if not self.watch.add(
                counts, fb.policy, ts=fb.ts, reward=int(fb.clicked), version=fb.model_version
            ):
                late += 1
        if late:
            self.metrics.late.inc(late)
        self._evaluate()
        return []

    def tick(self, now: float, ctx: Context) -> None:
        if now - self._checked >= self.settings.pin_check_s:
            self._checked = now
            self._check_pins()

    def _evaluate(self) -> None:
        owned = list(self.partitions.values())
        alarms = self.watch.evaluate(owned)
        for policy, value in self.watch.statistics.items():
            self.metrics.statistic.labels(policy).set(value)
        for alarm in alarms:
            self._act(alarm)
        self.watch.prune(owned)

    # -- pins -------------------------------------------------------------------------

    def _check_pins(self) -> None:
        """Read each model's pin; a pin set or removed since the last read restarts the
        policy's test."""
        for policy in self.settings.policies:
            try:
                pin = self.store.pin_of(policy)
            except REDIS_ERRORS as exc:
                log.warning("cannot read the pin of %s (%s); checking again later", policy, exc)
                return
            self._saw(policy, pin)

    def _saw(self, policy: str, pin: Pin | None) -> None:
        if policy in self.pins and self.pins[policy] != pin:
            before = self.pins[policy]
            if before is not None and before.by == GUARD and pin is None:
                log.warning(
                    "%s: the guard's pin of v%d was removed; the test starts afresh",
                    policy,
                    before.version,
                )
            self.watch.reset(policy, self.partitions.values())
        self.pins[policy] = pin
        self.metrics.tripped.labels(policy).set(int(pin is not None and pin.by == GUARD))

    def _act(self, alarm: Alarm) -> None:
        policy = alarm.policy
        try:
            standing = self.store.pin_of(policy)
        except REDIS_ERRORS as exc:
            self._failed(alarm, f"cannot read its pin: {exc}; trying again", retry=True)
            return
        self._saw(policy, standing)
        if standing is not None:
            # A pin stands (the guard's, replayed after a restart, or an operator's).
            log.info(
                "%s: alarm while v%d is pinned by %s; nothing to do (%s)",
                policy,
                standing.version,
                standing.by,
                alarm.reason(),
            )
            return
        if alarm.last_good_version is None:
            self._failed(alarm, "no version served before the change point")
            return
        try:
            version = self._retained(policy, alarm.last_good_version)
            if version is None:
                self._failed(alarm, f"no retained version at or before v{alarm.last_good_version}")
                return
            pin = self.store.pin(policy, version, reason=alarm.reason(), by=GUARD)
        except ModelNotFound as exc:
            self._failed(alarm, str(exc))
            return
        except REDIS_ERRORS as exc:
            self._failed(alarm, f"{exc}; trying again at the next bucket", retry=True)
            return
        self.metrics.alarms.labels(policy).inc()
        log.error("%s: pinned v%d -- %s", policy, pin.version, alarm.reason())
        self._saw(policy, pin)

    def _retained(self, model: str, newest: int) -> int | None:
        """The newest retained version of ``model`` at or before ``newest``."""
        kept = [v.version for v in self.store.history(model) if v.version <= newest]
        return max(kept, default=None)

    def _failed(self, alarm: Alarm, why: str, *, retry: bool = False) -> None:
        """The alarm could not pin: say so. After a Redis error (``retry``) the next
        bucket is tested as if there had been no alarm; otherwise the alarm counts and
        the test restarts from the next bucket."""
        self.metrics.pin_failures.labels(alarm.policy).inc()
        log.error("%s: alarm, but no pin (%s) -- %s", alarm.policy, why, alarm.reason())
        if retry:
            self.watch.retry(alarm)
        else:
            self.metrics.alarms.labels(alarm.policy).inc()

    # -- state ------------------------------------------------------------------------

    def snapshot(self, partition: int) -> bytes:
        return self.partitions[partition].encode(self.watch.floors)

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        counts, floors = PartitionCounts(), dict[str, int]()
        if checkpoint is not None and checkpoint.state:
            counts, floors = PartitionCounts.decode(checkpoint.state)
        self.partitions[partition] = counts
        self.watch.restore_floors(floors)
        return None

    def revoke(self, partition: int) -> None:
        self.partitions.pop(partition, None)


def _processor(wiring: Wiring[GuardSettings]) -> GuardProcessor:
    store = ParamStore(
        wiring.redis_client(), keys=wiring.redis_settings.keys(), registry=wiring.registry
    )
    return GuardProcessor(wiring.settings, store, wiring.registry)


SPEC = ServiceSpec(
    name=SERVICE,
    settings=GuardSettings,
    inputs=lambda topics: {topics.feedback: decode_feedback},
    make_processor=_processor,
    runtime_defaults=lambda settings: {"checkpoint_interval_s": 1.0},
)


def main() -> int:
    """Run the guard until SIGTERM."""
    return run_service(SPEC)


if __name__ == "__main__":
    sys.exit(main())
