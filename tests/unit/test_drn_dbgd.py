"""Dueling Bandit Gradient Descent: perturbation, the step, and the learner's minor update."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from services.drn.dbgd import perturb, step_towards
from services.drn.learner import DRNLearner
from services.drn.network import DuelingQNetwork


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _weights() -> dict[str, np.ndarray]:
    return DuelingQNetwork(5, 3, hidden=(8,), seed=0).weights()


def _equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_perturb_draws_within_alpha_of_each_parameter() -> None:
    weights = _weights()
    explore, delta = perturb(weights, 0.1, np.random.default_rng(0))
    for name, w in weights.items():
        assert delta[name].dtype == explore[name].dtype == np.float32
        assert np.all(np.abs(delta[name]) <= 0.1 * np.abs(w) + 1e-12)
        np.testing.assert_array_equal(explore[name], w + delta[name])
    # Relative noise is spread over (-alpha, alpha), not a constant factor.
    ratios = np.concatenate([(delta[k] / weights[k]).ravel() for k in weights])
    assert ratios.min() < -0.08 and ratios.max() > 0.08
    again, again_delta = perturb(weights, 0.1, np.random.default_rng(0))
    assert _equal(again, explore) and _equal(again_delta, delta)
    assert not _equal(perturb(weights, 0.1, np.random.default_rng(1))[1], delta)


def test_perturb_edge_cases() -> None:
    weights = {"w": np.array([0.0, 2.0], np.float32)}
    explore, delta = perturb(weights, 0.5, np.random.default_rng(3))
    assert delta["w"][0] == 0.0 and explore["w"][0] == 0.0  # zero params stay put
    still, no_delta = perturb(weights, 0.0, np.random.default_rng(3))
    assert _equal(still, weights) and not np.any(no_delta["w"])
    with pytest.raises(ValueError, match="alpha"):
        perturb(weights, -0.1, np.random.default_rng(0))


def test_step_towards_is_exactly_w_plus_eta_delta() -> None:
    weights = _weights()
    explore, delta = perturb(weights, 0.2, np.random.default_rng(5))
    stepped = step_towards(weights, delta, 0.05)
    for name, w in weights.items():
        np.testing.assert_array_equal(stepped[name], w + np.float32(0.05) * delta[name])
    assert _equal(step_towards(weights, delta, 1.0), explore)
    assert _equal(step_towards(weights, delta, 0.0), weights)
    with pytest.raises(ValueError, match="eta"):
        step_towards(weights, delta, -1.0)
    with pytest.raises(ValueError, match=r"missing \['value.out.bias'\]"):
        step_towards(weights, {k: v for k, v in delta.items() if k != "value.out.bias"}, 0.1)
    with pytest.raises(ValueError, match="'value.fc1.weight': shape"):
        step_towards(weights, {**delta, "value.fc1.weight": np.zeros(3, np.float32)}, 0.1)


def test_minor_update_moves_w_only_on_explore_wins() -> None:
    learner = DRNLearner(5, 3, hidden=(8,), alpha=0.1, eta=0.05, seed=123)
    rows = np.random.default_rng(0).normal(size=(20, 8))
    for winner in ["exploit", "explore", "tie", "explore", "exploit", "tie", "explore"]:
        w, delta, explore = (
            learner.weights(),
            learner.exploration_delta(),
            learner.explore_weights(),
        )
        version = learner.explore_version
        assert _equal(explore, {k: w[k] + delta[k] for k in w})

        assert learner.minor_update(winner, explore_version=version)

        after = learner.weights()
        if winner == "explore":
            assert _equal(after, step_towards(w, delta, 0.05))
            assert _equal(after, {k: w[k] + np.float32(0.05) * delta[k] for k in w})
        else:
            assert _equal(after, w)  # bit-identical
        # A fresh W̃ around the (possibly moved) W, with a fresh ΔW.
        assert learner.explore_version == version + 1
        new_delta = learner.exploration_delta()
        assert all(not np.array_equal(new_delta[k], delta[k]) for k in delta)
        assert _equal(learner.explore_weights(), {k: after[k] + new_delta[k] for k in after})
        assert not np.array_equal(learner.score_explore(rows), learner.score(rows))
    assert learner.counters["explore_wins"] == 3
    assert learner.counters["exploit_wins"] == 2
    assert learner.counters["ties"] == 2
    assert learner.explore_win_rate == pytest.approx(3 / 5)


def test_minor_update_ignores_verdicts_about_a_replaced_explorer() -> None:
    learner = DRNLearner(5, 3, hidden=(8,), seed=1)
    old_version = learner.explore_version
    learner.minor_update("tie")
    w, explore = learner.weights(), learner.explore_weights()
    assert not learner.minor_update("explore", explore_version=old_version)
    assert _equal(learner.weights(), w) and _equal(learner.explore_weights(), explore)
    assert learner.counters["stale_verdicts"] == 1
    assert learner.counters["minor_updates"] == 1
    with pytest.raises(ValueError, match="winner must be"):
        learner.minor_update("W~")


def test_minor_updates_are_reproducible_for_a_seed() -> None:
    verdicts = ["explore", "exploit", "explore", "tie", "explore"]
    a, b = DRNLearner(5, 3, hidden=(8,), seed=9), DRNLearner(5, 3, hidden=(8,), seed=9)
    for winner in verdicts:
        a.minor_update(winner)
        b.minor_update(winner)
    assert _equal(a.weights(), b.weights())
    assert _equal(a.explore_weights(), b.explore_weights())
    assert math.isnan(DRNLearner(5, 3, hidden=(8,), seed=0).explore_win_rate)
