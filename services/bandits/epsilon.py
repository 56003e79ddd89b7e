"""ε-greedy: the context-free baseline every other learner should beat."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from services.bandits._kernels import greedy_inclusion
from services.bandits.base import BanditLearner, _check_items, positive


class EpsilonGreedy(BanditLearner):
    """With probability ε a call explores, else it exploits empirical mean rewards.

    Exploring returns uniform random scores for the whole call, so ``select``
    then picks uniformly at random. Exploiting returns each arm's mean reward;
    an arm without feedback scores ``+inf`` so it is tried once before the
    greedy choice settles (ties among untried arms break at random).

    >>> learner = EpsilonGreedy(epsilon=0.0, seed=0)
    >>> learner.update(np.array([5, 5, 6]), None, np.array([1.0, 0.0, 1.0]))
    >>> learner.score(np.array([5, 6, 7])).tolist()
    [0.5, 1.0, inf]
    """

    name: ClassVar[str] = "egreedy"
    needs_features: ClassVar[bool] = False
    _hyperparameters: ClassVar[tuple[str, ...]] = ("epsilon",)
    _arm_statistics: ClassVar[tuple[str, ...]] = ("reward_sums", "counts")

    def __init__(self, epsilon: float = 0.1, seed: int | None = None) -> None:
        self.epsilon = positive("epsilon", epsilon, allow_zero=True)
        if self.epsilon > 1.0:
            raise ValueError(f"epsilon must be in [0, 1], got {epsilon!r}")
        super().__init__(seed=seed)

    def _arm_prior(self) -> dict[str, np.ndarray]:
        return {"reward_sums": np.zeros(()), "counts": np.zeros((), dtype=np.int64)}

    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        if self._rng.random() < self.epsilon:
            return self._rng.random(len(slots))
        return self._means(slots)

    def inclusion(
        self,
        items: np.ndarray,
        X: np.ndarray | None,
        scores: np.ndarray,
        k: int,
        *,
        draws: int = 0,
    ) -> np.ndarray:
        """Exact: ``(1 - ε)`` times the greedy top-k probability of the mean rewards,
        plus ``ε k / n`` (an exploring call ranks uniformly at random). ``scores`` and
        ``draws`` play no part."""
        exploit = self._means(self._table.lookup(_check_items(items)))
        n = len(exploit)
        return (1.0 - self.epsilon) * greedy_inclusion(exploit, min(k, n)) + self.epsilon * min(
            k, n
        ) / n

    def _means(self, slots: np.ndarray) -> np.ndarray:
        counts = self._table.arrays["counts"][slots]
        sums = self._table.arrays["reward_sums"][slots]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(counts > 0, sums / counts, np.inf)

    def _update(self, slots: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        np.add.at(self._table.arrays["reward_sums"], slots, rewards)
        np.add.at(self._table.arrays["counts"], slots, 1)

    def _rebuild(self) -> None:
        """Nothing is derived: means are computed at score time."""

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"epsilon": 0.2}
