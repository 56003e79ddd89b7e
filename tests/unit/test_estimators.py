"""Off-policy estimators on synthetic logs whose target-policy value is known exactly."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from services.evaluation.estimators import (
    Estimate,
    bootstrap,
    doubly_robust,
    importance_weights,
    ips,
    snips,
)

N_CONTEXTS, N_ACTIONS = 20, 5


@dataclass
class Log:
    rewards: np.ndarray
    logging_propensity: np.ndarray
    target_probability: np.ndarray
    predicted_logged: np.ndarray
    predicted_target: np.ndarray
    truth: float


def _log(n: int, seed: int, *, stochastic_target: bool, model_noise: float = 0.03) -> Log:
    """Contexts x, a softmax logging policy mu, a target pi and Bernoulli rewards q(x, a).

    The target's true value is sum_x p(x) sum_a pi(a|x) q(x, a), computed exactly.
    """
    rng = np.random.default_rng(seed)
    q = rng.uniform(0.02, 0.4, size=(N_CONTEXTS, N_ACTIONS))
    mu = rng.dirichlet(np.full(N_ACTIONS, 3.0), size=N_CONTEXTS)
    if stochastic_target:
        pi = np.exp(8 * q) / np.exp(8 * q).sum(axis=1, keepdims=True)
    else:
        pi = np.eye(N_ACTIONS)[q.argmax(axis=1)]
    truth = float(np.mean(np.sum(pi * q, axis=1)))
    x = rng.integers(N_CONTEXTS, size=n)
    a = np.array([rng.choice(N_ACTIONS, p=mu[i]) for i in x])
    rewards = (rng.random(n) < q[x, a]).astype(float)
    q_hat = np.clip(q + model_noise * rng.standard_normal(q.shape), 0, 1)
    return Log(
        rewards=rewards,
        logging_propensity=mu[x, a],
        target_probability=pi[x, a],
        predicted_logged=q_hat[x, a],
        predicted_target=np.sum(pi[x] * q_hat[x], axis=1),
        truth=truth,
    )


@pytest.mark.parametrize("stochastic_target", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_estimates_cover_the_true_value(seed: int, stochastic_target: bool) -> None:
    log = _log(20_000, seed, stochastic_target=stochastic_target)
    weights = {"logging_propensity": log.logging_propensity}
    estimates = {
        "ips": ips(log.rewards, **weights, target_probability=log.target_probability),
        "snips": snips(log.rewards, **weights, target_probability=log.target_probability),
        "dr": doubly_robust(
            log.rewards,
            **weights,
            target_probability=log.target_probability,
            predicted_logged=log.predicted_logged,
            predicted_target=log.predicted_target,
        ),
    }
    for name, estimate in estimates.items():
        assert estimate.n == 20_000
        assert estimate.ci_low < estimate.value < estimate.ci_high
        assert estimate.covers(log.truth), (name, estimate, log.truth)
        assert abs(estimate.value - log.truth) < 0.02


def test_doubly_robust_has_lower_variance_than_ips_with_a_decent_model() -> None:
    for seed in range(3):
        log = _log(20_000, seed, stochastic_target=False)
        kwargs = {
            "logging_propensity": log.logging_propensity,
            "target_probability": log.target_probability,
        }
        plain = ips(log.rewards, **kwargs)
        dr = doubly_robust(
            log.rewards,
            **kwargs,
            predicted_logged=log.predicted_logged,
            predicted_target=log.predicted_target,
        )
        # Bernoulli click noise bounds the gain; a decent model still removes a sixth.
        assert dr.stderr < 0.9 * plain.stderr


def test_doubly_robust_stays_unbiased_with_a_useless_model() -> None:
    log = _log(20_000, 4, stochastic_target=True)
    dr = doubly_robust(
        log.rewards,
        logging_propensity=log.logging_propensity,
        target_probability=log.target_probability,
        predicted_logged=np.full(20_000, 0.9),
        predicted_target=np.full(20_000, 0.9),
    )
    assert dr.covers(log.truth)


def test_standard_errors_match_the_spread_across_replications() -> None:
    values, stderrs = [], []
    for seed in range(40):
        log = _log(2000, 100 + seed, stochastic_target=True)
        estimate = ips(
            log.rewards,
            logging_propensity=log.logging_propensity,
            target_probability=log.target_probability,
        )
        values.append(estimate.value)
        stderrs.append(estimate.stderr)
    # The q, mu and pi tables differ per seed, so compare spread of (value - truth) loosely.
    assert np.std(values) < 3 * np.mean(stderrs)
    assert np.mean(stderrs) < 3 * np.std(values)


def test_snips_is_invariant_to_scaling_the_propensities_ips_is_not() -> None:
    log = _log(5000, 7, stochastic_target=True)
    kwargs = {"target_probability": log.target_probability}
    halved = log.logging_propensity / 2
    assert snips(log.rewards, logging_propensity=halved, **kwargs).value == pytest.approx(
        snips(log.rewards, logging_propensity=log.logging_propensity, **kwargs).value
    )
    assert ips(log.rewards, logging_propensity=halved, **kwargs).value == pytest.approx(
        ips(log.rewards, logging_propensity=log.logging_propensity, **kwargs).value * 2
    )


def test_hand_computed_values() -> None:
    r = np.array([1.0, 0.0, 1.0, 1.0])
    mu = np.array([0.5, 0.5, 0.25, 1.0])
    pi = np.array([1.0, 1.0, 0.5, 0.0])
    # w = [2, 2, 2, 0]; IPS = (2 + 0 + 2 + 0) / 4; SNIPS = 4 / 6.
    assert ips(r, logging_propensity=mu, target_probability=pi).value == 1.0
    assert snips(r, logging_propensity=mu, target_probability=pi).value == pytest.approx(2 / 3)
    q_logged = np.array([0.5, 0.5, 0.5, 0.5])
    q_target = np.array([0.4, 0.4, 0.4, 0.4])
    # DR terms: 0.4 + w (r - 0.5) = [1.4, -0.6, 1.4, 0.4] -> mean 0.65.
    dr = doubly_robust(
        r,
        logging_propensity=mu,
        target_probability=pi,
        predicted_logged=q_logged,
        predicted_target=q_target,
    )
    assert dr.value == pytest.approx(0.65)
    clipped = ips(r, logging_propensity=mu, target_probability=pi, clip=1.5)
    assert clipped.value == pytest.approx((1.5 + 1.5) / 4)


def test_normal_interval() -> None:
    e = Estimate.normal(1.0, 0.5, n=10, level=0.9)
    assert e.ci_low == pytest.approx(1 - 1.644854 * 0.5, abs=1e-5)
    assert e.as_dict()["n"] == 10
    single = Estimate.of_mean(np.array([1.0]))
    assert single.stderr == float("inf") and single.covers(123.0)


def test_bootstrap_agrees_with_the_normal_interval() -> None:
    log = _log(5000, 3, stochastic_target=True)
    w = log.target_probability / log.logging_propensity
    normal = ips(
        log.rewards,
        logging_propensity=log.logging_propensity,
        target_probability=log.target_probability,
    )
    boot = bootstrap(lambda idx: float(np.mean(w[idx] * log.rewards[idx])), len(w), seed=1)
    assert boot.value == pytest.approx(normal.value)
    assert boot.stderr == pytest.approx(normal.stderr, rel=0.15)
    assert boot.ci_low == pytest.approx(normal.ci_low, abs=0.01)
    assert boot.ci_high == pytest.approx(normal.ci_high, abs=0.01)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"logging_propensity": [0.0, 0.5]}, r"logging propensities must be in \(0, 1\]"),
        ({"target_probability": [1.5, 0.5]}, r"target probabilities must be in \[0, 1\]"),
        ({"logging_propensity": [0.5]}, "expected 1-d arrays of equal length"),
        ({"clip": 0.0}, "clip must be > 0"),
    ],
)
def test_bad_inputs_are_refused(kwargs: dict[str, object], message: str) -> None:
    arguments = {"logging_propensity": [0.5, 0.5], "target_probability": [1.0, 0.0]} | kwargs
    with pytest.raises(ValueError, match=message):
        importance_weights(**arguments)  # type: ignore[arg-type]


def test_empty_and_mismatched_logs_are_refused() -> None:
    with pytest.raises(ValueError, match="zero events"):
        ips(np.array([]), logging_propensity=np.array([]), target_probability=np.array([]))
    with pytest.raises(ValueError, match="differ in length"):
        ips(np.ones(3), logging_propensity=np.ones(2), target_probability=np.ones(2))
    with pytest.raises(ValueError, match="never takes a logged action"):
        snips(np.ones(2), logging_propensity=np.ones(2), target_probability=np.zeros(2))
