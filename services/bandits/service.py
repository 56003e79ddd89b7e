"""``streamrec run bandits``: feedback in, versioned bandit parameters out.

Each configured policy (e.g. ``linucb``, ``ts``) is a learner. Its statistics are
kept per Kafka partition of ``feedback`` (DESIGN.md §6): the process that owns a
partition updates that partition's learners, checkpoints them with the offsets,
and then publishes them to the parameter store as the part ``p<partition>`` of
the policy's model. Readers sum the parts, so one process or eight publish the
same model, and a rebalance only moves which process publishes a part.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.events import Feedback, decode_feedback
from contracts.ids import item_labels
from contracts.params import decode_params, encode_params
from services.bandits.base import BanditLearner
from services.bandits.features import feature_dim, policy_features, shared_dim
from services.bandits.registry import LEARNERS, make_learner
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
    clients,
)
from services.common.process import run_consumer_service
from services.paramstore import ParamStore, StalePublish

log = logging.getLogger(__name__)

DEFAULT_POLICIES: dict[str, dict[str, Any]] = {
    "linucb": {"learner": "linucb", "alpha": 0.5},
    "ts": {"learner": "ts_linear", "v": 0.1},
    "ts_beta": {"learner": "ts_beta"},
    "egreedy": {"learner": "egreedy", "epsilon": 0.1},
}


class BanditsSettings(BaseSettings):
    """Bandits service settings (``STREAMREC_BANDITS_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_BANDITS_", env_file=".env", extra="ignore"
    )

    group: str = "bandits"
    """``STREAMREC_BANDITS_GROUP``: consumer group and checkpoint namespace."""
    policies: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_POLICIES))
    """``STREAMREC_BANDITS_POLICIES``: JSON ``{"policy": {"learner": name, **params}}``."""
    context_dim: int = Field(9, ge=1)
    """``STREAMREC_BANDITS_CONTEXT_DIM``: length of Impression.context."""
    item_dim: int = Field(8, ge=0)
    """``STREAMREC_BANDITS_ITEM_DIM``: length of SlateItem.features (hybrid LinUCB)."""
    learn_from: Literal["own", "all"] = "own"
    """``STREAMREC_BANDITS_LEARN_FROM``: each policy learns from its own traffic, or from all."""
    publish_interval_s: float = Field(0.25, gt=0)
    """``STREAMREC_BANDITS_PUBLISH_INTERVAL_S``: checkpoint + publish this often."""
    seed: int = 0
    """``STREAMREC_BANDITS_SEED``."""


def build_learner(spec: Mapping[str, Any], settings: BanditsSettings) -> BanditLearner:
    """A fresh learner for one policy spec (``{"learner": name, **params}``)."""
    params = dict(spec)
    name = params.pop("learner")
    if name == "hybrid_linucb":
        params["shared_dim"] = shared_dim(name, settings.context_dim, settings.item_dim)
    return make_learner(
        name,
        dim=feature_dim(name, settings.context_dim, settings.item_dim),
        seed=settings.seed,
        **params,
    )


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
            "Feedback of policies that no learner here learns from.",
            ["policy"],
            registry=registry,
        )


class BanditsProcessor(Processor):
    """Per-partition learners for every configured policy."""

    def __init__(
        self,
        settings: BanditsSettings,
        store: ParamStore | None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        for policy, spec in settings.policies.items():
            if spec.get("learner") not in LEARNERS:
                raise ValueError(f"policy {policy!r}: learner must be one of {sorted(LEARNERS)}")
        self.settings = settings
        self.store = store
        self.metrics = BanditsMetrics(registry or CollectorRegistry())
        self.learners: dict[int, dict[str, BanditLearner]] = {}
        self._window: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def _fresh(self) -> dict[str, BanditLearner]:
        return {p: build_learner(spec, self.settings) for p, spec in self.settings.policies.items()}

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        rejected: list[Rejection] = []
        grouped: dict[tuple[int, str], list[Feedback]] = defaultdict(list)
        for record in records:
            fb: Feedback = record.value
            if self.settings.learn_from == "all":
                targets = list(self.settings.policies)
            elif fb.policy in self.settings.policies:
                targets = [fb.policy]
            else:
                self.metrics.ignored.labels(fb.policy).inc()
                continue
            if reason := self._invalid(fb, targets):
                rejected.append(Rejection(record, reason))
                continue
            for policy in targets:
                grouped[(record.partition, policy)].append(fb)
        for (partition, policy), batch in grouped.items():
            learner = self.learners[partition][policy]
            context = np.array([fb.context for fb in batch], dtype=np.float64)
            item_features = (
                np.array([fb.item_features for fb in batch], dtype=np.float64)
                if learner.name == "hybrid_linucb"
                else np.empty((len(batch), 0))
            )
            rewards = np.array([fb.reward for fb in batch], dtype=np.float64)
            X = policy_features(learner.name, context, item_features)
            learner.update(item_labels([fb.item_id for fb in batch]), X, rewards)
            self.metrics.updates.labels(policy).inc(len(batch))
            self.metrics.rewards.labels(policy).inc(float(rewards.sum()))
            self._track_ctr(policy, rewards)
        return rejected

    def _invalid(self, fb: Feedback, targets: list[str]) -> str | None:
        if len(fb.context) != self.settings.context_dim:
            return (
                f"invalid: context has {len(fb.context)} features, "
                f"expected {self.settings.context_dim}"
            )
        hybrid = any(self.settings.policies[t]["learner"] == "hybrid_linucb" for t in targets)
        if hybrid and len(fb.item_features) != self.settings.item_dim:
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
        return encode_params("bandits", 0, arrays, meta={"partition": partition})

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        learners = self._fresh()
        if checkpoint is not None and checkpoint.state:
            saved = decode_params(checkpoint.state).arrays
            for policy, learner in learners.items():
                state = {
                    name.split("/", 1)[1]: array
                    for name, array in saved.items()
                    if name.split("/", 1)[0] == policy
                }
                if state:
                    # Statistics are kept; hyperparameters come from the current config.
                    state |= {k: v for k, v in learner.state().items() if v.ndim == 0}
                    learners[policy] = type(learner).from_state(state, seed=self.settings.seed)
        self.learners[partition] = learners
        return None

    def revoke(self, partition: int) -> None:
        self.learners.pop(partition, None)

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
                    meta={"learner": learner.name, "partition": partition, "policy": policy},
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


def build_runtime(
    registry: CollectorRegistry, settings: BanditsSettings | None = None
) -> ConsumerRuntime:
    settings = settings or BanditsSettings()
    redis_settings = RedisSettings()
    topics = TopicSettings()
    store = ParamStore(
        clients.redis_client(redis_settings), keys=redis_settings.keys(), registry=registry
    )
    return ConsumerRuntime(
        service="bandits",
        group=settings.group,
        inputs={topics.feedback: decode_feedback},
        processor=BanditsProcessor(settings, store, registry),
        kafka=KafkaSettings(),
        redis_settings=redis_settings,
        topics=topics,
        settings=RuntimeSettings(checkpoint_interval_s=settings.publish_interval_s),
        registry=registry,
    )


def main() -> int:
    return run_consumer_service("bandits", build_runtime)


if __name__ == "__main__":
    raise SystemExit(main())
