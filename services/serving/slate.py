"""Slates with exploration and exact propensities.

With probability ``epsilon`` a slate is a uniformly random ``k`` of the ``n``
candidates; otherwise it is the policy's top ``k`` (random tie-breaking). The
propensity logged for a shown item is its exact marginal probability of being
in the slate: ``(1 - epsilon) * P(in top k) + epsilon * k / n``, where
``P(in top k)`` is 1 above the k-th best score, 0 below it, and for the ``t``
candidates tied at the k-th score, the ``s`` top-k places left for them
divided by ``t``. A policy whose scores are themselves random (Thompson
sampling) passes its own top-k probabilities instead (``inclusion``, estimated
from posterior draws: :meth:`services.bandits.BanditLearner.inclusion`), since
the sampled scores of one call do not give them. Offline IPS/replay estimators
divide by it.

>>> import numpy as np
>>> slate = build_slate(np.array([0.1, 0.9, 0.5, 0.2]), k=2, epsilon=0.0,
...                     rng=np.random.default_rng(0))
>>> slate.indices.tolist(), slate.propensities.tolist()
([1, 2], [1.0, 1.0])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.bandits import greedy_inclusion, top_k


@dataclass(frozen=True, slots=True)
class Slate:
    #: Indices into the candidate list, in display order.
    indices: np.ndarray
    #: Marginal probability of each shown candidate being shown.
    propensities: np.ndarray
    explored: bool


def build_slate(
    scores: np.ndarray,
    k: int,
    epsilon: float,
    rng: np.random.Generator,
    inclusion: np.ndarray | None = None,
) -> Slate:
    """Pick ``k`` of ``len(scores)`` candidates, epsilon-uniform over the policy's top k.

    ``inclusion``: each candidate's probability of being in the policy's top k
    (default: exact from ``scores``, random tie-breaking).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    n = len(scores)
    k = min(k, n)
    if k <= 0:
        raise ValueError("no candidates to build a slate from")
    greedy = top_k(scores, k, rng)
    explored = bool(rng.random() < epsilon)
    indices = rng.choice(n, size=k, replace=False) if explored else greedy
    if inclusion is None:
        inclusion = greedy_inclusion(scores, k)
    propensities = (1.0 - epsilon) * inclusion[indices] + epsilon * k / n
    return Slate(indices=indices, propensities=propensities, explored=explored)
