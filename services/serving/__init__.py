"""Serving: candidates, ranking policies, slates with exact propensities, logged impressions.

- :mod:`~services.serving.recommender`: :class:`Recommender`, the library —
  user → candidates (faiss neighbours of the user's recent items, fresh,
  popular, random fill) → features → the user's policy → slate → one
  Impression to Kafka → answer; the popular and fresh lists and the item
  catalog come from :mod:`services.catalog`;
- :mod:`~services.serving.api`: the HTTP API (``streamrec run serving``);
- :mod:`~services.serving.policies`: the ranking-policy interface, the random
  and bandit policies and the traffic router;
- :mod:`~services.serving.slate`: top-k with epsilon exploration and exact
  marginal propensities.
"""

from __future__ import annotations

from services.serving.policies import (
    BanditPolicy,
    PolicyRouter,
    RandomPolicy,
    RankedSlate,
    RankingPolicy,
    RankRequest,
)
from services.serving.recommender import (
    BadRequest,
    ImpressionNotLogged,
    KafkaImpressionLog,
    NoCandidates,
    Recommendation,
    Recommender,
    RecommenderConfig,
    impression_for,
)
from services.serving.slate import Slate, build_slate

__all__ = [
    "BadRequest",
    "BanditPolicy",
    "ImpressionNotLogged",
    "KafkaImpressionLog",
    "NoCandidates",
    "PolicyRouter",
    "RandomPolicy",
    "RankRequest",
    "RankedSlate",
    "RankingPolicy",
    "Recommendation",
    "Recommender",
    "RecommenderConfig",
    "Slate",
    "build_slate",
    "impression_for",
]
