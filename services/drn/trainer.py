"""DRN's training rules: slate feedback → DBGD verdicts, replay transitions, major updates.

:class:`DRNTrainer` is pure (arrays in, no Kafka or Redis) and deterministic
given the order of the slates, so the DRN service (:mod:`services.drn.service`)
and the online evaluation (:mod:`services.evaluation.drn`) run exactly the same
update logic:

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
  one until the stream's event time passes it by ``return_window_s``; then
  it is stored as terminal with return 0.
- **Major update.** ``major_steps`` double-DQN steps on the replay buffer every
  ``major_interval_s`` of event time (T_R) and whenever river's ADWIN detects a
  change in the per-slate CTR stream. It runs inline in the call that
  triggers it (about ``major_steps`` × 1-2 ms on a CPU core for the default
  network; see ``benchmarks/drn.py``). Scheduling on event time keeps a replay
  after a crash identical to the original run.

:meth:`DRNTrainer.state` holds everything (learner with replay buffer and Adam
moments, counters, the verdict window, pending slates) except ADWIN's window:
after a restore drift detection starts afresh.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from river import drift

from services.drn.interleaving import EXPLOIT, EXPLORE, Winner, credit
from services.drn.learner import DRNLearner
from services.drn.slates import SlateFeedback, pack_slates, unpack_slates

log = logging.getLogger(__name__)

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
