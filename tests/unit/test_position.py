"""Position-aware learning (docs/decisions.md §23): the examination model and the learners."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from services.bandits import (
    LEARNERS,
    BanditLearner,
    BetaThompson,
    EpsilonGreedy,
    ExaminationModel,
    LinUCB,
    new_learner,
)
from services.evaluation import LearnerPolicy, PositionAwarePolicy, simulate
from services.simulator import WorldConfig
from services.simulator.world import position_bias

POSITION_LEARNERS = [cls for cls in LEARNERS.values() if cls.learns_positions()]
CASES: list[tuple[type[BanditLearner], dict[str, Any]]] = [
    (cls, cls._unit_test_params()) for cls in POSITION_LEARNERS
] + [(BetaThompson, {"discount": 0.99})]
IDS = [cls.name for cls in POSITION_LEARNERS] + ["ts_beta_discounted"]


@pytest.fixture(params=CASES, ids=IDS)
def case(request: pytest.FixtureRequest) -> tuple[type[BanditLearner], dict[str, Any]]:
    return request.param


def random_slates(theta: np.ndarray, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions and clicks of slates in random order: relevance independent of the slot."""
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, len(theta), size=rows)
    relevance = rng.uniform(0.05, 0.5, size=rows)
    clicks = (rng.random(rows) < theta[positions] * relevance).astype(np.float64)
    return positions, clicks


def test_the_examination_estimate_converges_to_the_true_theta() -> None:
    theta = np.array([1.0, 0.7, 0.5, 0.35, 0.2])
    model = ExaminationModel(5, prior_shows=50.0)
    positions, clicks = random_slates(theta, 400_000, seed=1)
    model.observe(positions, clicks)
    np.testing.assert_allclose(model.theta(), theta, atol=0.02)
    np.testing.assert_allclose(model.examination(np.array([4, 3, 9])), theta[[4, 3, 4]], atol=0.02)


def test_the_examination_estimate_is_blind_without_data_and_shrinks_with_little() -> None:
    model = ExaminationModel(3, prior_shows=200.0)
    assert model.theta().tolist() == [1.0, 1.0, 1.0]
    few_positions, few_clicks = random_slates(np.array([1.0, 0.5, 0.2]), 60, seed=2)
    model.observe(few_positions, few_clicks)
    assert (model.theta() > 0.6).all(), "60 rows move θ little against 200 pseudo-shows"
    one_by_one = ExaminationModel(3, prior_shows=200.0)
    for position, click in zip(few_positions.tolist(), few_clicks.tolist(), strict=True):
        one_by_one.observe_one(position, click)
    np.testing.assert_allclose(one_by_one.theta(), model.theta())


def test_the_examination_state_round_trips_and_bad_input_is_refused() -> None:
    model = ExaminationModel(4, prior_shows=0.0)
    model.observe(np.array([0, 1, 2, 3, 0]), np.array([1.0, 0.5, 0.0, 1.0, 1.0]))
    copy = ExaminationModel(4, prior_shows=0.0)
    copy.load(model.state())
    assert copy.theta().tolist() == model.theta().tolist() == [1.0, 0.5, 0.05, 1.0]
    with pytest.raises(ValueError, match="shape"):
        copy.load({"shows": np.zeros(3), "rewards": np.zeros(4)})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.observe(np.array([0]), np.array([2.0]))
    with pytest.raises(ValueError, match=">= 0"):
        model.observe(np.array([-1]), np.array([1.0]))
    with pytest.raises(ValueError, match="reward in"):
        model.observe_one(0, 1.5)


def build(case: tuple[type[BanditLearner], dict[str, Any]], seed: int = 0) -> BanditLearner:
    cls, params = case
    return cls(**params, seed=seed)


def feedback(learner: BanditLearner, n: int, seed: int) -> tuple[np.ndarray, Any, np.ndarray]:
    rng = np.random.default_rng(seed)
    items = rng.choice(np.array([5, 17, 9001]), size=n)
    X = rng.normal(size=(n, learner.n_features)) if learner.needs_features else None
    return items, X, rng.uniform(0.0, 1.0, size=n)


def test_full_examination_is_the_position_blind_update(case) -> None:
    aware, blind = build(case), build(case)
    items, X, rewards = feedback(aware, 40, seed=3)
    aware.update(items, X, rewards, np.ones(len(items)))
    blind.update(items, X, rewards)
    for name, array in blind.state().items():
        np.testing.assert_allclose(aware.state()[name], array, rtol=1e-12, atol=1e-12)


