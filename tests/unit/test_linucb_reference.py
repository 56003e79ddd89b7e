"""LinUCB against a from-scratch reference (Li et al. 2010, Algorithm 1).

The reference keeps A_a = λI + Σ x xᵀ and b_a per arm in plain dicts and
recomputes θ = solve(A, b) and A⁻¹ with np.linalg on every score, so it shares
nothing with the learner's Sherman–Morrison and batched-inverse paths.
"""

from __future__ import annotations

import numpy as np
import pytest

from services.bandits import LinearThompson, LinUCB
from services.bandits.linucb import _QUEUE_ROWS


class ReferenceLinUCB:
    def __init__(self, dim: int, alpha: float, ridge: float) -> None:
        self.dim, self.alpha, self.ridge = dim, alpha, ridge
        self.A: dict[int, np.ndarray] = {}
        self.b: dict[int, np.ndarray] = {}

    def update(self, items: np.ndarray, X: np.ndarray, rewards: np.ndarray) -> None:
        for item, x, r in zip(items.tolist(), X, rewards, strict=True):
            if item not in self.A:
                self.A[item] = self.ridge * np.eye(self.dim)
                self.b[item] = np.zeros(self.dim)
            self.A[item] = self.A[item] + np.outer(x, x)
            self.b[item] = self.b[item] + r * x

    def score(self, items: np.ndarray, X: np.ndarray) -> np.ndarray:
        out = []
        for item, x in zip(items.tolist(), X, strict=True):
            A = self.A.get(item, self.ridge * np.eye(self.dim))
            b = self.b.get(item, np.zeros(self.dim))
            theta = np.linalg.solve(A, b)
            out.append(x @ theta + self.alpha * np.sqrt(x @ np.linalg.inv(A) @ x))
        return np.array(out)


def random_feedback(rng: np.random.Generator, n: int, dim: int, n_arms: int):
    items = rng.integers(0, n_arms, size=n).astype(np.int64) * 10 + 3
    X = rng.normal(size=(n, dim))
    true_theta = np.linspace(-0.5, 0.5, dim)
    rewards = (rng.random(n) < 1 / (1 + np.exp(-(X @ true_theta)))).astype(np.float64)
    return items, X, rewards


@pytest.mark.parametrize(("dim", "alpha", "ridge"), [(4, 1.0, 1.0), (7, 0.3, 2.5)])
def test_scores_match_reference_after_single_and_batched_updates(dim, alpha, ridge):
    rng = np.random.default_rng(dim)
    learner = LinUCB(dim, alpha=alpha, ridge=ridge, seed=0)
    reference = ReferenceLinUCB(dim, alpha, ridge)
    query_items = np.arange(-1, 9, dtype=np.int64) * 10 + 3  # arm -7 is never updated
    query_X = rng.normal(size=(len(query_items), dim))

    phases = [("single", 150), ("batched", 400), ("single", 50), ("batched", 7)]
    for mode, n in phases:
        items, X, rewards = random_feedback(rng, n, dim, n_arms=8)
        if mode == "single":
            for i in range(n):
                learner.update(items[i : i + 1], X[i : i + 1], rewards[i : i + 1])
        else:
            learner.update(items, X, rewards)
        reference.update(items, X, rewards)
        np.testing.assert_allclose(
            learner.score(query_items, query_X),
            reference.score(query_items, query_X),
            rtol=1e-6,
            atol=1e-9,
            err_msg=f"after {mode} phase of {n}",
        )


def test_large_score_calls_group_rows_by_arm_and_still_match():
    """5,000 rows take the per-arm product path rather than the per-row gather."""
    dim = 16
    rng = np.random.default_rng(1)
    learner = LinUCB(dim, alpha=0.8, seed=0)
    reference = ReferenceLinUCB(dim, 0.8, 1.0)
    items, X, rewards = random_feedback(rng, 2_000, dim, n_arms=12)
    learner.update(items, X, rewards)
    reference.update(items, X, rewards)

    query_items = rng.integers(-1, 13, size=5_000).astype(np.int64) * 10 + 3
    query_X = rng.normal(size=(5_000, dim))
    scores = learner.score(query_items, query_X)
    expected = reference.score(query_items[:400], query_X[:400])
    np.testing.assert_allclose(scores[:400], expected, rtol=1e-6, atol=1e-9)
    # The grouped path agrees row for row with calls small enough to gather per row.
    chunks = [
        learner.score(query_items[i : i + 200], query_X[i : i + 200]) for i in range(0, 5_000, 200)
    ]
    np.testing.assert_allclose(scores, np.concatenate(chunks), rtol=1e-12, atol=1e-12)


def test_batches_of_decisions_sharing_contexts_match_reference():
    """Each decision's candidates share its context: the contexts x arms product path."""
    dim = 9
    rng = np.random.default_rng(3)
    learner = LinUCB(dim, alpha=0.4, seed=0)
    reference = ReferenceLinUCB(dim, 0.4, 1.0)
    items, X, rewards = random_feedback(rng, 1_500, dim, n_arms=40)
    learner.update(items, X, rewards)
    reference.update(items, X, rewards)

    arms = np.arange(-1, 41, dtype=np.int64) * 10 + 3  # arm -7 is never updated
    contexts = rng.normal(size=(60, dim))
    query_items = np.tile(arms, 60)
    query_X = np.repeat(contexts, len(arms), axis=0)
    scores = learner.score(query_items, query_X)
    np.testing.assert_allclose(
        scores[:300], reference.score(query_items[:300], query_X[:300]), rtol=1e-6, atol=1e-9
    )
    chunks = [
        learner.score(query_items[i : i + 42], query_X[i : i + 42]) for i in range(0, 2520, 42)
    ]
    np.testing.assert_allclose(scores, np.concatenate(chunks), rtol=1e-12, atol=1e-12)


def test_select_takes_the_reference_argmax():
    dim = 5
    rng = np.random.default_rng(2)
    learner = LinUCB(dim, alpha=0.5, seed=0)
    reference = ReferenceLinUCB(dim, 0.5, 1.0)
    items, X, rewards = random_feedback(rng, 300, dim, n_arms=6)
    learner.update(items, X, rewards)
    reference.update(items, X, rewards)
    for _ in range(20):
        arms = np.arange(6, dtype=np.int64) * 10 + 3
        context = np.tile(rng.normal(size=dim), (6, 1))
        assert learner.select(arms, context, k=1)[0] == reference.score(arms, context).argmax()


@pytest.mark.parametrize("cls", [LinUCB, LinearThompson])
def test_queued_online_statistics_reach_every_read_and_batch(cls):
    """Single updates queue their statistics; state() and a later batch see all of them."""
    dim, n_single = 5, 2 * _QUEUE_ROWS + 88
    rng = np.random.default_rng(11)
    items, X, rewards = random_feedback(rng, n_single + 100, dim, n_arms=6)
    online, batched = cls(dim, seed=0), cls(dim, seed=0)
    for i in range(n_single):
        online.update(items[i : i + 1], X[i : i + 1], rewards[i : i + 1])
    midway = online.state()
    online.update(items[n_single:], X[n_single:], rewards[n_single:])
    batched.update(items[:n_single], X[:n_single], rewards[:n_single])
    for name, array in batched.state().items():
        np.testing.assert_allclose(midway[name], array, rtol=1e-9, atol=1e-12, err_msg=name)
    batched.update(items[n_single:], X[n_single:], rewards[n_single:])
    for name, array in batched.state().items():
        np.testing.assert_allclose(online.state()[name], array, rtol=1e-9, atol=1e-12)
    assert online.state()["counts"].sum() == n_single + 100
