"""``streamrec run bandits``: feedback in, versioned bandit parameters out.

Each configured policy (e.g. ``linucb``, ``ts``) is a learner. Its statistics are
kept per Kafka partition of ``feedback`` (docs/decisions.md §7): the process that owns a
partition updates that partition's learners, checkpoints them with the offsets,
and then publishes them to the parameter store as the part ``p<partition>`` of
the policy's model. Readers sum the parts, so one process or eight publish the
same model, and a rebalance only moves which process publishes a part.

Arms are created from item ids that producers send, so each learner is capped
at ``max_arms`` (:meth:`~services.bandits.BanditLearner.limit_arms`): memory and
checkpoints stay bounded whatever ids arrive. Every feedback is applied; when a
learner is full, the arms evicted first are those on probation (fewer than
``admit_after`` updates), then the least recently updated, and arms of items in
the published catalog (serving's ``catalog_features``) only when every arm is
one. The eviction order is a function of the partition's feedback and is
checkpointed (``.recency/<policy>``), so a partition's part does not depend on
batching, restarts or which process owns it. Until a learner fills up, the
merged model equals one learner on all feedback; after, an arm evicted in one
partition lacks that partition's updates from before the eviction (counted in
``streamrec_bandits_evicted_updates_total``). The catalog is read from Redis
when it changes; it only orders eviction, so it cannot make a model differ
before the cap is reached.

Feedback of a policy no learner here learns from is counted in
``streamrec_bandits_ignored_total``, labelled by policy only for configured and
``known_policies`` names (anything else is ``other``), so an invented policy
name cannot add series.

Position-aware policies (``position_aware``, docs/decisions.md §23) learn under the
position-based model: each partition keeps an :class:`~services.bandits.position.
ExaminationModel` fed by the feedback of randomised slates (``examination_from``,
the ``random`` policy by default; checkpointed as ``.examination/*``), and every
feedback of such a policy is weighted by the examination probability of its slot as
estimated from the feedback before it in the partition, so the part published is
still a function of the partition's log alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge
from redis.cluster import RedisCluster

from contracts.events import MAX_SLATE, Feedback, decode_feedback
from contracts.ids import item_labels
from contracts.keys import KeySpace
from contracts.params import decode_params, encode_params
from services.bandits.base import BanditLearner
from services.bandits.factory import LEARNERS, learner_class, new_learner
from services.bandits.position import ExaminationModel
from services.bandits.settings import BanditsSettings
from services.common import (
    Checkpoint,
    Context,
    Processor,
    Record,
    Rejection,
)
from services.common.clients import REDIS_ERRORS
from services.common.service import ServiceSpec, Wiring, run_service
from services.paramstore import ParamStore, StalePublish

log = logging.getLogger(__name__)

#: The metric label of a policy name that is neither configured nor known.
OTHER_POLICY = "other"
#: Checkpoint arrays named ``RECENCY/<policy>`` hold a learner's eviction order.
RECENCY = ".recency"
#: Checkpoint arrays named ``EXAMINATION/<name>`` hold a partition's examination model.
EXAMINATION = ".examination"
#: Largest checkpoint of one partition that ``max_arms`` may allow: half of the 512 MB
#: Redis accepts in one value, leaving room for the rest of the checkpoint write.
CHECKPOINT_BUDGET_BYTES = 256 * 2**20


class BanditsMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.updates = Counter(
            "streamrec_bandits_updates_total",
            "Feedback records applied, by policy.",
            ["policy"],
            registry=registry,
        )
        self.rewards = Counter(
            "streamrec_bandits_rewards_total",
            "Sum of rewards applied, by policy.",
            ["policy"],
            registry=registry,
        )
        self.ctr = Gauge(
            "streamrec_bandits_ctr_ratio",
            "Click-through rate of each policy's feedback over the last 10k items.",
            ["policy"],
            registry=registry,
        )
        self.ignored = Counter(
            "streamrec_bandits_ignored_total",
            "Feedback of policies that no learner here learns from (unknown names: other).",
            ["policy"],
            registry=registry,
        )
        self.arms = Gauge(
            "streamrec_bandits_arms",
            "Arms held, by policy, summed over the partitions this process owns.",
            ["policy"],
            registry=registry,
        )
        self.evicted_arms = Counter(
            "streamrec_bandits_evicted_arms_total",
            "Arms evicted from full learners, by policy and reason (probation, cold, catalog).",
            ["policy", "reason"],
            registry=registry,
        )
        self.examination_updates = Counter(
            "streamrec_bandits_examination_updates_total",
            "Feedback of randomised slates counted by the position (examination) model.",
            registry=registry,
        )
        self.evicted_updates = Counter(
            "streamrec_bandits_evicted_updates_total",
            "Feedback whose statistics left the model with an evicted arm, by policy and reason.",
            ["policy", "reason"],
            registry=registry,
        )


class CatalogSource(Protocol):
    """Where the labels of the catalog's items come from (sorted, distinct int64)."""

    def labels(self) -> np.ndarray: ...


