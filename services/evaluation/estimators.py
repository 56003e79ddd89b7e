"""Off-policy estimators of a target policy's value from logged bandit feedback.

Each logged event is (context x, action a, reward r) where the logging policy
chose ``a`` with probability ``p = mu(a | x)``; the target policy would choose it
with probability ``pi(a | x)``. With importance weights ``w = pi(a | x) / p``:

* IPS: ``mean(w * r)`` -- unbiased whenever ``p > 0`` wherever ``pi > 0``;
* self-normalised IPS: ``sum(w * r) / sum(w)`` -- slightly biased, much lower
  variance when weights are large;
* doubly robust: ``mean(q_pi(x) + w * (r - q(x, a)))`` with a reward model ``q``
  and ``q_pi(x) = sum_a pi(a | x) q(x, a)`` -- unbiased if either the
  propensities or the reward model are right, and lower variance than IPS when
  the model is decent.

For a deterministic (or sampled) target pass ``pi(a | x)`` as the indicator that
the target chose the logged action; the indicator is an unbiased estimate of
the probability, so the estimators stay unbiased.

Every estimator returns an :class:`Estimate` with a normal-approximation
confidence interval; :func:`bootstrap` gives a percentile interval instead.
Events that are not independent -- the shown items of one slate -- are passed
with ``clusters`` (one label per event, e.g. the slate's request): the point
estimate is unchanged and the standard error is the cluster-robust one, from
the per-cluster sums of the estimator's terms (:func:`clustered_stderr`).

>>> r = np.array([1.0, 0.0, 1.0, 0.0])
>>> ips(r, logging_propensity=np.full(4, 0.5), target_probability=np.array([1, 1, 0, 0])).value
0.5
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np


@dataclass(frozen=True)
class Estimate:
    """A policy value estimate with its standard error and confidence interval."""

    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    @classmethod
    def normal(cls, value: float, stderr: float, n: int, level: float = 0.95) -> Estimate:
        """An estimate with the normal-approximation interval ``value +- z * stderr``.

        >>> e = Estimate.normal(0.5, 0.1, n=100)
        >>> round(e.ci_low, 4), round(e.ci_high, 4)
        (0.304, 0.696)
        """
        half = _z(level) * stderr
        return cls(value, stderr, value - half, value + half, n)

    @classmethod
    def of_mean(cls, values: np.ndarray, level: float = 0.95) -> Estimate:
        """The sample mean of ``values`` with its standard error."""
        n = values.size
        if n == 0:
            raise ValueError("cannot estimate from zero events")
        stderr = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.inf
        return cls.normal(float(values.mean()), stderr, n, level)

    def covers(self, truth: float) -> bool:
        """Whether ``truth`` lies inside the confidence interval."""
        return self.ci_low <= truth <= self.ci_high

    def as_dict(self) -> dict[str, float]:
        """Plain fields, for JSON reports."""
        return {
            "value": self.value,
            "stderr": self.stderr,
            "ci_low": self.ci_low,
            "ci_high": self.ci_high,
            "n": self.n,
        }


def clustered_stderr(terms: np.ndarray, clusters: np.ndarray, scale: float) -> float:
    """Cluster-robust standard error of ``sum(terms) / scale`` where ``terms`` have mean 0
    within the estimator (residuals) and only events of one cluster are dependent.

    ``sqrt(J / (J - 1) * sum_j (sum of cluster j's terms)^2) / scale`` over the
    ``J`` clusters; with one event per cluster it is the usual
    ``sqrt(n / (n - 1) * sum(terms^2)) / scale``.
    """
    labels = np.asarray(clusters)
    if labels.shape != terms.shape:
        raise ValueError(f"clusters {labels.shape} and events {terms.shape} differ in length")
    _, index = np.unique(labels, return_inverse=True)
    sums = np.bincount(index.ravel(), weights=terms)
    j = sums.size
    if j < 2:
        return math.inf
    return float(math.sqrt(j / (j - 1) * np.sum(sums**2)) / scale)


def _mean_estimate(values: np.ndarray, clusters: np.ndarray | None, level: float) -> Estimate:
    if clusters is None:
        return Estimate.of_mean(values, level)
    value = float(values.mean())
    stderr = clustered_stderr(values - value, clusters, values.size)
    return Estimate.normal(value, stderr, values.size, level)


def _z(level: float) -> float:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def _arrays(**named: np.ndarray) -> list[np.ndarray]:
    arrays = [np.asarray(a, dtype=np.float64) for a in named.values()]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1 or arrays[0].ndim != 1:
        listed = ", ".join(f"{k}{np.shape(v)}" for k, v in named.items())
        raise ValueError(f"expected 1-d arrays of equal length, got {listed}")
    if arrays[0].size == 0:
        raise ValueError("cannot estimate from zero events")
    return arrays


def importance_weights(
    logging_propensity: np.ndarray, target_probability: np.ndarray, clip: float | None = None
) -> np.ndarray:
    """``pi / mu`` per event, optionally clipped at ``clip`` (trading bias for variance)."""
    mu, pi = _arrays(logging_propensity=logging_propensity, target_probability=target_probability)
    if np.any(mu <= 0.0) or np.any(mu > 1.0):
        raise ValueError("logging propensities must be in (0, 1]")
    if np.any(pi < 0.0) or np.any(pi > 1.0):
        raise ValueError("target probabilities must be in [0, 1]")
    weights = pi / mu
    if clip is not None:
        if clip <= 0:
            raise ValueError(f"clip must be > 0, got {clip}")
        weights = np.minimum(weights, clip)
    return weights


def ips(
    rewards: np.ndarray,
    *,
    logging_propensity: np.ndarray,
    target_probability: np.ndarray,
    clip: float | None = None,
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Inverse propensity scoring: ``mean(w * r)``."""
    (r,) = _arrays(rewards=rewards)
    w = importance_weights(logging_propensity, target_probability, clip)
    if w.shape != r.shape:
        raise ValueError(f"rewards {r.shape} and propensities {w.shape} differ in length")
    return _mean_estimate(w * r, clusters, level)


def snips(
    rewards: np.ndarray,
    *,
    logging_propensity: np.ndarray,
    target_probability: np.ndarray,
    clip: float | None = None,
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Self-normalised IPS: ``sum(w * r) / sum(w)``, stderr by the delta method."""
    (r,) = _arrays(rewards=rewards)
    w = importance_weights(logging_propensity, target_probability, clip)
    if w.shape != r.shape:
        raise ValueError(f"rewards {r.shape} and propensities {w.shape} differ in length")
    total = w.sum()
    if total <= 0.0:
        raise ValueError("the target policy never takes a logged action: all weights are 0")
    value = float((w * r).sum() / total)
    n = r.size
    # Delta method for a ratio of means: var(w * (r - value)) / (n * mean(w)^2).
    residual = w * (r - value)
    if clusters is not None:
        return Estimate.normal(value, clustered_stderr(residual, clusters, total), n, level)
    stderr = float(math.sqrt(np.sum(residual**2) / n / n) / (total / n)) if n > 1 else math.inf
    return Estimate.normal(value, stderr, n, level)


def doubly_robust(
    rewards: np.ndarray,
    *,
    logging_propensity: np.ndarray,
    target_probability: np.ndarray,
    predicted_logged: np.ndarray,
    predicted_target: np.ndarray,
    clip: float | None = None,
    level: float = 0.95,
    clusters: np.ndarray | None = None,
) -> Estimate:
    """Doubly robust: ``mean(q_pi(x) + w * (r - q(x, a)))``.

    ``predicted_logged`` is the reward model at the logged action, ``q(x, a)``;
    ``predicted_target`` is its expectation under the target, ``q_pi(x)``.
    """
    r, q_logged, q_target = _arrays(
        rewards=rewards, predicted_logged=predicted_logged, predicted_target=predicted_target
    )
    w = importance_weights(logging_propensity, target_probability, clip)
    if w.shape != r.shape:
        raise ValueError(f"rewards {r.shape} and propensities {w.shape} differ in length")
    return _mean_estimate(q_target + w * (r - q_logged), clusters, level)


def bootstrap(
    estimator: Callable[[np.ndarray], float],
    n: int,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> Estimate:
    """Percentile-bootstrap interval of ``estimator(indices)`` over event resamples.

    ``estimator`` maps an index array (a resample of ``range(n)``) to a value, so
    any of the estimators above can be bootstrapped over its own arrays.

    >>> r = np.array([0.0, 1.0, 1.0, 0.0, 1.0])
    >>> e = bootstrap(lambda idx: float(r[idx].mean()), r.size, n_resamples=200)
    >>> e.value, 0.0 <= e.ci_low <= e.value <= e.ci_high <= 1.0
    (0.6, True)
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if n_resamples < 2:
        raise ValueError(f"n_resamples must be >= 2, got {n_resamples}")
    _z(level)
    rng = np.random.default_rng(seed)
    values = np.array([estimator(rng.integers(n, size=n)) for _ in range(n_resamples)])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values, [tail, 1.0 - tail])
    return Estimate(estimator(np.arange(n)), float(values.std(ddof=1)), float(low), float(high), n)
