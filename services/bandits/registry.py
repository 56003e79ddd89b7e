"""Learners by name, and one constructor that every service and benchmark uses.

``dim`` is always the width of the feature matrix ``X`` the caller will pass.
Learners that ignore features (``ts_beta``, ``egreedy``) ignore it. For
``hybrid_linucb`` the caller must say how many of those columns are shared:
the first ``dim - shared_dim`` columns are per-arm features, the last
``shared_dim`` are shared ones (``shared_dim`` has no default, because 0 would
silently make it disjoint LinUCB).

>>> make_learner("linucb", dim=4, alpha=0.5).hyperparameters()
{'dim': 4, 'alpha': 0.5, 'ridge': 1.0}
>>> make_learner("hybrid_linucb", dim=6, shared_dim=2).hyperparameters()["arm_dim"]
4
"""

from __future__ import annotations

import inspect
from typing import Any

from services.bandits.base import BanditLearner
from services.bandits.epsilon import EpsilonGreedy
from services.bandits.hybrid import HybridLinUCB
from services.bandits.linear_thompson import LinearThompson
from services.bandits.linucb import LinUCB
from services.bandits.thompson import BetaThompson

LEARNERS: dict[str, type[BanditLearner]] = {
    cls.name: cls for cls in (LinUCB, HybridLinUCB, BetaThompson, LinearThompson, EpsilonGreedy)
}


def make_learner(name: str, *, dim: int, **params: Any) -> BanditLearner:
    """Build the learner registered as ``name`` for feature matrices of width ``dim``."""
    if name not in LEARNERS:
        raise ValueError(f"unknown bandit learner {name!r}; known: {sorted(LEARNERS)}")
    cls = LEARNERS[name]
    if cls is HybridLinUCB:
        if "shared_dim" not in params:
            raise ValueError("hybrid_linucb needs shared_dim (the number of shared columns of X)")
        params["arm_dim"] = dim - params["shared_dim"]
    elif cls.needs_features:
        params["dim"] = dim
    accepted = set(inspect.signature(cls).parameters)
    if unknown := set(params) - accepted:
        raise ValueError(f"{name} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    return cls(**params)
