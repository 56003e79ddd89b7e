"""Logged propensities are the probabilities with which serving shows each item.

For every bandit serving policy (and the random baseline), many identical
requests are ranked and each item's empirical frequency of being shown is
compared with the propensity logged for it. Deterministic policies log exact
marginals; Thompson policies log Monte Carlo estimates from ``draws`` posterior
draws, whose expectation for a shown item exceeds the marginal by at most
``1 / (draws + 1)`` (its own draw is counted). The tolerance is 4 binomial
standard deviations of the frequency, plus that bias and 4 standard deviations
of the averaged estimates. DRN's per-slot propensities are checked the same way
in ``tests/unit/test_drn_policy.py::test_top_slot_propensity_matches_its_frequency``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from contracts.ids import item_labels
from services.bandits import BanditLearner, new_learner
from services.bandits._kernels import sampled_inclusion
from services.serving.policies import BanditPolicy, RandomPolicy, RankingPolicy, RankRequest

N_CANDIDATES = 8
K = 3
CONTEXT_DIM = 2
ITEM_DIM = 2
DRAWS = 64
REQUESTS = 3_000


def _request() -> RankRequest:
    rng = np.random.default_rng(3)
    candidates = [f"i{j}" for j in range(N_CANDIDATES)]
    return RankRequest(
        user_id="u",
        context=np.array([1.0, 0.5]),
        candidates=candidates,
        candidate_labels=item_labels(candidates),
        item_features=rng.normal(size=(N_CANDIDATES, ITEM_DIM)),
        k=K,
    )


def _trained(spec: dict[str, object], request: RankRequest) -> BanditLearner:
    """A learner that has seen a little feedback: some arms better, none certain."""
    learner = new_learner(spec, context_dim=CONTEXT_DIM, item_dim=ITEM_DIM, seed=1)
    rng = np.random.default_rng(2)
    means = np.linspace(0.2, 0.6, N_CANDIDATES)
    rows = np.repeat(np.arange(N_CANDIDATES), 6)
    X = learner.policy_features(request.context, request.item_features[rows])
    rewards = (rng.random(len(rows)) < means[rows]).astype(np.float64)
    learner.update(request.candidate_labels[rows], X, rewards)
    return learner


def _policies(request: RankRequest) -> dict[str, RankingPolicy]:
    specs: dict[str, dict[str, object]] = {
        "linucb": {"learner": "linucb", "alpha": 0.5},
        "hybrid": {"learner": "hybrid_linucb", "alpha": 0.5},
        "ts_beta": {"learner": "ts_beta"},
        "ts_linear": {"learner": "ts_linear", "v": 0.5},
        "egreedy": {"learner": "egreedy", "epsilon": 0.3},
    }
    policies: dict[str, RankingPolicy] = {"random": RandomPolicy()}
    for name, spec in specs.items():
        learner = _trained(spec, request)
        policies[name] = BanditPolicy(name, learner, None, epsilon=0.1, propensity_draws=DRAWS)
    return policies


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random", "linucb", "hybrid", "ts_beta", "ts_linear", "egreedy"])
def test_logged_propensities_match_how_often_items_are_shown(name: str) -> None:
    request = _request()
    policy = _policies(request)[name]
    rng = np.random.default_rng(11)
    shown: dict[str, int] = defaultdict(int)
    logged: dict[str, list[float]] = defaultdict(list)
    for _ in range(REQUESTS):
        slate = policy.rank(request, rng)
        assert len(slate.items) == K
        for item, propensity in zip(slate.items, slate.propensities, strict=True):
            assert 0.0 < propensity <= 1.0
            shown[item] += 1
            logged[item].append(propensity)
    for item in request.candidates:
        frequency = shown[item] / REQUESTS
        if not logged[item]:
            assert frequency == 0.0
            continue
        propensity = float(np.mean(logged[item]))
        p = min(max(frequency, propensity), 1.0)
        binomial = math.sqrt(p * (1.0 - p) / REQUESTS)
        mc = 0.5 / math.sqrt(DRAWS + 1) / math.sqrt(len(logged[item]))
        bias = 1.0 / (DRAWS + 1)
        tolerance = 4 * binomial + 4 * mc + bias + 1e-9
        assert abs(frequency - propensity) <= tolerance, (item, frequency, propensity, tolerance)


def test_thompson_propensities_are_not_the_sampled_scores_top_k() -> None:
    """Under an uncertain posterior a shown item's true marginal is far below 1, which
    the top-k of the one sampled score vector (the old propensity) cannot express."""
    request = _request()
    policy = BanditPolicy(
        "ts_beta", new_learner({"learner": "ts_beta"}, context_dim=0), None, epsilon=0.0
    )
    slate = policy.rank(request, np.random.default_rng(0))
    # A flat prior: every candidate is in the top 3 of 8 with probability 3/8.
    np.testing.assert_allclose(slate.propensities, K / N_CANDIDATES, atol=4 * 0.5 / math.sqrt(129))


def test_sampled_inclusion_counts_the_shown_draw_and_splits_ties() -> None:
    draws = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    shown = np.array([0.0, 2.0, 1.0])
    # Draw 1 ties items 0 and 1 for one place, draw 2 ties items 1 and 2.
    np.testing.assert_allclose(sampled_inclusion(draws, shown, k=1), [0.5 / 3, 2.0 / 3, 0.5 / 3])
    assert sampled_inclusion(draws, shown, k=3).tolist() == [1.0, 1.0, 1.0]
