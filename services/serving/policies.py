"""Ranking policies: how a user's slate is chosen from candidates.

Every policy answers :meth:`RankingPolicy.rank` with a :class:`RankedSlate`: the
items in display order, each one's exact propensity, the interleaving team (DRN)
and the model version used, plus the feature vectors to log with the
impression, so the learner later trains on exactly what was scored.

Policies are assigned to users by a stable hash (:class:`PolicyRouter`), with
configurable traffic shares.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from prometheus_client import CollectorRegistry

from services.bandits import BanditLearner, learner_class, learner_from_params
from services.bandits.base import DEFAULT_PROPENSITY_DRAWS
from services.paramstore import ParamStore, ParamWatcher
from services.serving.slate import build_slate


@dataclass(frozen=True, slots=True)
class RankRequest:
    """What a policy ranks: one user's candidates with their features."""

    user_id: str
    #: Request/user context features, shape (c,).
    context: np.ndarray
    candidates: Sequence[str]
    #: int64 arm labels of the candidates (``contracts.ids.item_labels``).
    candidate_labels: np.ndarray
    #: Item features of the candidates, shape (n, f).
    item_features: np.ndarray
    k: int
    #: Event time of the request (seconds since the epoch).
    ts: float = 0.0
    #: Optional extra per-user inputs a policy may use (e.g. DRN's user features).
    extras: Mapping[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RankedSlate:
    """A policy's answer; serving turns it into the response and the Impression."""

    items: list[str]
    #: Marginal probability that each shown item was shown.
    propensities: list[float]
    model_version: int
    #: Interleaving team per item ("exploit" / "explore"), or None.
    teams: list[str | None] | None = None
    #: Context vector to log (defaults to the request context).
    context: list[float] | None = None
    #: Feature vector to log per shown item (defaults to the item features).
    item_features: list[list[float]] | None = None


class RankingPolicy(Protocol):
    name: str

    def rank(self, request: RankRequest, rng: np.random.Generator) -> RankedSlate: ...


class RandomPolicy:
    """Uniformly random slates: the baseline, and the logging policy for replay."""

    name = "random"

    def rank(self, request: RankRequest, rng: np.random.Generator) -> RankedSlate:
        n = len(request.candidates)
        k = min(request.k, n)
        picks = rng.choice(n, size=k, replace=False)
        return RankedSlate(
            items=[request.candidates[i] for i in picks],
            propensities=[k / n] * k,
            model_version=0,
            item_features=request.item_features[picks].tolist(),
        )


def watch_learner(
    store: ParamStore,
    model: str,
    learner: str,
    *,
    poll_interval_s: float = 0.2,
    registry: CollectorRegistry | None = None,
) -> ParamWatcher[BanditLearner]:
    """A watcher that serves the bandit learner published as ``model``, hot-reloaded.

    ``learner`` names the policy's learner class (``{"learner": ...}`` of its
    spec): its ``merge`` sums the per-partition parts the bandits service
    publishes, and :func:`~services.bandits.learner_from_params` rebuilds the
    learner that ``meta["learner"]`` names from the merged state.
    """
    return ParamWatcher(
        store,
        model,
        build=learner_from_params,
        combine=learner_class(learner).merge,
        poll_interval_s=poll_interval_s,
        registry=registry,
    )


class BanditPolicy:
    """A bandit learner hot-reloaded from the parameter store, with epsilon exploration.

    Propensities are the exact marginals of showing each item, except for Thompson
    learners, whose top-k probabilities are Monte Carlo estimates from
    ``propensity_draws`` posterior draws (:meth:`BanditLearner.inclusion`).

    Before the first published version it ranks with ``prior`` (a learner with
    no data), so a new deployment serves immediately.
    """

    def __init__(
        self,
        name: str,
        prior: BanditLearner,
        watcher: ParamWatcher[BanditLearner] | None,
        *,
        epsilon: float = 0.05,
        propensity_draws: int = DEFAULT_PROPENSITY_DRAWS,
    ) -> None:
        self.name = name
        self.prior = prior
        self.watcher = watcher
        self.epsilon = epsilon
        #: Posterior draws behind a Thompson learner's logged propensities.
        self.propensity_draws = propensity_draws

    def learner(self) -> tuple[int, BanditLearner]:
        """The learner now serving and its version (0 = the prior)."""
        if self.watcher is not None and self.watcher.version is not None:
            return self.watcher.current()
        return 0, self.prior

    def rank(self, request: RankRequest, rng: np.random.Generator) -> RankedSlate:
        version, learner = self.learner()
        X = learner.policy_features(request.context, request.item_features)
        labels = request.candidate_labels
        scores = learner.score(labels, X)
        k = min(request.k, len(scores))
        inclusion = (
            learner.inclusion(labels, X, scores, k, draws=self.propensity_draws) if k else None
        )
        slate = build_slate(scores, k, self.epsilon, rng, inclusion)
        return RankedSlate(
            items=[request.candidates[i] for i in slate.indices],
            propensities=slate.propensities.tolist(),
            model_version=version,
            item_features=request.item_features[slate.indices].tolist(),
        )

    def close(self) -> None:
        if self.watcher is not None:
            self.watcher.close()


class PolicyRouter:
    """Assigns each user to one policy by a stable hash, in proportion to traffic shares.

    >>> router = PolicyRouter({"a": 1.0, "b": 3.0})
    >>> router.assign("u1") == router.assign("u1")
    True
    """

    def __init__(self, shares: Mapping[str, float]) -> None:
        if not shares or any(s < 0 for s in shares.values()) or sum(shares.values()) <= 0:
            raise ValueError(f"traffic shares must be non-negative and not all zero: {shares}")
        self.names = list(shares)
        weights = np.array([shares[n] for n in self.names], dtype=np.float64)
        self._edges = np.cumsum(weights / weights.sum())

    def assign(self, user_id: str) -> str:
        digest = hashlib.blake2b(user_id.encode(), digest_size=8).digest()
        point = int.from_bytes(digest, "little") / 2**64
        return self.names[
            min(int(np.searchsorted(self._edges, point, side="right")), len(self.names) - 1)
        ]