class CatalogLabels:
    """Labels of the items in the published catalog, re-read when the catalog changes.

    The catalog is serving's ``catalog_features`` hash (written by
    :func:`services.catalog.publish_catalog`). It is checked on the
    consumer thread at most every ``refresh_s``: one GET of its version, and
    HKEYS only when the version moved. If Redis fails, the labels read last keep
    serving: the catalog only orders eviction, so a stale one costs little.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        keys: KeySpace,
        *,
        refresh_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._redis = client
        self._keys = keys
        self.refresh_s = refresh_s
        self._clock = clock
        self._labels = np.empty(0, dtype=np.int64)
        self._version: int | None = None
        self._checked = -math.inf
        self._failing = False

    def labels(self) -> np.ndarray:
        """The catalog's labels (the same array object until the catalog changes)."""
        now = self._clock()
        if now - self._checked >= self.refresh_s:
            self._checked = now
            self._refresh()
        return self._labels

    def _refresh(self) -> None:
        try:
            version = int(self._redis.get(self._keys.catalog_version()) or 0)
            if version != self._version:
                ids = cast(list[bytes], self._redis.hkeys(self._keys.catalog_features()))
                self._labels = np.unique(item_labels([raw.decode() for raw in ids]))
                # The version was read before the keys: a catalog written in between
                # leaves a newer version behind, so it is read again next time.
                self._version = version
        except REDIS_ERRORS as exc:
            if not self._failing:
                log.warning("cannot read the item catalog (%s); the last one read serves", exc)
            self._failing = True
            return
        self._failing = False


