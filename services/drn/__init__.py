"""DRN: a dueling double DQN explored with Dueling Bandit Gradient Descent.

After Zheng et al., "DRN: A Deep Reinforcement Learning Framework for News
Recommendation" (WWW 2018). The pieces here are pure: arrays in, arrays out,
no Kafka and no Redis.

- :mod:`~services.drn.network` — the dueling Q-network, Q(s, a) = V(s) + A(s, a);
- :mod:`~services.drn.features` — state and action feature vectors;
- :mod:`~services.drn.dbgd` — Dueling Bandit Gradient Descent on weight dicts;
- :mod:`~services.drn.interleaving` — probabilistic and team-draft interleaving;
- :mod:`~services.drn.replay_buffer` — the fixed-capacity transition buffer;
- :mod:`~services.drn.learner` — :class:`DRNLearner`, which ties them together;
- :mod:`~services.drn.slates` — served slates' feedback, assembled and packed;
- :mod:`~services.drn.trainer` — :class:`~services.drn.trainer.DRNTrainer`, the
  training rules (DBGD verdicts, replay, major updates) over slates;
- :mod:`~services.drn.settings` — ``STREAMREC_DRN_*`` and what they build;
- :mod:`~services.drn.publish` — the format W and W̃ are published in.

The Kafka and Redis service around them is :mod:`services.drn.service`.
"""

from __future__ import annotations

from services.drn.dbgd import perturb, step_towards
from services.drn.features import (
    FeatureLayout,
    UserProfile,
    action_dim,
    action_feature_names,
    action_matrix,
    candidate_rows,
    lookup,
    state_dim,
    state_feature_names,
    state_vector,
    user_profile,
)
from services.drn.interleaving import (
    EXPLOIT,
    EXPLORE,
    InterleavedSlate,
    MarginalCredit,
    Team,
    Winner,
    credit,
    marginalized_credit,
    probabilistic_interleave,
    team_draft_interleave,
)
from services.drn.learner import DRNLearner
from services.drn.network import DuelingQNetwork
from services.drn.replay_buffer import ReplayBuffer, TransitionBatch

__all__ = [
    "EXPLOIT",
    "EXPLORE",
    "DRNLearner",
    "DuelingQNetwork",
    "FeatureLayout",
    "InterleavedSlate",
    "MarginalCredit",
    "ReplayBuffer",
    "Team",
    "TransitionBatch",
    "UserProfile",
    "Winner",
    "action_dim",
    "action_feature_names",
    "action_matrix",
    "candidate_rows",
    "credit",
    "lookup",
    "marginalized_credit",
    "perturb",
    "probabilistic_interleave",
    "state_dim",
    "state_feature_names",
    "state_vector",
    "step_towards",
    "team_draft_interleave",
    "user_profile",
]