def test_an_examination_weighted_batch_equals_single_updates(case) -> None:
    batched, single = build(case), build(case)
    items, X, rewards = feedback(batched, 50, seed=4)
    theta = np.random.default_rng(5).uniform(0.1, 1.0, size=len(items))
    batched.update(items, X, rewards, theta)
    for i in range(len(items)):
        x = None if X is None else X[i : i + 1]
        single.update(items[i : i + 1], x, rewards[i : i + 1], theta[i : i + 1])
    for name, array in single.state().items():
        np.testing.assert_allclose(batched.state()[name], array, rtol=1e-9, atol=1e-12)


def test_examination_that_is_not_one_probability_per_row_is_refused(case) -> None:
    learner = build(case)
    items, X, rewards = feedback(learner, 3, seed=6)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        learner.update(items, X, rewards, np.array([1.0, 0.0, 0.5]))
    with pytest.raises(ValueError, match="shape"):
        learner.update(items, X, rewards, np.ones(2))
    with pytest.raises(ValueError, match="examination"):
        EpsilonGreedy().update(items, None, rewards, np.ones(3))


def slot_biased_feedback(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item 1 (relevance 0.3) always shown in a slot examined 30% of the time, item 2
    (relevance 0.15) always at the top: blind, item 1 looks worse (0.09 < 0.15)."""
    rng = np.random.default_rng(seed)
    items = np.tile(np.array([1, 2]), n)
    theta = np.tile(np.array([0.3, 1.0]), n)
    clicks = (rng.random(2 * n) < theta * np.tile(np.array([0.3, 0.15]), n)).astype(float)
    return items, theta, clicks


@pytest.mark.parametrize("name", ["linucb", "ts_beta"])
def test_the_position_aware_learner_ranks_by_relevance_where_the_blind_one_is_biased(name) -> None:
    items, theta, clicks = slot_biased_feedback(4000, seed=7)
    if name == "linucb":
        aware, blind = LinUCB(dim=1, alpha=0.0), LinUCB(dim=1, alpha=0.0)
        X: np.ndarray | None = np.ones((len(items), 1))
    else:
        aware, blind = BetaThompson(), BetaThompson()
        X = None
    aware.update(items, X, clicks, theta)
    blind.update(items, X, clicks)

    def means(learner: LinUCB | BetaThompson) -> np.ndarray:
        state = learner.state()
        if isinstance(learner, LinUCB):
            return state["b"][:, 0] / (state["gram"][:, 0, 0] + learner.ridge)
        return (1 + state["successes"]) / (2 + state["successes"] + state["failures"])

    blind_means, aware_means = means(blind), means(aware)
    assert blind_means[0] < blind_means[1], "blind: the low-slot item looks worse"
    assert aware_means[0] > aware_means[1], "aware: the more relevant item ranks first"
    # Linear: the PBM regression is unbiased. Beta: a non-click counts θ of a failure, so
    # the mean tends to μ / (1 + μ (1 - θ)) (exact at the top slot; docs/decisions.md §23).
    low_slot = 0.3 if name == "linucb" else 0.3 / (1 + 0.3 * 0.7)
    assert aware_means[0] == pytest.approx(low_slot, abs=0.02)
    assert aware_means[1] == pytest.approx(0.15, abs=0.02)


def test_the_position_aware_policy_estimates_theta_from_its_shuffled_slates() -> None:
    config = WorldConfig(n_users=100, n_items=60, n_candidates=20, position_decay=1.0)
    learner = new_learner({"learner": "linucb", "alpha": 0.5}, context_dim=config.context_dim)
    model = ExaminationModel(config.slate_size, prior_shows=20.0)
    policies = {
        "aware": PositionAwarePolicy(learner, model, shuffle=0.5, seed=1),
        "blind": LearnerPolicy(new_learner({"learner": "linucb"}, context_dim=config.context_dim)),
    }
    result = simulate(policies, config=config, steps=1500, seed=3)
    truth = position_bias(np.arange(config.slate_size), 1.0)
    assert model.shows.sum() == pytest.approx(0.5 * 1500 * config.slate_size, rel=0.1)
    np.testing.assert_allclose(model.theta(), truth, atol=0.15)
    assert result.ctr()["aware"] > 0.0
    with pytest.raises(ValueError, match="examination"):
        PositionAwarePolicy(EpsilonGreedy(), model)
