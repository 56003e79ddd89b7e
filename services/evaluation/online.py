"""Online simulation: run several slate policies side by side on one simulated world.

Every policy faces the same request sequence (one :class:`~services.simulator.World`
built from the seed, stepped once per request), builds a slate from the same
candidates, and sees clicks drawn from its own random stream (derived from the
seed and the policy's name), so a run is reproducible and differences between
policies come from their choices, not from different users. Regret is expected
(pseudo-)regret: the best slate's expected clicks minus the shown slate's.

>>> from services.simulator import WorldConfig
>>> config = WorldConfig(n_users=20, n_items=30, n_candidates=10)
>>> result = simulate({"random": UniformRandomPolicy(seed=1)}, config=config, steps=50)
>>> result.expected.shape, bool(result.cumulative_regret()["random"][-1] > 0)
((1, 50), True)
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from services.bandits import LEARNERS, BanditLearner, new_learner
from services.bandits.position import ExaminationModel
from services.simulator.world import World, WorldConfig

#: Names accepted by :func:`make_policy`: the bandit learners plus the random baseline.
POLICY_NAMES = (*LEARNERS, "random")


class SlatePolicy(Protocol):
    """A policy that fills a slate from candidates and learns from the clicks on it.

    ``items`` are int64 item labels (``contracts.ids.item_label``),
    ``context`` the request's context vector and ``item_features`` one row per
    item (possibly zero columns wide).
    """

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        """Row indices of the ``k`` items to show, best first."""
        ...

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        """Learn from one reward per shown item."""
        ...


class UniformRandomPolicy:
    """The baseline: a uniformly random slate, learning nothing."""

    def __init__(self, *, seed: int | None = None) -> None:
        self._rng = np.random.default_rng(seed)

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        """``k`` distinct rows uniformly at random, in random order."""
        return self._rng.choice(len(items), size=min(k, len(items)), replace=False)

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        """Nothing to learn."""


class LearnerPolicy:
    """Adapts a ``services.bandits`` learner (arrays of rows) to :class:`SlatePolicy`.

    The feature matrix is built by the learner's ``policy_features``, exactly as
    the bandits service and serving build it, so a policy evaluated here is the
    model that runs in production.
    """

    def __init__(self, learner: BanditLearner) -> None:
        self.learner = learner

    def _X(self, context: np.ndarray, item_features: np.ndarray) -> np.ndarray | None:
        if not self.learner.needs_features:
            return None
        return self.learner.policy_features(context, item_features)

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        """The learner's top ``k`` rows (ties broken at random by the learner)."""
        return np.asarray(self.learner.select(items, self._X(context, item_features), k))

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        """One batched learner update with a row per shown item."""
        self.learner.update(items, self._X(context, item_features), rewards)


class PositionAwarePolicy(LearnerPolicy):
    """A learner taught under the position-based model (docs/decisions.md §23).

    Each update passes the examination probability of every shown slot (row ``i``
    of the slate is position ``i``) from ``examination``. With ``shuffle`` > 0 the
    policy estimates them itself, as the bandits service does from the ``random``
    policy's traffic: that share of its slates is shown in random order
    (the top ``k`` items unchanged), and their clicks feed the model.
    """

    def __init__(
        self,
        learner: BanditLearner,
        examination: ExaminationModel,
        *,
        shuffle: float = 0.05,
        seed: int | None = None,
    ) -> None:
        if not learner.learns_positions():
            raise ValueError(f"{learner.name} does not learn from examination probabilities")
        if not 0.0 <= shuffle <= 1.0:
            raise ValueError(f"shuffle must be in [0, 1], got {shuffle!r}")
        super().__init__(learner)
        self.examination = examination
        self.shuffle = shuffle
        self._rng = np.random.default_rng(seed)
        self._shuffled = False

    def select(
        self, context: np.ndarray, items: np.ndarray, item_features: np.ndarray, k: int
    ) -> np.ndarray:
        """The learner's top ``k`` rows, in random order for a ``shuffle`` share of calls."""
        rows = super().select(context, items, item_features, k)
        self._shuffled = self.shuffle > 0.0 and self._rng.random() < self.shuffle
        return self._rng.permutation(rows) if self._shuffled else rows

    def update(
        self,
        context: np.ndarray,
        items: np.ndarray,
        item_features: np.ndarray,
        rewards: np.ndarray,
    ) -> None:
        """Count a shuffled slate's clicks by position, then learn examination-weighted."""
        positions = np.arange(len(items))
        if self._shuffled:
            self.examination.observe(positions, rewards)
        self.learner.update(
            items,
            self._X(context, item_features),
            rewards,
            self.examination.examination(positions),
        )


def make_policy(
    name: str, *, context_dim: int, item_dim: int, seed: int = 0, **params: Any
) -> SlatePolicy:
    """A fresh policy by name: one of :data:`POLICY_NAMES`, learners with default settings.

    Feature widths follow each learner's feature layout
    (:meth:`~services.bandits.BanditLearner.policy_features`): disjoint learners see
    ``x = context``; ``hybrid_linucb`` sees the context plus its outer product with
    the item features as shared columns (Li et al., WWW 2010).
    """
    if name == "random":
        return UniformRandomPolicy(seed=seed)
    if name not in POLICY_NAMES:
        raise ValueError(f"unknown policy {name!r}; expected one of {', '.join(POLICY_NAMES)}")
    spec = {"learner": name, **params}
    return LearnerPolicy(new_learner(spec, context_dim=context_dim, item_dim=item_dim, seed=seed))


