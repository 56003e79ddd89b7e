"""Bandit learners for streamrec: pure numpy, batch-first, no Kafka or Redis.

Every learner scores candidate rows (``score``), picks the best ones with random
tie-breaking (``select``), learns from batched rewards (``update``) and exports
its additive sufficient statistics as named arrays (``state``/``from_state``),
which ``merge`` sums across Kafka partitions.
"""

from __future__ import annotations

from services.bandits._kernels import greedy_inclusion, top_k
from services.bandits.base import BanditLearner
from services.bandits.epsilon import EpsilonGreedy
from services.bandits.factory import LEARNERS, learner_class, learner_from_params, new_learner
from services.bandits.hybrid import HybridLinUCB
from services.bandits.linear_thompson import LinearThompson
from services.bandits.linucb import LinUCB
from services.bandits.thompson import BetaThompson

__all__ = [
    "LEARNERS",
    "BanditLearner",
    "BetaThompson",
    "EpsilonGreedy",
    "HybridLinUCB",
    "LinUCB",
    "LinearThompson",
    "greedy_inclusion",
    "learner_class",
    "learner_from_params",
    "new_learner",
    "top_k",
]
