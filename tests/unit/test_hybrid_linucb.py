"""Hybrid LinUCB: reduces to disjoint LinUCB, and matches Li et al. 2010 Algorithm 2."""

from __future__ import annotations

import numpy as np
import pytest

from services.bandits import HybridLinUCB, LinUCB


class Algorithm2:
    """Li et al. (WWW 2010) Algorithm 2, written out as in the paper (prior λI)."""

    def __init__(self, arm_dim: int, shared_dim: int, alpha: float, ridge: float) -> None:
        self.d, self.k, self.alpha, self.ridge = arm_dim, shared_dim, alpha, ridge
        self.A0 = ridge * np.eye(shared_dim)
        self.b0 = np.zeros(shared_dim)
        self.A: dict[int, np.ndarray] = {}
        self.B: dict[int, np.ndarray] = {}
        self.b: dict[int, np.ndarray] = {}

    def _arm(self, a: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if a not in self.A:
            return self.ridge * np.eye(self.d), np.zeros((self.d, self.k)), np.zeros(self.d)
        return self.A[a], self.B[a], self.b[a]

    def update(self, a: int, x: np.ndarray, z: np.ndarray, r: float) -> None:
        A, B, b = self._arm(a)
        A_inv = np.linalg.inv(A)
        self.A0 = self.A0 + B.T @ A_inv @ B
        self.b0 = self.b0 + B.T @ A_inv @ b
        A, B, b = A + np.outer(x, x), B + np.outer(x, z), b + r * x
        self.A[a], self.B[a], self.b[a] = A, B, b
        A_inv = np.linalg.inv(A)
        self.A0 = self.A0 + np.outer(z, z) - B.T @ A_inv @ B
        self.b0 = self.b0 + r * z - B.T @ A_inv @ b

    def score(self, a: int, x: np.ndarray, z: np.ndarray) -> float:
        A0_inv = np.linalg.inv(self.A0)
        beta = A0_inv @ self.b0
        A, B, b = self._arm(a)
        A_inv = np.linalg.inv(A)
        theta = A_inv @ (b - B @ beta)
        s = (
            z @ A0_inv @ z
            - 2 * z @ A0_inv @ B.T @ A_inv @ x
            + x @ A_inv @ x
            + x @ A_inv @ B @ A0_inv @ B.T @ A_inv @ x
        )
        return float(z @ beta + x @ theta + self.alpha * np.sqrt(s))


def stream(rng: np.random.Generator, n: int, arm_dim: int, shared_dim: int):
    items = rng.integers(0, 6, size=n).astype(np.int64) + 100
    X = rng.normal(size=(n, arm_dim + shared_dim))
    rewards = (rng.random(n) < 0.3 + 0.2 * (X[:, -1] > 0)).astype(np.float64)
    return items, X, rewards


def queries(rng: np.random.Generator, width: int) -> tuple[np.ndarray, np.ndarray]:
    items = np.arange(99, 107, dtype=np.int64)  # 99 and 106 are never updated
    return items, rng.normal(size=(len(items), width))


@pytest.mark.parametrize("batched", [False, True], ids=["single", "batched"])
def test_no_shared_features_is_disjoint_linucb(batched):
    rng = np.random.default_rng(0)
    hybrid = HybridLinUCB(arm_dim=4, shared_dim=0, alpha=0.6, ridge=1.5)
    disjoint = LinUCB(dim=4, alpha=0.6, ridge=1.5)
    for _ in range(3):
        items, X, rewards = stream(rng, 120, 4, 0)
        for learner in (hybrid, disjoint):
            if batched:
                learner.update(items, X, rewards)
            else:
                for i in range(len(items)):
                    learner.update(items[i : i + 1], X[i : i + 1], rewards[i : i + 1])
        query_items, query_X = queries(rng, 4)
        np.testing.assert_allclose(
            hybrid.score(query_items, query_X),
            disjoint.score(query_items, query_X),
            rtol=1e-9,
            atol=1e-12,
        )


@pytest.mark.parametrize(("arm_dim", "shared_dim"), [(3, 2), (2, 4)])
def test_matches_algorithm_2_incremental_updates(arm_dim, shared_dim):
    rng = np.random.default_rng(arm_dim * 10 + shared_dim)
    learner = HybridLinUCB(arm_dim, shared_dim, alpha=0.8, ridge=1.2)
    paper = Algorithm2(arm_dim, shared_dim, alpha=0.8, ridge=1.2)

    def check(label: str) -> None:
        query_items, query_X = queries(rng, arm_dim + shared_dim)
        expected = [
            paper.score(int(a), x[:arm_dim], x[arm_dim:])
            for a, x in zip(query_items, query_X, strict=True)
        ]
        np.testing.assert_allclose(
            learner.score(query_items, query_X), expected, rtol=1e-8, err_msg=label
        )

    check("before any feedback")
    for phase, (n, batched) in enumerate([(60, False), (200, True), (30, False), (5, True)]):
        items, X, rewards = stream(rng, n, arm_dim, shared_dim)
        if batched:
            learner.update(items, X, rewards)
        else:
            for i in range(n):
                learner.update(items[i : i + 1], X[i : i + 1], rewards[i : i + 1])
        for a, x, r in zip(items, X, rewards, strict=True):
            paper.update(int(a), x[:arm_dim], x[arm_dim:], float(r))
        check(f"after phase {phase}")


def test_shared_coefficients_come_from_every_arm():
    """A click signal carried only by a shared feature transfers to arms never seen."""
    rng = np.random.default_rng(5)
    learner = HybridLinUCB(arm_dim=1, shared_dim=2, alpha=0.0)
    n = 2_000
    items = rng.integers(0, 20, size=n).astype(np.int64)
    z = rng.normal(size=(n, 2))
    X = np.column_stack([np.ones(n), z])
    rewards = (rng.random(n) < np.where(z[:, 0] > 0, 0.6, 0.1)).astype(np.float64)
    learner.update(items, X, rewards)
    unseen = np.array([999, 999], dtype=np.int64)
    likely, unlikely = learner.score(unseen, np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 0.0]]))
    assert likely > unlikely + 0.2