def policy_rng(seed: int, name: str) -> np.random.Generator:
    """The click stream of policy ``name`` in a run seeded with ``seed``.

    Derived from the name, not the policy's place in the run, so adding a policy
    to a comparison leaves the others' clicks unchanged.
    """
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass(frozen=True, eq=False)
class OnlineResult:
    """Per-step outcomes of an online run; row ``p`` of each matrix is ``policies[p]``."""

    policies: tuple[str, ...]
    scenario: str
    seed: int
    slate_size: int
    #: Expected clicks of the best slate per step, shape (steps,).
    best: np.ndarray
    #: Expected clicks of each policy's slate per step, shape (policies, steps).
    expected: np.ndarray
    #: Realised clicks of each policy's slate per step, shape (policies, steps).
    clicks: np.ndarray

    @property
    def steps(self) -> int:
        """Number of requests simulated."""
        return len(self.best)

    def _row(self, name: str) -> int:
        return self.policies.index(name)

    def ctr(self) -> dict[str, float]:
        """Final realised CTR (clicks per shown item) of each policy."""
        shown = self.steps * self.slate_size
        return {p: float(self.clicks[i].sum() / shown) for i, p in enumerate(self.policies)}

    def expected_ctr(self) -> dict[str, float]:
        """Expected CTR of each policy's slates (no click noise)."""
        shown = self.steps * self.slate_size
        return {p: float(self.expected[i].sum() / shown) for i, p in enumerate(self.policies)}

    def best_ctr(self) -> float:
        """Expected CTR of the best slates: the ceiling."""
        return float(self.best.sum() / (self.steps * self.slate_size))

    def window_ends(self, window: int) -> np.ndarray:
        """The last step (1-based) of each full window of ``window`` steps."""
        return np.arange(1, self.steps // window + 1) * window

    def windowed_ctr(self, window: int) -> dict[str, np.ndarray]:
        """Realised CTR in consecutive windows of ``window`` steps (a partial tail is dropped)."""
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        n = self.steps // window
        shown = window * self.slate_size
        return {
            p: self.clicks[i, : n * window].reshape(n, window).sum(axis=1) / shown
            for i, p in enumerate(self.policies)
        }

    def cumulative_regret(self) -> dict[str, np.ndarray]:
        """Cumulative expected regret of each policy, per step."""
        return {p: np.cumsum(self.best - self.expected[i]) for i, p in enumerate(self.policies)}

    def summary(self, window: int | None = None) -> dict[str, Any]:
        """A JSON-ready report: final CTRs and regret, plus windowed CTR if ``window``."""
        regret = self.cumulative_regret()
        expected = self.expected_ctr()
        report: dict[str, Any] = {
            "scenario": self.scenario,
            "seed": self.seed,
            "steps": self.steps,
            "slate_size": self.slate_size,
            "best_ctr": self.best_ctr(),
            "policies": {
                p: {
                    "ctr": c,
                    "expected_ctr": expected[p],
                    "cumulative_regret": float(regret[p][-1]) if self.steps else 0.0,
                }
                for p, c in self.ctr().items()
            },
        }
        if window:
            report["window"] = window
            report["window_ends"] = self.window_ends(window).tolist()
            report["windowed_ctr"] = {p: v.tolist() for p, v in self.windowed_ctr(window).items()}
        return report


def simulate(
    policies: Mapping[str, SlatePolicy],
    *,
    config: WorldConfig,
    steps: int,
    seed: int = 0,
) -> OnlineResult:
    """Run every policy for ``steps`` requests on ``World(config, seed=seed)``.

    Per request each policy picks ``slate_size`` of the candidates, clicks on its
    slate are sampled from the true click probabilities with the policy's own
    stream (:func:`policy_rng`), and the policy is updated with them.
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not policies:
        raise ValueError("simulate needs at least one policy")
    world = World(config, seed=seed)
    names = tuple(policies)
    rngs = [policy_rng(seed, name) for name in names]
    k = config.slate_size
    best = np.empty(steps)
    expected = np.empty((len(names), steps))
    clicks = np.empty((len(names), steps), dtype=np.int64)
    for t in range(steps):
        request = world.request()
        features = world.item_features(request.candidates)
        best[t] = world.best_slate_value(request.user_id, request.candidates)
        for p, name in enumerate(names):
            policy = policies[name]
            rows = np.asarray(policy.select(request.context, request.candidate_labels, features, k))
            if len(rows) != min(k, len(request.candidates)) or len(set(rows.tolist())) != len(rows):
                raise ValueError(f"policy {name!r} returned rows {rows.tolist()}, not a slate")
            shown = [request.candidates[r] for r in rows]
            probs = world.click_probabilities(request.user_id, shown)
            clicked = rngs[p].random(len(probs)) < probs
            policy.update(
                request.context,
                request.candidate_labels[rows],
                features[rows],
                clicked.astype(np.float64),
            )
            expected[p, t] = probs.sum()
            clicks[p, t] = clicked.sum()
    return OnlineResult(
        policies=names,
        scenario=config.scenario,
        seed=seed,
        slate_size=k,
        best=best,
        expected=expected,
        clicks=clicks,
    )
