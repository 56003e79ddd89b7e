"""Linear Thompson sampling with a disjoint Gaussian posterior per arm.

Agrawal & Goyal (ICML 2013) sample one parameter vector from
``N(B⁻¹f, v² B⁻¹)`` with ``B = λI + Σ x xᵀ`` and ``f = Σ r x``. We keep that
posterior per arm (not one shared θ) because our context features describe the
request, not the item: a shared θ would rank every candidate alike.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from services.bandits.base import positive
from services.bandits.linucb import DisjointRidge


class LinearThompson(DisjointRidge):
    """Score each row with ``xᵀθ̃``, ``θ̃ ~ N(B_a⁻¹ f_a, v² B_a⁻¹)`` drawn for that row.

    ``xᵀθ̃`` is Gaussian with mean ``xᵀθ_a`` and standard deviation
    ``v √(xᵀB_a⁻¹x)``, so each row's sample is drawn from that scalar law: the
    same distribution as sampling θ̃ itself, at the cost of one normal draw per
    row. Rows are sampled independently, so a batch of decisions explores
    independently.

    >>> learner = LinearThompson(dim=2, v=0.0, seed=0)
    >>> learner.update(np.array([4]), np.array([[1.0, 0.0]]), np.array([1.0]))
    >>> learner.score(np.array([4]), np.array([[1.0, 0.0]])).tolist()
    [0.5]
    """

    name: ClassVar[str] = "ts_linear"
    _hyperparameters: ClassVar[tuple[str, ...]] = ("dim", "v", "ridge")
    randomised: ClassVar[bool] = True

    def __init__(
        self, dim: int, v: float = 0.25, ridge: float = 1.0, seed: int | None = None
    ) -> None:
        self.v = positive("v", v, allow_zero=True)
        super().__init__(dim, ridge=ridge, seed=seed)

    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        assert X is not None
        mean, width = self._posterior(slots, X)
        return mean + self.v * width * self._rng.standard_normal(len(slots))

    def _draw_scores(self, slots: np.ndarray, X: np.ndarray | None, draws: int) -> np.ndarray:
        assert X is not None
        mean, width = self._posterior(slots, X)
        return mean + self.v * width * self._rng.standard_normal((draws, len(slots)))

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"dim": 3, "v": 0.3, "ridge": 0.5}
