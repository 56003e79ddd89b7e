"""``streamrec run drn``: feedback in, DRN's W and W̃ out, as ParamStore versions.

The service keeps one :class:`~services.drn.DRNLearner` and feeds it through a
:class:`~services.drn.trainer.DRNTrainer`, which is pure (arrays in, no Kafka
or Redis) so the online evaluation (:mod:`services.evaluation.drn`) runs
exactly the same update logic; :mod:`services.drn.trainer` states the rules
(DBGD verdicts, replay with the return signal, major updates on event time
and on drift).

**Slates.** The joiner emits one Feedback per shown item, a slate's items back
to back in one partition, so a slate is complete when a record of another
request follows it in that partition (:class:`~services.drn.slates.OpenSlate`;
the last slate of an idle partition waits for the next record). The partition
is the trainer's ``stream``. A major update runs inline in the batch that
triggers it: consumption pauses for its duration.

**One process.** DRN's weights are one global model, not additive per-partition
statistics (docs/decisions.md §7, §12), so the service runs as one process that owns every
partition of ``feedback``. The processor sets ``checkpoint_all_owned``: every
checkpoint writes all partitions' offsets in one transaction, and the whole
DRN state (learner with replay buffer and Adam moments, open and pending
slates, the verdict window; encoded with :mod:`contracts.params`) is stored in
the lowest owned partition's checkpoint. Restart = load that state and seek
every partition to its checkpointed offset, so each feedback record is applied
exactly once; the replay of a single partition is bit-identical to an
uninterrupted run. ADWIN's window is not part of the state: after a restart
drift detection starts afresh.

**Publishing.** After a checkpoint, if W̃ was redrawn since the last publish
(every change of W redraws it), W and W̃ are published as one ParamStore
version: part ``main`` with float32 arrays ``W/…`` and ``W_explore/…`` (see
:mod:`services.drn.publish`), the checkpointed offsets, and meta with the W̃
draw and the feature layout.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from contracts.events import Feedback, decode_feedback
from contracts.params import decode_params, encode_params
from services.common import (
    Checkpoint,
    Context,
    Processor,
    Record,
    Rejection,
)
from services.common.service import ServiceSpec, Wiring, run_service
from services.drn.features import FeatureLayout
from services.drn.publish import published_arrays, published_meta
from services.drn.settings import DRNSettings
from services.drn.slates import OpenSlate, pack_slates, unpack_slates
from services.paramstore import ParamStore, StalePublish

log = logging.getLogger(__name__)


class DRNMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.feedback = Counter(
            "streamrec_drn_feedback_total",
            "Feedback records seen, by outcome (applied, other_policy).",
            ["outcome"],
            registry=registry,
        )
        self.slates = Counter(
            "streamrec_drn_slates_total",
            "Slates closed, by DBGD outcome (credited, stale, untagged).",
            ["outcome"],
            registry=registry,
        )
        self.verdicts = Counter(
            "streamrec_drn_minor_updates_total",
            "DBGD verdicts applied, by winner (explore, exploit, tie).",
            ["winner"],
            registry=registry,
        )
        self.majors = Counter(
            "streamrec_drn_major_updates_total",
            "Major updates, by trigger (schedule, drift).",
            ["trigger"],
            registry=registry,
        )
        self.major_seconds = Histogram(
            "streamrec_drn_major_update_seconds",
            "Duration of one major update (consumption pauses meanwhile).",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=registry,
        )
        self.td_loss = Gauge(
            "streamrec_drn_td_loss", "Mean TD loss of the last major update.", registry=registry
        )
        self.explore_version = Gauge(
            "streamrec_drn_explore_version", "Current W̃ draw.", registry=registry
        )
        self.buffer = Gauge(
            "streamrec_drn_replay_transitions",
            "Transitions in the replay buffer.",
            registry=registry,
        )
        self.ctr = Gauge(
            "streamrec_drn_ctr_ratio",
            "Click-through rate of DRN slates over roughly the last 10k items.",
            registry=registry,
        )
        self.published = Gauge(
            "streamrec_drn_published_version",
            "ParamStore version of the last published W and W̃.",
            registry=registry,
        )


class DRNProcessor(Processor):
    """The DRN service's logic: feedback records → :class:`DRNTrainer`; see the module doc."""

    checkpoint_all_owned = True

    def __init__(
        self,
        settings: DRNSettings,
        store: ParamStore | None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.layout = settings.layout()
        self.store = store
        self.metrics = DRNMetrics(registry or CollectorRegistry())
        self.trainer = settings.trainer()
        #: Feedback records applied over the model's life; orders checkpoints on restore.
        self.applied = 0
        self.published_version: int | None = None
        self._published_explore: int | None = None
        self._open: dict[int, OpenSlate] = {}
        self._owned: set[int] = set()
        self._restored_from: int | None = None
        self._ctr = [0.0, 0.0]

    # -- the batch path -------------------------------------------------------------

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        rejected: list[Rejection] = []
        before = self.trainer.counters
        other = 0
        for record in records:
            fb: Feedback = record.value
            if fb.policy != self.settings.policy:
                other += 1
                continue
            if reason := self._invalid(fb):
                rejected.append(Rejection(record, reason))
                continue
            self._add(record.partition, fb)
        self.applied += len(records) - other - len(rejected)
        self.metrics.feedback.labels("applied").inc(len(records) - other - len(rejected))
        if other:
            self.metrics.feedback.labels("other_policy").inc(other)
        self._record_metrics(before)
        return rejected

    def _invalid(self, fb: Feedback) -> str | None:
        if len(fb.context) != self.layout.state_dim:
            return (
                f"invalid: context has {len(fb.context)} values, the DRN state has "
                f"{self.layout.state_dim}"
            )
        if len(fb.item_features) != self.layout.action_dim:
            return (
                f"invalid: item_features has {len(fb.item_features)} values, a DRN action "
                f"has {self.layout.action_dim}"
            )
        return None

    def _add(self, partition: int, fb: Feedback) -> None:
        slate = self._open.get(partition)
        if slate is not None and slate.request_id != fb.request_id:
            self._close(partition)
            slate = None
        if slate is None:
            slate = OpenSlate(fb.request_id, fb.user_id, fb.ts, fb.model_version, fb.context)
            self._open[partition] = slate
        slate.add(fb)
        self._ctr = [self._ctr[0] * 0.9999 + fb.reward, self._ctr[1] * 0.9999 + 1.0]

    def _close(self, partition: int) -> None:
        slate = self._open.pop(partition)
        self.trainer.observe(slate.closed(), stream=partition)

    def _record_metrics(self, before: Mapping[str, int]) -> None:
        after = self.trainer.counters
        delta = {k: after[k] - before[k] for k in after}
        for outcome in ("credited", "stale", "untagged"):
            if delta[outcome]:
                self.metrics.slates.labels(outcome).inc(delta[outcome])
        for winner in ("explore", "exploit"):
            if delta[f"{winner}_wins"]:
                self.metrics.verdicts.labels(winner).inc(delta[f"{winner}_wins"])
        if delta["ties"]:
            self.metrics.verdicts.labels("tie").inc(delta["ties"])
        major = self.trainer.last_major
        if delta["major_updates"] and major is not None:
            self.metrics.majors.labels(major.trigger).inc(delta["major_updates"])
            self.metrics.major_seconds.observe(major.seconds)
            self.metrics.td_loss.set(major.loss)
        self.metrics.explore_version.set(self.trainer.learner.explore_version)
        self.metrics.buffer.set(len(self.trainer.learner.buffer))
        if self._ctr[1]:
            self.metrics.ctr.set(self._ctr[0] / self._ctr[1])

    # -- checkpoints ----------------------------------------------------------------

    def snapshot(self, partition: int) -> bytes:
        if partition != min(self._owned):
            return b""
        arrays, meta = self.trainer.state()
        open_slates = sorted(self._open.items())
        arrays.update(pack_slates("open", [s.closed() for _, s in open_slates]))
        meta |= {
            "applied": self.applied,
            "layout": self.layout.to_meta(),
            "open": [
                {"partition": p, "request_id": s.request_id, "user_id": s.user_id}
                for p, s in open_slates
            ],
        }
        return encode_params(self.settings.model, 0, arrays, meta=meta)

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> Mapping[str, int] | None:
        self._owned.add(partition)
        if checkpoint is None or not checkpoint.state:
            return None
        saved = decode_params(checkpoint.state)
        applied = int(saved.meta["applied"])
        if self._restored_from is not None and applied <= self.applied:
            return None
        layout = FeatureLayout.from_meta(saved.meta["layout"])
        if layout != self.layout:
            raise ValueError(
                f"the DRN checkpoint of group {self.settings.group!r} was trained for layout "
                f"{layout.to_meta()}, the settings say {self.layout.to_meta()}; clear the "
                "group's checkpoints to start a new model"
            )
        self.trainer.load_state(saved.arrays, saved.meta)
        self.applied = applied
        self._restored_from = partition
        opened = saved.meta["open"]
        slates = unpack_slates("open", saved.arrays, [o["user_id"] for o in opened])
        self._open = {}
        for info, slate in zip(opened, slates, strict=True):
            self._open[int(info["partition"])] = OpenSlate(
                request_id=info["request_id"],
                user_id=info["user_id"],
                ts=slate.ts,
                version=slate.explore_version,
                state=slate.state.tolist(),
                actions=slate.actions.tolist(),
                clicks=slate.clicks.tolist(),
                teams=list(slate.teams),
            )
        log.info(
            "restored DRN state from partition %d: %d feedback applied, W̃ draw %d, %d transitions",
            partition,
            applied,
            self.trainer.learner.explore_version,
            len(self.trainer.learner.buffer),
        )
        return None

    def revoke(self, partition: int) -> None:
        self._owned.discard(partition)

    def after_checkpoint(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        learner = self.trainer.learner
        if self.store is None or learner.explore_version == self._published_explore:
            return
        offsets: dict[str, dict[int, int]] = {}
        for partition, checkpoint in checkpoints.items():
            for topic, offset in checkpoint.offsets.items():
                offsets.setdefault(topic, {})[partition] = offset
        blob = encode_params(
            self.settings.model,
            0,
            published_arrays(learner.weights(), learner.explore_weights()),
            offsets=offsets,
            meta=published_meta(learner.explore_version, self.layout) | {"applied": self.applied},
        )
        # The model spans every owned partition; a process that took any of them
        # over claimed a higher epoch, so the highest one fences the whole model.
        fence = {"main": max((c.epoch for c in checkpoints.values()), default=0)}
        try:
            self.published_version = self.store.publish(
                self.settings.model, {"main": blob}, fence=fence, owner=self.settings.group
            )
        except StalePublish:
            return  # a newer owner publishes this model now; the store counted and logged it
        self._published_explore = learner.explore_version
        self.metrics.published.set(self.published_version)


def _processor(wiring: Wiring[DRNSettings]) -> DRNProcessor:
    store = ParamStore(
        wiring.redis_client(), keys=wiring.redis_settings.keys(), registry=wiring.registry
    )
    return DRNProcessor(wiring.settings, store, wiring.registry)


SPEC = ServiceSpec(
    name="drn",
    settings=DRNSettings,
    inputs=lambda topics: {topics.feedback: decode_feedback},
    make_processor=_processor,
    runtime_defaults=lambda settings: {"checkpoint_interval_s": settings.publish_interval_s},
)


def main() -> int:
    # Small networks: one thread avoids oversubscribing the cores other services use.
    torch.set_num_threads(1)
    return run_service(SPEC)


if __name__ == "__main__":
    raise SystemExit(main())
