"""The one place bandit learners are made: from a policy spec, or from published parameters.

:data:`LEARNERS` maps each learner's ``name`` (also ``meta["learner"]`` of its
model in the parameter store) to its class. A policy spec is
``{"learner": name, **hyperparameters}``; :func:`new_learner` sizes the learner
for the policy's feature layout, which the class describes
(:meth:`~services.bandits.BanditLearner.dimensions`), so a spec never holds a
width. :func:`learner_from_params` rebuilds the learner that a published (and,
for several parts, merged) state belongs to.

>>> new_learner({"learner": "linucb", "alpha": 0.5}, context_dim=4).hyperparameters()
{'dim': 4, 'alpha': 0.5, 'ridge': 1.0}
>>> new_learner({"learner": "hybrid_linucb"}, context_dim=2, item_dim=3).n_features
8
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np

from contracts.params import ParamError
from services.bandits.base import BanditLearner
from services.bandits.epsilon import EpsilonGreedy
from services.bandits.hybrid import HybridLinUCB
from services.bandits.linear_thompson import LinearThompson
from services.bandits.linucb import LinUCB
from services.bandits.thompson import BetaThompson

LEARNERS: dict[str, type[BanditLearner]] = {
    cls.name: cls for cls in (LinUCB, HybridLinUCB, BetaThompson, LinearThompson, EpsilonGreedy)
}


def learner_class(name: str) -> type[BanditLearner]:
    """The learner class registered as ``name``; ValueError naming the known ones if none is."""
    if name not in LEARNERS:
        raise ValueError(f"unknown bandit learner {name!r}; known: {sorted(LEARNERS)}")
    return LEARNERS[name]


def new_learner(
    spec: Mapping[str, Any],
    *,
    context_dim: int,
    item_dim: int | None = None,
    seed: int | None = None,
) -> BanditLearner:
    """A fresh learner for a policy spec, sized for its features.

    ``context_dim`` is the width of the request context and ``item_dim`` that of
    the candidates' item features; a learner whose features include the item
    features needs ``item_dim`` (it has no default, because 0 would silently
    drop them). The spec may hold only the hyperparameters the class takes.
    """
    params = dict(spec)
    if "learner" not in params:
        raise ValueError(f"a policy spec names its learner ({{'learner': name, ...}}), got {spec}")
    cls = learner_class(str(params.pop("learner")))
    if cls.uses_item_features and item_dim is None:
        raise ValueError(f"{cls.name} needs item_dim: its features include the item features")
    sizes = cls.dimensions(context_dim, item_dim or 0)
    accepted = set(inspect.signature(cls).parameters) - set(sizes) - {"seed"}
    if unknown := set(params) - accepted:
        raise ValueError(f"{cls.name} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    return cls(**params, **sizes, seed=seed)


def learner_from_params(
    version: int,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    seed: int | None = None,
) -> BanditLearner:
    """The learner holding published parameters, its class named by ``meta["learner"]``.

    ``(version, header, arrays)`` is what the parameter store's ``latest`` returns
    (parts merged with the learner's ``merge``). Raises
    :class:`~contracts.params.ParamError` when they name no known learner or are
    not that learner's state.
    """
    where = f"model {header.get('model')!r} v{version}"
    name = header.get("meta", {}).get("learner")
    if name is None:
        raise ParamError(f"{where} names no bandit learner")
    if str(name) not in LEARNERS:
        raise ParamError(f"{where}: unknown bandit learner {name!r}; known: {sorted(LEARNERS)}")
    try:
        return LEARNERS[str(name)].from_state(arrays, seed=seed)
    except ValueError as exc:
        if isinstance(exc, ParamError):
            raise
        raise ParamError(f"{where}: {exc}") from None