class BanditsProcessor(Processor):
    """Per-partition learners for every configured policy."""

    def __init__(
        self,
        settings: BanditsSettings,
        store: ParamStore | None,
        registry: CollectorRegistry | None = None,
        catalog: CatalogSource | None = None,
    ) -> None:
        for policy, spec in settings.policies.items():
            if spec.get("learner") not in LEARNERS:
                raise ValueError(f"policy {policy!r}: learner must be one of {sorted(LEARNERS)}")
            if "/" in policy or policy.startswith("."):
                raise ValueError(f"policy {policy!r}: names hold no '/' and start with no '.'")
        for policy in settings.position_aware:
            if policy not in settings.policies:
                raise ValueError(f"position_aware names {policy!r}, which is no configured policy")
            learner = str(settings.policies[policy]["learner"])
            if not learner_class(learner).learns_positions():
                raise ValueError(
                    f"policy {policy!r}: learner {learner} cannot learn position-aware; "
                    "use linucb, hybrid_linucb, ts_linear or ts_beta"
                )
        per_arm = sum(
            self._new_learner(spec, settings).state_bytes_per_arm()
            for spec in settings.policies.values()
        )
        if settings.max_arms * per_arm > CHECKPOINT_BUDGET_BYTES:
            raise ValueError(
                f"max_arms={settings.max_arms} lets one partition's checkpoint reach "
                f"{settings.max_arms * per_arm / 2**20:.0f} MiB ({per_arm} bytes an arm over "
                f"all policies), over the {CHECKPOINT_BUDGET_BYTES // 2**20} MiB budget; "
                f"set STREAMREC_BANDITS_MAX_ARMS to at most {CHECKPOINT_BUDGET_BYTES // per_arm}"
            )
        self.settings = settings
        self.store = store
        self.catalog = catalog
        self.metrics = BanditsMetrics(registry or CollectorRegistry())
        self.learners: dict[int, dict[str, BanditLearner]] = {}
        #: Feedback each policy's learner has applied, per partition (checkpointed; published
        #: as ``meta["events"]``, so ``streamrec models list`` shows events seen).
        self.events: dict[int, defaultdict[str, int]] = {}
        #: Each partition's position model (checkpointed).
        self.examination: dict[int, ExaminationModel] = {}
        self._position_aware = set(settings.position_aware)
        self._examination_from = set(settings.examination_from)
        self._window: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self._labelled = {*settings.policies, *settings.known_policies}
        self._catalog_labels = np.empty(0, dtype=np.int64)
        self._full: set[tuple[int, str]] = set()

    @staticmethod
    def _new_learner(spec: Mapping[str, Any], settings: BanditsSettings) -> BanditLearner:
        return new_learner(
            spec, context_dim=settings.context_dim, item_dim=settings.item_dim, seed=settings.seed
        )

    def _fresh(self) -> dict[str, BanditLearner]:
        return {
            p: self._limited(self._new_learner(spec, self.settings))
            for p, spec in self.settings.policies.items()
        }

    def _limited(self, learner: BanditLearner) -> BanditLearner:
        """``learner`` with this service's cap and the current catalog."""
        learner.set_catalog(self._catalog_labels)
        learner.limit_arms(self.settings.max_arms, admit_after=self.settings.admit_after)
        return learner

    def policy_label(self, policy: str) -> str:
        """``policy`` as a metric label: itself if configured or known, else ``other``."""
        return policy if policy in self._labelled else OTHER_POLICY

    def _refresh_catalog(self) -> None:
        if self.catalog is None:
            return
        labels = self.catalog.labels()
        if labels is not self._catalog_labels:
            self._catalog_labels = labels
            for learners in self.learners.values():
                for learner in learners.values():
                    learner.set_catalog(labels)

    def _count_evictions(self, partition: int, policy: str, learner: BanditLearner) -> None:
        evicted = learner.drain_evictions()
        if not evicted:
            return
        if (partition, policy) not in self._full:
            self._full.add((partition, policy))
            log.warning(
                "policy %s, partition %d: %d arms reached max_arms=%d; evicting the coldest"
                " (streamrec_bandits_evicted_*)",
                policy,
                partition,
                learner.n_arms,
                self.settings.max_arms,
            )
        for reason, (arms, updates) in evicted.items():
            self.metrics.evicted_arms.labels(policy, reason).inc(arms)
            self.metrics.evicted_updates.labels(policy, reason).inc(updates)

    def _count_arms(self) -> None:
        for policy in self.settings.policies:
            held = sum(learners[policy].n_arms for learners in self.learners.values())
            self.metrics.arms.labels(policy).set(held)

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        self._refresh_catalog()
        rejected: list[Rejection] = []
        grouped: dict[tuple[int, str], list[Feedback]] = defaultdict(list)
        # Examination probability of each grouped feedback of a position-aware policy.
        examined: dict[tuple[int, str], list[float]] = defaultdict(list)
        for record in records:
            fb: Feedback = record.value
            model = self.examination[record.partition]
            if fb.policy in self._examination_from:
                model.observe_one(fb.position, float(fb.reward))
                self.metrics.examination_updates.inc()
            if self.settings.learn_from == "all":
                targets = list(self.settings.policies)
            elif fb.policy in self.settings.policies:
                targets = [fb.policy]
            else:
                self.metrics.ignored.labels(self.policy_label(fb.policy)).inc()
                continue
            if reason := self._invalid(fb, targets):
                rejected.append(Rejection(record, reason))
                continue
            for policy in targets:
                grouped[(record.partition, policy)].append(fb)
                if policy in self._position_aware:
                    theta = model.theta()
                    examined[(record.partition, policy)].append(
                        float(theta[min(fb.position, model.positions - 1)])
                    )
        for (partition, policy), batch in grouped.items():
            learner = self.learners[partition][policy]
            context = np.array([fb.context for fb in batch], dtype=np.float64)
            item_features = (
                np.array([fb.item_features for fb in batch], dtype=np.float64)
                if learner.uses_item_features
                else np.empty((len(batch), 0))
            )
            rewards = np.array([fb.reward for fb in batch], dtype=np.float64)
            X = learner.policy_features(context, item_features)
            weights = examined.get((partition, policy))
            examination = None if weights is None else np.array(weights)
            learner.update(item_labels([fb.item_id for fb in batch]), X, rewards, examination)
            self.events[partition][policy] += len(batch)
            self._count_evictions(partition, policy, learner)
            self.metrics.updates.labels(policy).inc(len(batch))
            self.metrics.rewards.labels(policy).inc(float(rewards.sum()))
            self._track_ctr(policy, rewards)
        self._count_arms()
        return rejected

    def _invalid(self, fb: Feedback, targets: list[str]) -> str | None:
        if len(fb.context) != self.settings.context_dim:
            return (
                f"invalid: context has {len(fb.context)} features, "
                f"expected {self.settings.context_dim}"
            )
        uses_items = any(
            learner_class(self.settings.policies[t]["learner"]).uses_item_features for t in targets
        )
        if uses_items and len(fb.item_features) != self.settings.item_dim:
            return (
                f"invalid: item_features has {len(fb.item_features)} values, "
                f"expected {self.settings.item_dim}"
            )
        return None

    def _track_ctr(self, policy: str, rewards: np.ndarray) -> None:
        window = self._window[policy]
        decay = 0.9999 ** len(rewards)
        window[0] = window[0] * decay + float(rewards.sum())
        window[1] = window[1] * decay + len(rewards)
        self.metrics.ctr.labels(policy).set(window[0] / window[1])

    def snapshot(self, partition: int) -> bytes:
        arrays = {
            f"{policy}/{name}": array
            for policy, learner in self.learners[partition].items()
            for name, array in learner.state().items()
        }
        # The eviction order, so a restored learner evicts as this one would (not published).
        arrays |= {
            f"{RECENCY}/{policy}": learner.recency()
            for policy, learner in self.learners[partition].items()
        }
        arrays |= {
            f"{EXAMINATION}/{name}": array
            for name, array in self.examination[partition].state().items()
        }
        meta = {"partition": partition, "events": dict(self.events[partition])}
        return encode_params("bandits", 0, arrays, meta=meta)

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        learners = self._fresh()
        self.events[partition] = defaultdict(int)
        model = self.examination[partition] = self._new_examination()
        if checkpoint is not None and checkpoint.state:
            decoded = decode_params(checkpoint.state)
            # A checkpoint written before events were counted restores them as 0.
            self.events[partition].update(decoded.meta.get("events", {}))
            saved = decoded.arrays
            # One written before positions were modelled holds no examination model.
            if f"{EXAMINATION}/shows" in saved:
                model.load(
                    {
                        name.split("/", 1)[1]: array
                        for name, array in saved.items()
                        if name.startswith(f"{EXAMINATION}/")
                    }
                )
            for policy, learner in learners.items():
                state = {
                    name.split("/", 1)[1]: array
                    for name, array in saved.items()
                    if name.split("/", 1)[0] == policy
                }
                if state:
                    # Statistics are kept; hyperparameters and limits come from the current
                    # config (a lower max_arms evicts at once).
                    state |= {k: v for k, v in learner.state().items() if v.ndim == 0}
                    restored = type(learner).from_state(
                        state, seed=self.settings.seed, recency=saved.get(f"{RECENCY}/{policy}")
                    )
                    learners[policy] = self._limited(restored)
                    self._count_evictions(partition, policy, restored)
        self.learners[partition] = learners
        self._count_arms()
        return None

    def _new_examination(self) -> ExaminationModel:
        return ExaminationModel(MAX_SLATE, prior_shows=self.settings.examination_prior_shows)

    def revoke(self, partition: int) -> None:
        self.learners.pop(partition, None)
        self.events.pop(partition, None)
        self.examination.pop(partition, None)
        self._count_arms()

    def after_checkpoint(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        if self.store is None:
            return
        for policy in self.settings.policies:
            parts = {}
            for partition, checkpoint in checkpoints.items():
                learner = self.learners[partition][policy]
                parts[f"p{partition}"] = encode_params(
                    policy,
                    0,
                    learner.state(),
                    offsets={t: {partition: o} for t, o in checkpoint.offsets.items()},
                    meta={
                        "learner": learner.name,
                        "partition": partition,
                        "policy": policy,
                        "events": self.events[partition][policy],
                        "position_aware": policy in self._position_aware,
                    },
                )
            try:
                self.store.publish(
                    policy,
                    parts,
                    fence={f"p{p}": c.epoch for p, c in checkpoints.items()},
                    owner=self.settings.group,
                )
            except StalePublish:
                return  # every part is owned elsewhere now; the store counted and logged it


def _processor(wiring: Wiring[BanditsSettings]) -> BanditsProcessor:
    settings = wiring.settings
    store = ParamStore(
        wiring.redis_client(), keys=wiring.redis_settings.keys(), registry=wiring.registry
    )
    catalog = CatalogLabels(
        wiring.redis_client(), wiring.redis_settings.keys(), refresh_s=settings.catalog_refresh_s
    )
    return BanditsProcessor(settings, store, wiring.registry, catalog)


SPEC = ServiceSpec(
    name="bandits",
    settings=BanditsSettings,
    inputs=lambda topics: {topics.feedback: decode_feedback},
    make_processor=_processor,
    runtime_defaults=lambda settings: {"checkpoint_interval_s": settings.publish_interval_s},
)


def main() -> int:
    return run_service(SPEC)


if __name__ == "__main__":
    raise SystemExit(main())
