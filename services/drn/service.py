"""``streamrec run drn``: feedback in, DRN's W and W̃ out, as ParamStore versions.

The service keeps one :class:`~services.drn.DRNLearner` and feeds it through a
:class:`DRNTrainer`, which is pure (arrays in, no Kafka or Redis) so the online
evaluation (:mod:`services.evaluation.drn`) runs exactly the same update logic:

- **Slates.** The DRN serving policy logs the state vector as the impression
  context and each item's action vector as its features, plus the team
  (``exploit`` = W, ``explore`` = W̃) and, as ``model_version``, the W̃ draw
  (``explore_version``, see :mod:`services.serving.drn_policy`). The joiner
  emits one Feedback per shown item, a slate's items back to back in one
  partition, so a slate is complete when a record of another request follows
  it in that partition. (The last slate of an idle partition waits for the next
  record.)
- **Minor update (DBGD).** Each slate whose model version is the current W̃
  draw is credited per team (:func:`~services.drn.credit`). After
  ``verdict_window`` decided slates the majority verdict goes to
  :meth:`~services.drn.DRNLearner.minor_update` (W ← W + η·ΔW if W̃ won) and a
  new W̃ is drawn. Slates about an older draw are stale: counted, not credited
  (their ΔW points elsewhere). They still train the major update.
- **Replay.** Every shown item becomes a transition. Its reward is the click
  plus ``return_weight`` × return, where *return* is 1 if the same user was
  served another DRN slate within ``return_window_s`` (event time) — DRN's user
  activeness signal, derived from later feedback of the same user; that next
  slate's state and shown items are the transition's next state and next
  actions for the γ-discounted future term. A slate waits for its user's next
  one until the partition's event time passes it by ``return_window_s``; then
  it is stored as terminal with return 0.
- **Major update.** ``major_steps`` double-DQN steps on the replay buffer every
  ``major_interval_s`` of event time (T_R) and whenever river's ADWIN detects a
  change in the per-slate CTR stream. It runs inline in the batch that
  triggers it: consumption pauses for its duration (about
  ``major_steps`` × 1-2 ms on a CPU core for the default network; see
  ``benchmarks/drn.py``). Scheduling on event time keeps a replay after a crash
  identical to the original run.

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
import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from river import drift

from contracts.events import Feedback, decode_feedback
from contracts.params import decode_params, encode_params
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
from services.drn.features import FeatureLayout
from services.drn.interleaving import EXPLOIT, EXPLORE, Winner, credit
from services.drn.learner import DRNLearner
from services.drn.publish import published_arrays, published_meta
from services.paramstore import ParamStore, StalePublish

log = logging.getLogger(__name__)

_TEAM_CODES: dict[str | None, int] = {None: 0, EXPLOIT: 1, EXPLORE: 2}
_TEAMS = (None, EXPLOIT, EXPLORE)
_TRAINER_COUNTERS = (
    "slates",
    "credited",
    "stale",
    "untagged",
    "explore_wins",
    "exploit_wins",
    "ties",
    "minor_updates",
    "major_updates",
    "drift_detections",
    "transitions",
    "returns",
)


class DRNSettings(BaseSettings):
    """DRN service settings (``STREAMREC_DRN_*``).

    The feature layout fields must match what the serving DRN policy scores
    with (it reads the same settings); defaults fit the simulator's world.
    """

    model_config = SettingsConfigDict(env_prefix="STREAMREC_DRN_", env_file=".env", extra="ignore")

    group: str = "drn"
    """``STREAMREC_DRN_GROUP``: consumer group and checkpoint namespace."""
    model: str = "drn"
    """``STREAMREC_DRN_MODEL``: ParamStore model name W and W̃ are published under."""
    policy: str = "drn"
    """``STREAMREC_DRN_POLICY``: learn from the feedback of slates this policy served."""
    embedding_dim: int = Field(8, ge=1)
    """``STREAMREC_DRN_EMBEDDING_DIM``: item embedding width of the feature layout."""
    n_context: int = Field(9, ge=0)
    """``STREAMREC_DRN_N_CONTEXT``: request context floats in the state."""
    windows_s: tuple[float, ...] = (3_600.0, 21_600.0, 86_400.0)
    """``STREAMREC_DRN_WINDOWS_S``: JSON list of look-back windows (user history, popularity)."""
    interest_columns: int = Field(8, ge=0)
    """``STREAMREC_DRN_INTEREST_COLUMNS``: leading context columns that are the user's
    interest vector in item space (serving only; the simulator's context starts with it)."""
    hidden: tuple[int, ...] = (64, 32)
    """``STREAMREC_DRN_HIDDEN``: JSON list of hidden widths of both network streams."""
    gamma: float = Field(0.4, ge=0.0, lt=1.0)
    """``STREAMREC_DRN_GAMMA``: discount of the future-reward term; 0 = click-only model."""
    alpha: float = Field(0.1, ge=0.0)
    """``STREAMREC_DRN_ALPHA``: DBGD exploration radius, ΔW = α · U(−1, 1) · W."""
    eta: float = Field(0.05, gt=0.0, le=1.0)
    """``STREAMREC_DRN_ETA``: DBGD step towards a winning W̃."""
    lr: float = Field(1e-3, gt=0.0)
    """``STREAMREC_DRN_LR``: Adam learning rate of the major update."""
    batch_size: int = Field(64, ge=1)
    """``STREAMREC_DRN_BATCH_SIZE``: transitions per gradient step."""
    buffer_capacity: int = Field(20_000, ge=1)
    """``STREAMREC_DRN_BUFFER_CAPACITY``: replay buffer size (checkpointed in full)."""
    max_next_actions: int = Field(5, ge=0)
    """``STREAMREC_DRN_MAX_NEXT_ACTIONS``: next-slate items kept per transition."""
    target_sync: int = Field(100, ge=1)
    """``STREAMREC_DRN_TARGET_SYNC``: gradient steps between target-network copies."""
    return_weight: float = 0.5
    """``STREAMREC_DRN_RETURN_WEIGHT``: β in reward = click + β · return."""
    return_window_s: float = Field(1_800.0, ge=0.0)
    """``STREAMREC_DRN_RETURN_WINDOW_S``: a user served again within this long 'returned'."""
    verdict_window: int = Field(20, ge=1)
    """``STREAMREC_DRN_VERDICT_WINDOW``: decided slates per DBGD verdict."""
    major_interval_s: float = Field(600.0, ge=0.0)
    """``STREAMREC_DRN_MAJOR_INTERVAL_S``: T_R, event time between major updates; 0 = never."""
    major_steps: int = Field(100, ge=1)
    """``STREAMREC_DRN_MAJOR_STEPS``: gradient steps per major update."""
    major_min_transitions: int = Field(256, ge=1)
    """``STREAMREC_DRN_MAJOR_MIN_TRANSITIONS``: no major update on a smaller buffer."""
    drift_detection: bool = True
    """``STREAMREC_DRN_DRIFT_DETECTION``: also run a major update when ADWIN flags the CTR."""
    drift_delta: float = Field(0.002, gt=0.0, lt=1.0)
    """``STREAMREC_DRN_DRIFT_DELTA``: ADWIN's confidence parameter."""
    publish_interval_s: float = Field(1.0, gt=0.0)
    """``STREAMREC_DRN_PUBLISH_INTERVAL_S``: checkpoint (and publish if W̃ changed) this often."""
    seed: int = 0
    """``STREAMREC_DRN_SEED``: seeds initialisation, DBGD draws and replay sampling."""

    def layout(self) -> FeatureLayout:
        """The feature layout the learner is built for."""
        return FeatureLayout(
            embedding_dim=self.embedding_dim, windows_s=self.windows_s, n_context=self.n_context
        )

    def learner(self) -> DRNLearner:
        """A fresh learner with these settings."""
        layout = self.layout()
        return DRNLearner(
            layout.state_dim,
            layout.action_dim,
            hidden=self.hidden,
            gamma=self.gamma,
            alpha=self.alpha,
            eta=self.eta,
            lr=self.lr,
            batch_size=self.batch_size,
            buffer_capacity=self.buffer_capacity,
            max_next_actions=self.max_next_actions,
            target_sync=self.target_sync,
            return_weight=self.return_weight,
            seed=self.seed,
        )

    def trainer(self, learner: DRNLearner | None = None) -> DRNTrainer:
        """A trainer around ``learner`` (default: a fresh one) with these settings."""
        return DRNTrainer(
            learner or self.learner(),
            verdict_window=self.verdict_window,
            return_window_s=self.return_window_s,
            major_interval_s=self.major_interval_s,
            major_steps=self.major_steps,
            major_min_transitions=self.major_min_transitions,
            drift_delta=self.drift_delta if self.drift_detection else None,
        )


@dataclass(frozen=True, eq=False)
class SlateFeedback:
    """One served slate's outcome, as DRN learns from it.

    ``teams`` holds each item's interleaving team, or ``None`` for items of a
    slate that was not interleaved (those train the major update only).
    ``user_id`` ``None`` means the user is unknown: no return signal.
    """

    user_id: str | None
    ts: float
    explore_version: int
    state: np.ndarray  # (state_dim,) float32
    actions: np.ndarray  # (k, action_dim) float32
    clicks: np.ndarray  # (k,) float32, 0/1
    teams: tuple[str | None, ...]

    def __post_init__(self) -> None:
        k = self.actions.shape[0]
        if self.actions.ndim != 2 or self.clicks.shape != (k,) or len(self.teams) != k:
            raise ValueError(
                f"slate has {self.actions.shape} actions, {self.clicks.shape} clicks and "
                f"{len(self.teams)} teams; need k rows of each"
            )

    @property
    def interleaved(self) -> bool:
        return all(team in (EXPLOIT, EXPLORE) for team in self.teams)


def pack_slates(prefix: str, slates: Sequence[SlateFeedback]) -> dict[str, np.ndarray]:
    """Slates as named arrays (user ids go to the meta, see :func:`slate_users`)."""
    if not slates:
        empty = np.zeros((0, 0), dtype=np.float32)
        states, actions, clicks = empty, empty, np.zeros(0, dtype=np.float32)
    else:
        states = np.stack([s.state for s in slates]).astype(np.float32)
        actions = np.concatenate([s.actions for s in slates]).astype(np.float32)
        clicks = np.concatenate([s.clicks for s in slates]).astype(np.float32)
    return {
        f"{prefix}/ts": np.array([s.ts for s in slates], dtype=np.float64),
        f"{prefix}/version": np.array([s.explore_version for s in slates], dtype=np.int64),
        f"{prefix}/sizes": np.array([s.actions.shape[0] for s in slates], dtype=np.int64),
        f"{prefix}/states": states,
        f"{prefix}/actions": actions,
        f"{prefix}/clicks": clicks,
        f"{prefix}/teams": np.array(
            [_TEAM_CODES[t] for s in slates for t in s.teams], dtype=np.uint8
        ),
    }


def unpack_slates(
    prefix: str, arrays: Mapping[str, np.ndarray], users: Sequence[str | None]
) -> list[SlateFeedback]:
    """The slates :func:`pack_slates` packed, with their users in order."""
    sizes = np.asarray(arrays[f"{prefix}/sizes"], dtype=np.int64)
    if len(users) != len(sizes):
        raise ValueError(f"{prefix}: {len(sizes)} slates but {len(users)} users")
    ends = np.cumsum(sizes)
    out = []
    for i, (user, end, size) in enumerate(zip(users, ends, sizes, strict=True)):
        rows = slice(int(end - size), int(end))
        out.append(
            SlateFeedback(
                user_id=user,
                ts=float(arrays[f"{prefix}/ts"][i]),
                explore_version=int(arrays[f"{prefix}/version"][i]),
                state=np.asarray(arrays[f"{prefix}/states"][i], dtype=np.float32),
                actions=np.asarray(arrays[f"{prefix}/actions"][rows], dtype=np.float32),
                clicks=np.asarray(arrays[f"{prefix}/clicks"][rows], dtype=np.float32),
                teams=tuple(_TEAMS[int(c)] for c in arrays[f"{prefix}/teams"][rows]),
            )
        )
    return out


@dataclass
class _VerdictWindow:
    explore_version: int = -1
    explore: int = 0
    exploit: int = 0
    ties: int = 0

    def arrays(self) -> np.ndarray:
        return np.array([self.explore_version, self.explore, self.exploit, self.ties], np.int64)


@dataclass
class MajorUpdate:
    """What the last major update did (for metrics and logs)."""

    trigger: str
    loss: float
    seconds: float
    at: float


@dataclass
class _Pending:
    #: stream -> user -> the user's latest slate, waiting for the next one (oldest first).
    by_stream: dict[int, OrderedDict[str, SlateFeedback]] = field(default_factory=dict)
    #: stream -> largest event time seen.
    watermarks: dict[int, float] = field(default_factory=dict)


class DRNTrainer:
    """Applies slate feedback to a :class:`DRNLearner`: DBGD verdicts, replay, major updates.

    Pure and deterministic given the order of the slates (and ``stream``, the
    input partition, which scopes users and event-time watermarks). See the
    module docstring for the rules.

    Args:
        learner: the learner to train.
        verdict_window: decided slates of one W̃ draw per DBGD verdict.
        return_window_s: a user served again within this long (event time)
            returned; 0 stores every slate at once as terminal.
        major_interval_s: event time between scheduled major updates; 0 = never.
        major_steps: gradient steps per major update.
        major_min_transitions: no major update on a smaller replay buffer.
        drift_delta: ADWIN confidence on the per-slate CTR; ``None`` = no
            drift-triggered major updates.

    >>> import numpy as np
    >>> trainer = DRNTrainer(DRNLearner(3, 2, hidden=(4,), seed=0), verdict_window=1,
    ...                      return_window_s=0, major_interval_s=0)
    >>> slate = SlateFeedback(
    ...     "u1", 1.7e9, trainer.learner.explore_version, np.zeros(3, np.float32),
    ...     np.ones((2, 2), np.float32), np.array([0.0, 1.0], np.float32), ("exploit", "explore"))
    >>> trainer.observe(slate)
    >>> counters = trainer.counters
    >>> counters["minor_updates"], counters["explore_wins"], len(trainer.learner.buffer)
    (1, 1, 2)
    """

    def __init__(
        self,
        learner: DRNLearner,
        *,
        verdict_window: int = 20,
        return_window_s: float = 1_800.0,
        major_interval_s: float = 600.0,
        major_steps: int = 100,
        major_min_transitions: int = 256,
        drift_delta: float | None = 0.002,
    ) -> None:
        if verdict_window < 1:
            raise ValueError(f"verdict_window must be >= 1, got {verdict_window}")
        for name, value in (
            ("return_window_s", return_window_s),
            ("major_interval_s", major_interval_s),
        ):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value}")
        if major_steps < 1 or major_min_transitions < 1:
            raise ValueError(
                f"major_steps and major_min_transitions must be >= 1, got {major_steps} "
                f"and {major_min_transitions}"
            )
        if drift_delta is not None and not 0.0 < drift_delta < 1.0:
            raise ValueError(f"drift_delta must lie in (0, 1), got {drift_delta}")
        self.learner = learner
        self.verdict_window = int(verdict_window)
        self.return_window_s = float(return_window_s)
        self.major_interval_s = float(major_interval_s)
        self.major_steps = int(major_steps)
        self.major_min_transitions = int(major_min_transitions)
        self.drift_delta = drift_delta
        self._detector = drift.ADWIN(delta=drift_delta) if drift_delta is not None else None
        self._counters = dict.fromkeys(_TRAINER_COUNTERS, 0)
        self._window = _VerdictWindow()
        self._pending = _Pending()
        #: Event time of the last major update (NaN: none yet; the first slate starts the clock).
        self._last_major = math.nan
        self.last_major: MajorUpdate | None = None

    @property
    def counters(self) -> dict[str, int]:
        """Slates seen, credited, stale; verdicts; updates; transitions stored."""
        return dict(self._counters)

    @property
    def pending(self) -> int:
        """Slates waiting for their user's next slate."""
        return sum(len(users) for users in self._pending.by_stream.values())

    # -- the update path ----------------------------------------------------------

    def observe(self, slate: SlateFeedback, *, stream: int = 0) -> None:
        """Apply one slate: verdict, replay, drift and scheduled major update."""
        self._counters["slates"] += 1
        self._credit(slate)
        self._store(slate, stream)
        trigger = None
        if self._detector is not None:
            self._detector.update(float(slate.clicks.mean()) if len(slate.clicks) else 0.0)
            if self._detector.drift_detected:
                self._counters["drift_detections"] += 1
                trigger = "drift"
        if math.isnan(self._last_major):
            self._last_major = slate.ts
        elif self.major_interval_s and slate.ts - self._last_major >= self.major_interval_s:
            trigger = trigger or "schedule"
        if trigger is not None and len(self.learner.buffer) >= self.major_min_transitions:
            self.major_update(trigger, at=slate.ts)

    def _credit(self, slate: SlateFeedback) -> None:
        if not slate.interleaved:
            self._counters["untagged"] += 1
            return
        current = self.learner.explore_version
        if slate.explore_version != current:
            self._counters["stale"] += 1
            return
        if self._window.explore_version != current:
            self._window = _VerdictWindow(explore_version=current)
        self._counters["credited"] += 1
        winner = credit(slate.teams, [bool(c) for c in slate.clicks])  # type: ignore[arg-type]
        if winner == EXPLORE:
            self._window.explore += 1
        elif winner == EXPLOIT:
            self._window.exploit += 1
        else:
            self._window.ties += 1
        if self._window.explore + self._window.exploit < self.verdict_window:
            return
        verdict: Winner
        if self._window.explore > self._window.exploit:
            verdict = EXPLORE
        elif self._window.exploit > self._window.explore:
            verdict = EXPLOIT
        else:
            verdict = "tie"
        key = {EXPLORE: "explore_wins", EXPLOIT: "exploit_wins", "tie": "ties"}[verdict]
        self._counters[key] += 1
        self._counters["minor_updates"] += 1
        self.learner.minor_update(verdict, explore_version=current)
        self._window = _VerdictWindow(explore_version=self.learner.explore_version)

    def _store(self, slate: SlateFeedback, stream: int) -> None:
        if slate.user_id is None or self.return_window_s == 0:
            self._transitions(slate, None)
            return
        users = self._pending.by_stream.setdefault(stream, OrderedDict())
        watermark = max(self._pending.watermarks.get(stream, slate.ts), slate.ts)
        self._pending.watermarks[stream] = watermark
        previous = users.pop(slate.user_id, None)
        if previous is not None:
            returned = slate.ts - previous.ts <= self.return_window_s
            self._transitions(previous, slate if returned else None)
        users[slate.user_id] = slate
        while users:
            oldest = next(iter(users.values()))
            if oldest.ts >= watermark - self.return_window_s:
                break
            users.popitem(last=False)
            self._transitions(oldest, None)

    def _transitions(self, slate: SlateFeedback, following: SlateFeedback | None) -> None:
        k = slate.actions.shape[0]
        if k == 0:
            return
        states = np.repeat(slate.state[None, :], k, axis=0)
        if following is None:
            self.learner.observe(states, slate.actions, slate.clicks, returns=np.zeros(k))
        else:
            self._counters["returns"] += 1
            self.learner.observe(
                states,
                slate.actions,
                slate.clicks,
                returns=np.ones(k),
                next_states=np.repeat(following.state[None, :], k, axis=0),
                next_actions=[following.actions] * k,
            )
        self._counters["transitions"] += k

    def major_update(self, trigger: str = "manual", *, at: float | None = None) -> float:
        """Run ``major_steps`` gradient steps now; returns the mean TD loss."""
        started = time.perf_counter()
        loss = self.learner.major_update(self.major_steps)
        self._counters["major_updates"] += 1
        if at is not None:
            self._last_major = at
        self.last_major = MajorUpdate(trigger, loss, time.perf_counter() - started, time.time())
        log.info(
            "major update (%s): %d steps, TD loss %.4f, %.2f s",
            trigger,
            self.major_steps,
            loss,
            self.last_major.seconds,
        )
        return loss

    # -- state ----------------------------------------------------------------------

    def state(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """``(arrays, meta)``: learner (with buffer), counters, window and pending slates."""
        arrays = {f"learner/{k}": v for k, v in self.learner.state(include_buffer=True).items()}
        arrays["trainer/counters"] = np.array(
            [self._counters[k] for k in _TRAINER_COUNTERS], dtype=np.int64
        )
        arrays["trainer/window"] = self._window.arrays()
        arrays["trainer/last_major"] = np.array([self._last_major], dtype=np.float64)
        streams = sorted(self._pending.watermarks)
        arrays["trainer/streams"] = np.array(streams, dtype=np.int64)
        arrays["trainer/watermarks"] = np.array(
            [self._pending.watermarks[s] for s in streams], dtype=np.float64
        )
        pending = [
            (stream, user, slate)
            for stream, users in sorted(self._pending.by_stream.items())
            for user, slate in users.items()
        ]
        arrays.update(pack_slates("pending", [slate for _, _, slate in pending]))
        arrays["pending/stream"] = np.array([stream for stream, _, _ in pending], dtype=np.int64)
        return arrays, {"pending_users": [user for _, user, _ in pending]}

    def load_state(self, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
        """Restore what :meth:`state` returned (the learner is replaced)."""
        self.learner = DRNLearner.from_state(
            {k.removeprefix("learner/"): v for k, v in arrays.items() if k.startswith("learner/")}
        )
        counters = np.asarray(arrays["trainer/counters"], dtype=np.int64)
        if counters.shape != (len(_TRAINER_COUNTERS),):
            raise ValueError(f"trainer counters have shape {counters.shape}")
        self._counters = dict(zip(_TRAINER_COUNTERS, (int(c) for c in counters), strict=True))
        version, explore, exploit, ties = (int(v) for v in arrays["trainer/window"])
        self._window = _VerdictWindow(version, explore, exploit, ties)
        self._last_major = float(arrays["trainer/last_major"][0])
        self._pending = _Pending(
            watermarks={
                int(s): float(w)
                for s, w in zip(
                    arrays["trainer/streams"], arrays["trainer/watermarks"], strict=True
                )
            }
        )
        slates = unpack_slates("pending", arrays, list(meta["pending_users"]))
        for stream, slate in zip(arrays["pending/stream"], slates, strict=True):
            assert slate.user_id is not None
            self._pending.by_stream.setdefault(int(stream), OrderedDict())[slate.user_id] = slate


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


@dataclass
class _OpenSlate:
    """Feedback records of one request, collected until another request follows."""

    request_id: str
    user_id: str
    ts: float
    version: int
    state: list[float]
    actions: list[list[float]] = field(default_factory=list)
    clicks: list[float] = field(default_factory=list)
    teams: list[str | None] = field(default_factory=list)

    def add(self, fb: Feedback) -> None:
        self.actions.append(fb.item_features)
        self.clicks.append(float(fb.reward))
        self.teams.append(fb.team)

    def closed(self) -> SlateFeedback:
        return SlateFeedback(
            user_id=self.user_id,
            ts=self.ts,
            explore_version=self.version,
            state=np.asarray(self.state, dtype=np.float32),
            actions=np.asarray(self.actions, dtype=np.float32),
            clicks=np.asarray(self.clicks, dtype=np.float32),
            teams=tuple(self.teams),
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
        self._open: dict[int, _OpenSlate] = {}
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
            slate = _OpenSlate(fb.request_id, fb.user_id, fb.ts, fb.model_version, fb.context)
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
            self._open[int(info["partition"])] = _OpenSlate(
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


def build_runtime(
    registry: CollectorRegistry, settings: DRNSettings | None = None
) -> ConsumerRuntime:
    """The DRN service's consumer runtime, from the environment's settings."""
    settings = settings or DRNSettings()
    redis_settings = RedisSettings()
    topics = TopicSettings()
    store = ParamStore(
        clients.redis_client(redis_settings), keys=redis_settings.keys(), registry=registry
    )
    return ConsumerRuntime(
        service="drn",
        group=settings.group,
        inputs={topics.feedback: decode_feedback},
        processor=DRNProcessor(settings, store, registry),
        kafka=KafkaSettings(),
        redis_settings=redis_settings,
        topics=topics,
        settings=RuntimeSettings(checkpoint_interval_s=settings.publish_interval_s),
        registry=registry,
    )


def main() -> int:
    # Small networks: one thread avoids oversubscribing the cores other services use.
    torch.set_num_threads(1)
    return run_consumer_service("drn", build_runtime)


if __name__ == "__main__":
    raise SystemExit(main())
