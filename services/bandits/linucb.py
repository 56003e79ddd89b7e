"""Disjoint LinUCB (Li et al., WWW 2010, Algorithm 1) and the per-arm ridge posterior it uses.

Each arm ``a`` keeps ``G_a = Σ x xᵀ`` and ``b_a = Σ r x`` over its feedback. The
ridge prior ``λI`` is a hyperparameter added when derived terms are computed, so
the exported statistics stay additive across partitions.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from services.bandits._kernels import UPDATE_BLOCK, arm_forms, group_rows, grouped_outer_sums
from services.bandits.base import BanditLearner, State, dimension, positive

#: Online updates queue this many events before summing them into the statistics.
_QUEUE_ROWS = 256


class DisjointRidge(BanditLearner):
    """Per-arm ridge regression of reward on features, kept ready for scoring.

    Derived per arm: ``[A_a⁻¹ | θ_a]`` with ``A_a = λI + G_a`` and
    ``θ_a = A_a⁻¹ b_a``, side by side so one product ``x @ [A⁻¹ | θ]`` gives
    both the mean ``xᵀθ`` and the width ``√(xᵀA⁻¹x)``. One event updates
    ``[A⁻¹ | θ]`` by Sherman–Morrison (O(d²)) and queues itself for the
    statistics, which are summed a block of events at a time (before any read);
    a batch sums the statistics per arm and re-inverts the arms it touched in one
    call.
    """

    needs_features: ClassVar[bool] = True
    _arm_statistics: ClassVar[tuple[str, ...]] = ("gram", "b", "counts")
    _examination: ClassVar[Literal["features", "weights"] | None] = "features"

    def __init__(self, dim: int, *, ridge: float, seed: int | None) -> None:
        self.dim = dimension("dim", dim)
        self.ridge = positive("ridge", ridge)
        super().__init__(seed=seed)
        # Online events, queued for the statistics (see ``_update_one``).
        self._queue_slots = np.empty(_QUEUE_ROWS, dtype=np.intp)
        self._queue_x = np.empty((_QUEUE_ROWS, self.dim))
        self._queue_rewards = np.empty(_QUEUE_ROWS)
        self._queued = 0

    @classmethod
    def dimensions(cls, context_dim: int, item_dim: int) -> dict[str, int]:
        """The features are the request context: ``dim`` is its width."""
        return {"dim": context_dim}

    @property
    def n_features(self) -> int:
        return self.dim

    def _arm_prior(self) -> dict[str, np.ndarray]:
        d = self.dim
        proj = np.zeros((d, d + 1))
        proj[:, :d] = np.eye(d) / self.ridge
        return {
            "gram": np.zeros((d, d)),
            "b": np.zeros(d),
            "counts": np.zeros((), dtype=np.int64),
            "proj": proj,
        }

    def _posterior(self, slots: np.ndarray, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Posterior mean ``xᵀθ_a`` and width ``√(xᵀA_a⁻¹x)`` of every row."""
        quadratic, linear = arm_forms(
            self._table.arrays["proj"], slots, X, self._table.run_of(slots)
        )
        # Rounding can push a tiny quadratic form below zero.
        return linear[:, 0], np.sqrt(np.maximum(quadratic, 0.0, out=quadratic), out=quadratic)

    def _update(self, slots: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        assert X is not None
        self._settle()
        self._refresh(self._add_statistics(slots, X, rewards))

    def _add_statistics(self, slots: np.ndarray, X: np.ndarray, rewards: np.ndarray) -> np.ndarray:
        """Sum rows into ``G``, ``b`` and the counts of their arms; returns the arms touched."""
        arrays = self._table.arrays
        touched = []
        for lo in range(0, len(slots), UPDATE_BLOCK):
            block = slice(lo, lo + UPDATE_BLOCK)
            order, arms, starts = group_rows(slots[block])
            x, r = X[block][order], rewards[block][order]
            arrays["gram"][arms] += grouped_outer_sums(x, x, starts)
            arrays["b"][arms] += np.add.reduceat(r[:, None] * x, starts)
            arrays["counts"][arms] += np.diff(starts, append=len(order))
            touched.append(arms)
        return np.unique(np.concatenate(touched))

    def _update_one(self, slot: int, x: np.ndarray | None, reward: float) -> None:
        assert x is not None
        proj = self._table.arrays["proj"][slot]
        d = self.dim
        # One product gives v = A⁻¹x (A⁻¹ is symmetric) and the prediction xᵀθ.
        u = x @ proj
        v = u[:d]
        # Sherman–Morrison, (A + x xᵀ)⁻¹ = A⁻¹ − v vᵀ / (1 + xᵀv), and the matching
        # recursive least-squares step θ ← θ − v (xᵀθ − r) / (1 + xᵀv): one rank-one update.
        if reward:
            u[d] -= reward
        proj -= v[:, None] * (u / (1.0 + float(x @ v)))
        # Scoring reads only [A⁻¹ | θ]; the event joins the queue for the statistics.
        queued = self._queued
        self._queue_slots[queued] = slot
        self._queue_x[queued] = x
        self._queue_rewards[queued] = reward
        self._queued = queued + 1
        if self._queued == _QUEUE_ROWS:
            self._settle()

    def state(self) -> State:
        self._settle()
        return super().state()

    def _settle(self) -> None:
        """Sum the queued online events into the statistics."""
        if self._queued:
            n, self._queued = self._queued, 0
            self._add_statistics(self._queue_slots[:n], self._queue_x[:n], self._queue_rewards[:n])

    def _refresh(self, slots: np.ndarray) -> None:
        """Recompute ``[A⁻¹ | θ]`` of the given slots from their statistics."""
        arrays = self._table.arrays
        a_inv = np.linalg.inv(arrays["gram"][slots] + self.ridge * np.eye(self.dim))
        arrays["proj"][slots, :, : self.dim] = a_inv
        arrays["proj"][slots, :, self.dim] = np.einsum("kde,ke->kd", a_inv, arrays["b"][slots])

    def _rebuild(self) -> None:
        self._refresh(np.arange(1, len(self._table) + 1))


class LinUCB(DisjointRidge):
    """Disjoint LinUCB: score ``xᵀθ_a + α √(xᵀA_a⁻¹x)`` with ``A_a = λI + Σ x xᵀ``.

    Deterministic: the RNG only breaks ties in ``select``.

    >>> learner = LinUCB(dim=2, alpha=0.5, seed=0)
    >>> learner.update(np.array([10, 11]), np.eye(2), np.array([1.0, 0.0]))
    >>> learner.score(np.array([10, 11, 12]), np.array([[1.0, 0.0]] * 3)).round(3).tolist()
    [0.854, 0.5, 0.5]
    """

    name: ClassVar[str] = "linucb"
    _hyperparameters: ClassVar[tuple[str, ...]] = ("dim", "alpha", "ridge")

    def __init__(
        self, dim: int, alpha: float = 1.0, ridge: float = 1.0, seed: int | None = None
    ) -> None:
        self.alpha = positive("alpha", alpha, allow_zero=True)
        super().__init__(dim, ridge=ridge, seed=seed)

    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        assert X is not None
        mean, width = self._posterior(slots, X)
        return mean + self.alpha * width

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"dim": 3, "alpha": 0.7, "ridge": 0.5}
