"""Beta-Bernoulli Thompson sampling, optionally discounted for drifting click rates."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from services.bandits.base import BanditLearner, positive


class BetaThompson(BanditLearner):
    """Sample each row's score from ``Beta(α₀ + S_a, β₀ + F_a)``.

    ``S_a`` and ``F_a`` are the arm's (discounted) successes and failures; a
    reward ``r`` in [0, 1] adds ``r`` to ``S`` and ``1 - r`` to ``F``. With
    ``discount`` γ < 1, every event first multiplies all arms' counts by γ
    (Raj & Kalyani 2017), so old feedback fades and the posterior follows a
    drifting click rate. A batch of n events applies exactly that: counts decay
    by γⁿ and event i's reward is weighted by γ^(n-1-i), matching n single
    updates.

    ``merge`` sums the counts. That is exact for ``discount=1``; with γ < 1 it
    is an approximation, because each partition decays by its own event count
    rather than by the events of all partitions interleaved in time.

    >>> learner = BetaThompson(seed=0)
    >>> learner.update(np.array([1, 1, 2]), None, np.array([1.0, 1.0, 0.0]))
    >>> state = learner.state()
    >>> state["items"].tolist(), state["successes"].tolist(), state["failures"].tolist()
    ([1, 2], [2.0, 0.0], [0.0, 1.0])
    """

    name: ClassVar[str] = "ts_beta"
    needs_features: ClassVar[bool] = False
    _hyperparameters: ClassVar[tuple[str, ...]] = ("prior_alpha", "prior_beta", "discount")
    _arm_statistics: ClassVar[tuple[str, ...]] = ("successes", "failures")
    _reward_range: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    randomised: ClassVar[bool] = True

    def __init__(
        self,
        prior_alpha: float = 1.0,
        prior_beta: float = 1.0,
        discount: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.prior_alpha = positive("prior_alpha", prior_alpha)
        self.prior_beta = positive("prior_beta", prior_beta)
        self.discount = positive("discount", discount)
        if self.discount > 1.0:
            raise ValueError(f"discount must be in (0, 1], got {discount!r}")
        super().__init__(seed=seed)

    def _arm_prior(self) -> dict[str, np.ndarray]:
        return {"successes": np.zeros(()), "failures": np.zeros(())}

    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        arrays = self._table.arrays
        return self._rng.beta(
            self.prior_alpha + arrays["successes"][slots],
            self.prior_beta + arrays["failures"][slots],
        )

    def _draw_scores(self, slots: np.ndarray, X: np.ndarray | None, draws: int) -> np.ndarray:
        arrays = self._table.arrays
        alpha = self.prior_alpha + arrays["successes"][slots]
        beta = self.prior_beta + arrays["failures"][slots]
        return self._rng.beta(alpha, beta, size=(draws, len(slots)))

    def _update(self, slots: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        successes = self._table.rows("successes")
        failures = self._table.rows("failures")
        arm_slots = slots - 1
        if self.discount == 1.0:
            np.add.at(successes, arm_slots, rewards)
            np.add.at(failures, arm_slots, 1.0 - rewards)
            return
        n = len(rewards)
        successes *= self.discount**n
        failures *= self.discount**n
        weights = self.discount ** np.arange(n - 1, -1, -1, dtype=np.float64)
        np.add.at(successes, arm_slots, weights * rewards)
        np.add.at(failures, arm_slots, weights * (1.0 - rewards))

    def _rebuild(self) -> None:
        """Nothing is derived: the counts are the posterior."""

    def _arm_updates(self) -> np.ndarray:
        """Successes plus failures: the update count, or its decayed mass with ``discount``."""
        return self._table.rows("successes") + self._table.rows("failures")

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"prior_alpha": 1.5, "prior_beta": 2.0}
