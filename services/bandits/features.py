"""The feature matrix ``X`` a policy scores and learns with, built the same way everywhere.

Serving (scoring candidates) and the bandits service (learning from feedback)
both call :func:`policy_features`, so a model never sees features built one way
and scored another.

* Disjoint learners (``linucb``, ``ts_linear``) and the feature-free ones use the
  request context: every candidate row is the context vector.
* ``hybrid_linucb`` uses ``[context, vec(context ⊗ item_features)]``: per-arm
  features are the context; the shared features are the outer product of user
  context and item features, as in Li et al. (2010).

>>> import numpy as np
>>> policy_features("hybrid_linucb", np.array([1.0, 2.0]), np.array([[1.0], [0.5]]))
array([[1. , 2. , 1. , 2. ],
       [1. , 2. , 0.5, 1. ]])
"""

from __future__ import annotations

import numpy as np


def feature_dim(learner: str, context_dim: int, item_dim: int) -> int:
    """Width of ``X`` for a learner given the context and item feature widths."""
    if learner == "hybrid_linucb":
        return context_dim + context_dim * item_dim
    return context_dim


def shared_dim(learner: str, context_dim: int, item_dim: int) -> int:
    """Number of shared columns of ``X`` (hybrid LinUCB only)."""
    return context_dim * item_dim if learner == "hybrid_linucb" else 0


def policy_features(
    learner: str, context: np.ndarray, item_features: np.ndarray | None
) -> np.ndarray:
    """``X`` for candidates: ``context`` is (c,) for all rows or (n, c) per row.

    ``item_features`` is (n, f); it decides the number of rows. For learners
    that only use the context, pass ``item_features`` or use ``np.empty((n, 0))``.
    """
    items = np.asarray(item_features, dtype=np.float64)
    n = len(items)
    ctx = np.asarray(context, dtype=np.float64)
    rows = np.broadcast_to(ctx, (n, ctx.shape[-1])) if ctx.ndim == 1 else ctx
    if learner != "hybrid_linucb":
        return np.array(rows, dtype=np.float64)
    outer = rows[:, :, None] * items[:, None, :]
    return np.concatenate([rows, outer.reshape(n, -1)], axis=1)
