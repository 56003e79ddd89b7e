"""Evaluation toolkit: metrics, off-policy estimators, replay, and online simulation.

Everything here is pure computation over arrays, logs and the simulated world
(:mod:`services.simulator`), except the entry points -- ``command`` for
``streamrec evaluate``, ``export`` for ``streamrec export-log`` -- and ``kafka_log``,
which reads a range of the logged topics for them; ``logged`` evaluates and
exports what it read.
Plotting lives in :mod:`services.evaluation.plots` and is imported on demand,
so importing the toolkit does not load matplotlib.
"""

from __future__ import annotations

from services.evaluation.estimators import Estimate, bootstrap, doubly_robust, ips, snips
from services.evaluation.metrics import (
    WinRate,
    auc,
    ctr,
    cumulative_regret,
    interleaving_win_rate,
    ndcg_at_k,
    recall_at_k,
)
from services.evaluation.online import (
    POLICY_NAMES,
    LearnerPolicy,
    OnlineResult,
    SlatePolicy,
    UniformRandomPolicy,
    make_policy,
    simulate,
)
from services.evaluation.replay import (
    LoggedEvent,
    LoggedSlate,
    ReplayResult,
    frozen_policy_estimates,
    read_feedback_log,
    replay,
    top_slot_events,
    uniform_log,
)

__all__ = [
    "POLICY_NAMES",
    "Estimate",
    "LearnerPolicy",
    "LoggedEvent",
    "LoggedSlate",
    "OnlineResult",
    "ReplayResult",
    "SlatePolicy",
    "UniformRandomPolicy",
    "WinRate",
    "auc",
    "bootstrap",
    "ctr",
    "cumulative_regret",
    "doubly_robust",
    "frozen_policy_estimates",
    "interleaving_win_rate",
    "ips",
    "make_policy",
    "ndcg_at_k",
    "read_feedback_log",
    "recall_at_k",
    "replay",
    "simulate",
    "snips",
    "top_slot_events",
    "uniform_log",
]
