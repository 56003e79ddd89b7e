"""Hybrid LinUCB (Li et al., WWW 2010, Algorithm 2) kept as additive statistics.

Features split into per-arm features ``x`` (first ``arm_dim`` columns) and
shared features ``z`` (the remaining ``shared_dim``), whose coefficients β are
learned from every arm's feedback. Algorithm 2 updates ``A0`` and ``b0``
incrementally; those are not additive across partitions, so we keep the raw
sums instead and derive them:

- per arm: ``G_a = Σ x xᵀ``, ``B_a = Σ x zᵀ``, ``b_a = Σ r x``;
- global: ``Z = Σ z zᵀ``, ``bz = Σ r z``;
- ``A_a = λI + G_a``, ``A0 = λI + Z − Σ_a B_aᵀ A_a⁻¹ B_a``,
  ``b0 = bz − Σ_a B_aᵀ A_a⁻¹ b_a``, ``β = A0⁻¹ b0``,
  ``θ_a = A_a⁻¹ (b_a − B_a β)``.

This is exactly Algorithm 2's ``A0`` and ``b0`` (their updates telescope to these
sums), with the identity prior generalised to ``λI``.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np

from services.bandits._kernels import (
    UPDATE_BLOCK,
    arm_forms,
    group_rows,
    grouped_outer_sums,
    row_dots,
)
from services.bandits.base import BanditLearner, dimension, positive


class HybridLinUCB(BanditLearner):
    """Score ``zᵀβ + xᵀθ_a + α √s`` with Algorithm 2's variance ``s``.

    ``s = (z − u)ᵀ A0⁻¹ (z − u) + xᵀA_a⁻¹x`` with ``u = B_aᵀA_a⁻¹x`` is the
    paper's four-term expression, factored. Per arm we keep
    ``[A_a⁻¹ | A_a⁻¹B_a | θ_a]`` side by side, so one product with ``x`` gives
    every per-arm term of a row. Arm-local terms are refreshed on update; the
    global ones (``A0⁻¹``, β, every θ_a) are derived at the next ``score`` and
    cached until the next update. With ``shared_dim=0`` this is disjoint LinUCB.

    >>> learner = HybridLinUCB(arm_dim=1, shared_dim=1, alpha=0.0, seed=0)
    >>> X = np.array([[1.0, 1.0], [1.0, 1.0]])
    >>> learner.update(np.array([1, 2]), X, np.array([1.0, 1.0]))
    >>> learner.score(np.array([1, 3]), np.array([[1.0, 1.0], [0.0, 1.0]])).round(3).tolist()
    [0.75, 0.5]
    """

    name: ClassVar[str] = "hybrid_linucb"
    needs_features: ClassVar[bool] = True
    uses_item_features: ClassVar[bool] = True
    _hyperparameters: ClassVar[tuple[str, ...]] = ("arm_dim", "shared_dim", "alpha", "ridge")
    _arm_statistics: ClassVar[tuple[str, ...]] = ("gram", "cross", "b", "counts")
    _global_statistics: ClassVar[tuple[str, ...]] = ("shared_gram", "shared_b")
    _examination: ClassVar[Literal["features", "weights"] | None] = "features"

    def __init__(
        self,
        arm_dim: int,
        shared_dim: int,
        alpha: float = 1.0,
        ridge: float = 1.0,
        seed: int | None = None,
    ) -> None:
        self.arm_dim = dimension("arm_dim", arm_dim)
        self.shared_dim = dimension("shared_dim", shared_dim, minimum=0)
        self.alpha = positive("alpha", alpha, allow_zero=True)
        self.ridge = positive("ridge", ridge)
        k = self.shared_dim
        self._shared_gram = np.zeros((k, k))
        self._shared_b = np.zeros(k)
        self._a0_inv = np.eye(k) / self.ridge
        self._beta = np.zeros(k)
        self._stale = False
        super().__init__(seed=seed)

    @classmethod
    def dimensions(cls, context_dim: int, item_dim: int) -> dict[str, int]:
        """Per-arm features are the context; shared ones its outer product with the item's."""
        return {"arm_dim": context_dim, "shared_dim": context_dim * item_dim}

    @classmethod
    def policy_features(cls, context: np.ndarray, item_features: np.ndarray) -> np.ndarray:
        """``[context, vec(context ⊗ item_features)]`` per candidate.

        The per-arm features are the request context; the shared features are the
        outer product of user context and item features, as in Li et al. (2010).

        >>> HybridLinUCB.policy_features(np.array([1.0, 2.0]), np.array([[1.0], [0.5]]))
        array([[1. , 2. , 1. , 2. ],
               [1. , 2. , 0.5, 1. ]])
        """
        rows = super().policy_features(context, item_features)
        items = np.asarray(item_features, dtype=np.float64)
        outer = rows[:, :, None] * items[:, None, :]
        return np.concatenate([rows, outer.reshape(len(items), -1)], axis=1)

    @property
    def n_features(self) -> int:
        return self.arm_dim + self.shared_dim

    def _arm_prior(self) -> dict[str, np.ndarray]:
        d, k = self.arm_dim, self.shared_dim
        proj = np.zeros((d, d + k + 1))
        proj[:, :d] = np.eye(d) / self.ridge
        return {
            "gram": np.zeros((d, d)),
            "cross": np.zeros((d, k)),
            "b": np.zeros(d),
            "counts": np.zeros((), dtype=np.int64),
            # [A⁻¹ | C = A⁻¹B | θ], the per-arm terms a row's score needs.
            "proj": proj,
            # A⁻¹b, and the arm's parts of the sums in A0 and b0: BᵀA⁻¹B and BᵀA⁻¹b.
            "theta0": np.zeros(d),
            "shared_sq": np.zeros((k, k)),
            "shared_lin": np.zeros(k),
        }

    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        assert X is not None
        if self._stale:
            self._refresh_shared()
        d, k = self.arm_dim, self.shared_dim
        x, z = X[:, :d], X[:, d:]
        quadratic, linear = arm_forms(
            self._table.arrays["proj"], slots, x, self._table.run_of(slots)
        )
        residual = z - linear[:, :k]
        variance = row_dots(residual @ self._a0_inv, residual) + quadratic
        mean = z @ self._beta + linear[:, k]
        return mean + self.alpha * np.sqrt(np.maximum(variance, 0.0))

    def _update(self, slots: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        assert X is not None
        d = self.arm_dim
        arrays = self._table.arrays
        touched = []
        for lo in range(0, len(slots), UPDATE_BLOCK):
            block = slice(lo, lo + UPDATE_BLOCK)
            order, arms, starts = group_rows(slots[block])
            rows, r = X[block][order], rewards[block][order]
            x, z = rows[:, :d], rows[:, d:]
            arrays["gram"][arms] += grouped_outer_sums(x, x, starts)
            arrays["cross"][arms] += grouped_outer_sums(x, z, starts)
            arrays["b"][arms] += np.add.reduceat(r[:, None] * x, starts)
            arrays["counts"][arms] += np.diff(starts, append=len(order))
            self._shared_gram += z.T @ z
            self._shared_b += r @ z
            touched.append(arms)
        self._refresh_arms(np.unique(np.concatenate(touched)), invert=True)
        self._stale = True

    def _update_one(self, slot: int, features: np.ndarray | None, reward: float) -> None:
        assert features is not None
        d = self.arm_dim
        x, z = features[:d], features[d:]
        arrays = self._table.arrays
        a_inv = arrays["proj"][slot, :, :d]
        v = a_inv @ x
        # Sherman–Morrison: (A + x xᵀ)⁻¹ = A⁻¹ − (A⁻¹x)(A⁻¹x)ᵀ / (1 + xᵀA⁻¹x).
        a_inv -= v[:, None] * (v / (1.0 + x @ v))
        arrays["gram"][slot] += x[:, None] * x
        arrays["cross"][slot] += x[:, None] * z
        arrays["b"][slot] += reward * x
        arrays["counts"][slot] += 1
        self._shared_gram += z[:, None] * z
        self._shared_b += reward * z
        self._refresh_arms(slot, invert=False)
        self._stale = True

    def _refresh_arms(self, slots: int | np.ndarray, *, invert: bool) -> None:
        """Recompute the arm-local derived terms of ``slots`` (A⁻¹ too if ``invert``).

        ``slots`` is one slot (the online path, plain views) or an array of them.
        """
        d, k = self.arm_dim, self.shared_dim
        arrays = self._table.arrays
        if invert:
            a_inv = np.linalg.inv(arrays["gram"][slots] + self.ridge * np.eye(d))
            arrays["proj"][slots, :, :d] = a_inv
        else:
            a_inv = arrays["proj"][slots, :, :d]
        cross, b = arrays["cross"][slots], arrays["b"][slots][..., None]
        c = a_inv @ cross
        c_t = np.swapaxes(c, -1, -2)
        arrays["proj"][slots, :, d : d + k] = c
        arrays["theta0"][slots] = (a_inv @ b)[..., 0]
        arrays["shared_sq"][slots] = c_t @ cross
        arrays["shared_lin"][slots] = (c_t @ b)[..., 0]

    def _refresh_shared(self) -> None:
        """Derive A0⁻¹, β and every arm's θ_a from the current sums."""
        d, k = self.arm_dim, self.shared_dim
        a0 = self.ridge * np.eye(k) + self._shared_gram - self._table.rows("shared_sq").sum(axis=0)
        b0 = self._shared_b - self._table.rows("shared_lin").sum(axis=0)
        self._a0_inv = np.linalg.inv(a0)
        self._beta = self._a0_inv @ b0
        arrays = self._table.arrays
        arrays["proj"][:, :, d + k] = (
            arrays["theta0"] - arrays["proj"][:, :, d : d + k] @ self._beta
        )
        self._stale = False

    def _rebuild(self) -> None:
        self._refresh_arms(np.arange(1, len(self._table) + 1), invert=True)
        self._stale = True

    def _arms_removed(self) -> None:
        """``A0`` and ``b0`` sum over the arms held.

        An evicted arm's events stay in the shared sums ``Z`` and ``bz`` (they are not
        kept per arm), so they keep informing β as if that arm's own coefficients
        were 0; ``A0`` only grows by the arm's dropped ``BᵀA⁻¹B``, so it stays
        invertible.
        """
        self._stale = True

    @classmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        return {"arm_dim": 2, "shared_dim": 2, "alpha": 0.7, "ridge": 0.5}
