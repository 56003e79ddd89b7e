"""Dueling Bandit Gradient Descent (Yue & Joachims 2009) as DRN uses it.

DRN (Zheng et al., WWW 2018, §4.4) explores in parameter space rather than by
random items: an exploration network W̃ = W + ΔW is drawn with
ΔW = α · U(−1, 1) ⊙ W (one uniform draw per parameter, scaled by that
parameter's own magnitude), both networks rank the candidates, the two lists
are interleaved, and when the feedback prefers W̃ the current network takes a
step towards it, W ← W + η · ΔW.

These are pure functions on ``dict[str, np.ndarray]`` weight dicts (as made by
:meth:`~services.drn.network.DuelingQNetwork.weights`); all arithmetic is in
float32 so a step is reproducible bit for bit. A parameter that is exactly zero
is never perturbed — a property of the multiplicative ΔW in the paper.

>>> import numpy as np
>>> w = {"b": np.array([1.0, -2.0], dtype=np.float32)}
>>> explore, delta = perturb(w, 0.1, np.random.default_rng(0))
>>> bool(np.all(np.abs(delta["b"]) <= 0.1 * np.abs(w["b"])))
True
>>> bool(np.array_equal(step_towards(w, delta, 1.0)["b"], explore["b"]))
True
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np


def _check_same_layout(weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    missing = sorted(set(weights) - set(delta))
    unexpected = sorted(set(delta) - set(weights))
    if missing or unexpected:
        raise ValueError(f"delta names differ: missing {missing}, unexpected {unexpected}")
    for name, w in weights.items():
        if np.shape(delta[name]) != np.shape(w):
            raise ValueError(
                f"delta {name!r}: shape {np.shape(delta[name])}, expected {np.shape(w)}"
            )


def perturb(
    weights: Mapping[str, np.ndarray], alpha: float, rng: np.random.Generator
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Draw an exploration network: ``(W + ΔW, ΔW)`` with ΔW = α · U(−1, 1) ⊙ W.

    Tensors are drawn in the dict's order, so the same ``rng`` state gives the
    same ΔW. ``alpha = 0`` gives W̃ = W (no exploration).
    """
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    scale = np.float32(alpha)
    explore: dict[str, np.ndarray] = {}
    delta: dict[str, np.ndarray] = {}
    for name, w in weights.items():
        w = np.asarray(w, dtype=np.float32)
        # float32 draws: half the cost of float64 ones, and W is float32 anyway.
        noise = np.float32(2.0) * rng.random(w.shape, dtype=np.float32) - np.float32(1.0)
        delta[name] = scale * noise * w
        explore[name] = w + delta[name]
    return explore, delta


def step_towards(
    weights: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray], eta: float
) -> dict[str, np.ndarray]:
    """The DBGD step after W̃ won: ``W + η · ΔW``, as new float32 arrays."""
    if not np.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    _check_same_layout(weights, delta)
    step = np.float32(eta)
    return {
        name: np.asarray(w, dtype=np.float32) + step * np.asarray(delta[name], dtype=np.float32)
        for name, w in weights.items()
    }
