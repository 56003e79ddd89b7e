"""DRN as a serving policy: rank with W and W̃, merge by interleaving, log what was scored.

The DRN service publishes both networks as one ParamStore version in the
format of :mod:`services.drn.publish`: part ``main`` holds W's arrays under
``W/…`` and W̃'s under ``W_explore/…``, and its meta names the W̃ draw
(``explore_version``) and the feature layout the networks expect.
:func:`drn_builder` turns such a version into a :class:`DRNModel` for a
:class:`~services.paramstore.ParamWatcher`.

:class:`DRNPolicy` answers a :class:`~services.serving.policies.RankRequest` in
five steps:

1. features — the state (user + context) and one action row per candidate, by
   :func:`drn_features` from the request and its ``extras`` (below);
2. scores — Q under W and under W̃ (a numpy forward pass of the published
   weights; it agrees with the torch network to float32 rounding);
3. rankings — each network's candidates best first (ties broken at random);
4. merge — probabilistic interleaving (Hofmann et al. 2011, as in DRN), or
   team-draft interleaving, into a slate of ``k``;
5. log — the slate carries the team of every item, the **state vector as the
   impression context** and **each shown item's action vector as its
   features**, so the joiner hands the DRN service exactly what was scored.

Propensities: the logged propensity of the item in slot ``j`` is the exact
probability that the interleaving put *that item in that slot given the items
above it*, summed over both teams
(:attr:`~services.drn.interleaving.InterleavedSlate.item_probabilities`). For
the top slot this is the item's marginal probability of being shown first, and
the product over a slate is the exact probability of the whole shown list —
what top-slot replay and slate-level IPS estimators divide by. (The marginal
probability of appearing anywhere in the slate has no closed form under
probabilistic interleaving.)

Model version: a DRN slate logs the **W̃ draw number** (``explore_version``) as
its ``model_version``. It names exactly one (W, W̃) pair — every change of W
redraws W̃ — and it is part of the learner's checkpointed state, so the service
can tell a verdict about the current W̃ from a stale one deterministically, also
when it replays the log after a crash. (A ParamStore version number is assigned
only after a checkpoint and may differ between a crashed run and its replay.)

Request ``extras`` (all optional; missing ones fall back to context-only features):

============================  ==================================================
``"embeddings"``              mapping item id → embedding (d floats) for the
                              candidates and the history; default: the request's
                              ``item_features`` as the candidates' embeddings
``"history"``                 the user's clicks as ``(item_id, ts)`` pairs
                              (e.g. :class:`services.sequences.SequenceEntry`)
``"user_embedding"``          the user's interest vector in item space (d floats)
``"popularity"``              ``(n, W)`` clicks per candidate per layout window
``"published_at"``            ``(n,)`` candidate publish times (NaN = unknown)
============================  ==================================================

A user interest vector — from ``extras["user_embedding"]`` or, with
``interest_columns = m``, the first ``m`` request-context columns zero-padded to
``d`` (the simulator's context starts with the user's interests) — counts as a
click at request time: it joins the window means and the recent items that the
user-item similarity columns compare every candidate with.

>>> import numpy as np
>>> from services.drn import FeatureLayout
>>> layout = FeatureLayout(embedding_dim=3, n_context=4)
>>> policy = DRNPolicy(None, layout, hidden=(8,), interest_columns=3, seed=0)
>>> request = RankRequest(
...     user_id="u1", context=np.array([1.0, 0.0, 0.0, 1.0]), candidates=["a", "b", "c"],
...     candidate_labels=np.arange(3), item_features=np.eye(3), k=2, ts=1.7e9)
>>> slate = policy.rank(request, np.random.default_rng(0))
>>> len(slate.items), set(slate.teams) <= {"exploit", "explore"}, slate.model_version
(2, True, 0)
>>> len(slate.context) == layout.state_dim, len(slate.item_features[0]) == layout.action_dim
(True, True)
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, cast

import numpy as np
from numpy.typing import ArrayLike

from services.drn import (
    DuelingQNetwork,
    FeatureLayout,
    InterleavedSlate,
    action_matrix,
    lookup,
    probabilistic_interleave,
    state_vector,
    team_draft_interleave,
    user_profile,
)
from services.drn.publish import read_published
from services.serving.policies import RankedSlate, RankRequest

log = logging.getLogger(__name__)

Interleaving = Literal["probabilistic", "team_draft"]

_LAYER = re.compile(r"^(value|advantage)\.(fc(\d+)|out)\.(weight|bias)$")


class QScorer:
    """Q(s, a) = V(s) + A(s, a) of a dueling network, in numpy, from its named weights.

    The state is the same for every candidate of a request, so V(s) and the
    state's share of the advantage stream's first layer are computed once per
    request, not once per candidate. Matches
    :meth:`services.drn.DuelingQNetwork.score` to float32 rounding.

    >>> net = DuelingQNetwork(3, 2, hidden=(4,), seed=0)
    >>> state, actions = np.ones(3, np.float32), np.ones((5, 2), np.float32)
    >>> rows = np.hstack([np.tile(state, (5, 1)), actions])
    >>> bool(np.allclose(QScorer(net.weights(), 3).score(state, actions), net.score(rows)))
    True
    """

    def __init__(self, weights: Mapping[str, np.ndarray], state_dim: int) -> None:
        self.state_dim = int(state_dim)
        self._value = self._stream(weights, "value")
        self._advantage = self._stream(weights, "advantage")
        if self._value[0][0].shape[1] != self.state_dim:
            raise ValueError(
                f"value stream reads {self._value[0][0].shape[1]} inputs, "
                f"expected state_dim {self.state_dim}"
            )
        self.action_dim = self._advantage[0][0].shape[1] - self.state_dim
        if self.action_dim < 1:
            raise ValueError("advantage stream is not wider than the state")
        first = self._advantage[0][0]
        self._advantage_state = np.ascontiguousarray(first[:, : self.state_dim].T)
        self._advantage_action = np.ascontiguousarray(first[:, self.state_dim :].T)

    @staticmethod
    def _stream(
        weights: Mapping[str, np.ndarray], stream: str
    ) -> list[tuple[np.ndarray, np.ndarray]]:
        layers: dict[int, dict[str, np.ndarray]] = {}
        for name, array in weights.items():
            match = _LAYER.match(name)
            if match is None:
                raise ValueError(f"unexpected weight name {name!r}")
            if match.group(1) != stream:
                continue
            index = int(match.group(3)) if match.group(3) else 1_000_000
            layers.setdefault(index, {})[match.group(4)] = np.asarray(array, dtype=np.float32)
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for index in sorted(layers):
            layer = layers[index]
            if set(layer) != {"weight", "bias"}:
                raise ValueError(f"{stream} layer {index} needs a weight and a bias")
            weight, bias = layer["weight"], layer["bias"]
            if weight.ndim != 2 or bias.shape != (weight.shape[0],):
                raise ValueError(f"{stream} layer {index}: shapes {weight.shape}, {bias.shape}")
            if out and out[-1][0].shape[0] != weight.shape[1]:
                raise ValueError(f"{stream} layer {index} does not fit the layer before it")
            out.append((weight, bias))
        if len(out) < 2 or out[-1][0].shape[0] != 1:
            raise ValueError(f"{stream} stream needs hidden layers and a 1-wide output layer")
        return out

    @staticmethod
    def _tail(layers: list[tuple[np.ndarray, np.ndarray]], hidden: np.ndarray) -> np.ndarray:
        for weight, bias in layers[1:]:
            hidden = np.maximum(hidden, 0.0) @ weight.T + bias
        return hidden[:, 0]

    def score(self, state: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """Q-values ``(n,)`` float32 of ``n`` action rows ``(n, action_dim)`` in one state."""
        state = np.asarray(state, dtype=np.float32).reshape(1, -1)
        actions = np.asarray(actions, dtype=np.float32)
        if state.shape[1] != self.state_dim or actions.ndim != 2:
            raise ValueError(f"state must have {self.state_dim} values and actions be 2-D")
        if actions.shape[1] != self.action_dim:
            raise ValueError(f"actions must have {self.action_dim} columns, got {actions.shape}")
        value_weight, value_bias = self._value[0]
        value = self._tail(self._value, state @ value_weight.T + value_bias)
        base = state @ self._advantage_state + self._advantage[0][1]
        advantage = self._tail(self._advantage, actions @ self._advantage_action + base)
        return (advantage + value).astype(np.float32)


@dataclass(frozen=True, eq=False)
class DRNModel:
    """What serving ranks with: W and W̃ of one published version.

    ``explore_version`` is the W̃ draw (logged as the slate's ``model_version``);
    ``store_version`` the ParamStore version it came from (0 if none).
    """

    explore_version: int
    online: QScorer
    explore: QScorer
    layout: FeatureLayout | None = None
    store_version: int = 0

    @classmethod
    def from_weights(
        cls,
        online: Mapping[str, np.ndarray],
        explore: Mapping[str, np.ndarray],
        state_dim: int,
        *,
        explore_version: int,
        layout: FeatureLayout | None = None,
        store_version: int = 0,
    ) -> DRNModel:
        """A model from W's and W̃'s named arrays (as ``DRNLearner.weights()`` gives them)."""
        return cls(
            explore_version=int(explore_version),
            online=QScorer(online, state_dim),
            explore=QScorer(explore, state_dim),
            layout=layout,
            store_version=int(store_version),
        )

    @property
    def state_dim(self) -> int:
        return self.online.state_dim

    @property
    def action_dim(self) -> int:
        return self.online.action_dim


def model_from_published(
    version: int, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> DRNModel:
    """A :class:`DRNModel` from a ParamStore version (``ValueError`` if it is not DRN's)."""
    published = read_published(version, header, arrays)
    return DRNModel.from_weights(
        published.online,
        published.explore,
        published.state_dim,
        explore_version=published.explore_version,
        layout=published.layout,
        store_version=version,
    )


def drn_builder(layout: FeatureLayout) -> Any:
    """A ParamWatcher ``build=`` that refuses versions trained for another feature layout."""

    def build(version: int, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> DRNModel:
        model = model_from_published(version, header, arrays)
        if model.layout is not None and model.layout != layout:
            raise ValueError(
                f"version {version} was trained for layout {model.layout.to_meta()}, "
                f"serving uses {layout.to_meta()}"
            )
        if (model.state_dim, model.action_dim) != (layout.state_dim, layout.action_dim):
            raise ValueError(
                f"version {version} has dims {(model.state_dim, model.action_dim)}, "
                f"layout needs {(layout.state_dim, layout.action_dim)}"
            )
        return model

    return build


def prior_model(layout: FeatureLayout, hidden: Sequence[int], seed: int) -> DRNModel:
    """An untrained network, W̃ = W, explore_version 0: what serves before the first version."""
    net = DuelingQNetwork(layout.state_dim, layout.action_dim, hidden, seed=seed)
    weights = net.weights()
    return DRNModel.from_weights(weights, weights, layout.state_dim, explore_version=0)


def _interest(vector: ArrayLike, dim: int) -> np.ndarray:
    values = np.asarray(vector, dtype=np.float64).reshape(-1)
    if values.shape[0] > dim:
        raise ValueError(f"user interest vector has {values.shape[0]} values, embedding_dim {dim}")
    out = np.zeros(dim)
    out[: values.shape[0]] = values
    return out


def drn_features(
    layout: FeatureLayout,
    *,
    now: float,
    item_vectors: ArrayLike,
    item_known: ArrayLike | None = None,
    context: ArrayLike | None = None,
    interest: ArrayLike | None = None,
    history_vectors: ArrayLike | None = None,
    history_times: ArrayLike | None = None,
    history_known: ArrayLike | None = None,
    popularity: ArrayLike | None = None,
    published_at: ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The state ``(state_dim,)`` and action rows ``(n, action_dim)`` of one request.

    ``interest`` (d floats, or fewer, zero-padded) joins the history as a click
    at ``now`` (see the module docstring); everything else is passed to
    :mod:`services.drn.features`.
    """
    d = layout.embedding_dim
    vectors = (
        np.zeros((0, d))
        if history_vectors is None
        else np.asarray(history_vectors, dtype=np.float64).reshape(-1, d)
    )
    times = np.zeros(0) if history_times is None else np.asarray(history_times, dtype=np.float64)
    known = np.ones(len(vectors), dtype=bool) if history_known is None else history_known
    known = np.asarray(known, dtype=bool)
    if interest is not None:
        vectors = np.vstack([vectors, _interest(interest, d)])
        times = np.append(times, now)
        known = np.append(known, True)
    profile = user_profile(layout, vectors, times, now=now, known=known)
    state = state_vector(layout, profile, context=context)
    actions = action_matrix(
        layout,
        profile,
        item_vectors,
        known=item_known,
        popularity=popularity,
        published_at=published_at,
    )
    return state, actions


class ModelSource(Protocol):
    """Where the policy gets its model: a ParamWatcher, or an in-process learner."""

    @property
    def version(self) -> int | None: ...

    def current(self) -> tuple[int, DRNModel]: ...


def ranking(scores: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Indices best first; equal scores in random order.

    >>> ranking(np.array([0.1, 0.9, 0.5]), np.random.default_rng(0))
    [1, 2, 0]
    """
    return np.lexsort((rng.random(len(scores)), -np.asarray(scores))).tolist()


class DRNPolicy:
    """Ranks with W and W̃ and interleaves them; see the module docstring.

    Args:
        source: the published model (a :class:`~services.paramstore.ParamWatcher`
            built with :func:`drn_builder`), or ``None`` to serve the prior only.
        layout: the feature layout; the published model must have been trained for it.
        interleaving: ``"probabilistic"`` (DRN's choice) or ``"team_draft"``.
        tau: rank-softmax sharpness of probabilistic interleaving.
        interest_columns: leading context columns that are the user's interest
            vector in item space (0 = none).
        hidden: hidden widths of the prior network (before the first version).
        seed: seeds the prior network.
        name: the policy name logged with every impression.
    """

    def __init__(
        self,
        source: ModelSource | None,
        layout: FeatureLayout,
        *,
        interleaving: Interleaving = "probabilistic",
        tau: float = 3.0,
        interest_columns: int = 0,
        hidden: Sequence[int] = (64, 32),
        seed: int = 0,
        name: str = "drn",
    ) -> None:
        if interleaving not in ("probabilistic", "team_draft"):
            raise ValueError(
                f"interleaving must be 'probabilistic' or 'team_draft', got {interleaving!r}"
            )
        if not np.isfinite(tau) or tau <= 0:
            raise ValueError(f"tau must be a finite number > 0, got {tau}")
        if not 0 <= interest_columns <= layout.embedding_dim:
            raise ValueError(
                f"interest_columns must lie in [0, {layout.embedding_dim}], got {interest_columns}"
            )
        if interest_columns > layout.n_context:
            raise ValueError(
                f"interest_columns ({interest_columns}) exceeds the context width "
                f"({layout.n_context})"
            )
        self.name = name
        self.source = source
        self.layout = layout
        self.interleaving = interleaving
        self.tau = float(tau)
        self.interest_columns = int(interest_columns)
        self.prior = prior_model(layout, hidden, seed)

    def model(self) -> DRNModel:
        """The model now serving (the prior before the first published version)."""
        if self.source is not None and self.source.version is not None:
            return self.source.current()[1]
        return self.prior

    def features(self, request: RankRequest) -> tuple[np.ndarray, np.ndarray]:
        """The state and action rows the request is scored with (see the module docstring)."""
        layout, extras = self.layout, request.extras
        context = np.asarray(request.context, dtype=np.float64).reshape(-1)
        if layout.n_context and context.shape[0] != layout.n_context:
            raise ValueError(
                f"request context has {context.shape[0]} values, the DRN layout expects "
                f"{layout.n_context}"
            )
        embeddings = extras.get("embeddings")
        if isinstance(embeddings, Mapping):
            items, item_known = lookup(embeddings, list(request.candidates), layout.embedding_dim)
        else:
            items = np.asarray(request.item_features, dtype=np.float64)
            item_known = None
            if items.ndim != 2 or items.shape[1] != layout.embedding_dim:
                raise ValueError(
                    f"item_features have shape {items.shape}; without extras['embeddings'] "
                    f"they must be ({len(request.candidates)}, {layout.embedding_dim})"
                )
        interest = extras.get("user_embedding")
        if interest is None and self.interest_columns:
            interest = context[: self.interest_columns]
        history_vectors = history_times = history_known = None
        history = cast(Sequence[Sequence[Any]], extras.get("history") or ())
        if history and isinstance(embeddings, Mapping):
            ids: list[Hashable] = [entry[0] for entry in history]
            history_vectors, history_known = lookup(embeddings, ids, layout.embedding_dim)
            history_times = np.array([float(entry[1]) for entry in history])
        return drn_features(
            layout,
            now=request.ts if request.ts > 0 else time.time(),
            item_vectors=items,
            item_known=item_known,
            context=context if layout.n_context else None,
            interest=interest,  # type: ignore[arg-type]
            history_vectors=history_vectors,
            history_times=history_times,
            history_known=history_known,
            popularity=extras.get("popularity"),  # type: ignore[arg-type]
            published_at=extras.get("published_at"),  # type: ignore[arg-type]
        )

    def interleave(
        self, exploit: Sequence[int], explore: Sequence[int], k: int, rng: np.random.Generator
    ) -> InterleavedSlate:
        """Merge two rankings into a slate of ``k`` with the configured interleaving."""
        if self.interleaving == "team_draft":
            return team_draft_interleave(exploit, explore, k, rng)
        return probabilistic_interleave(exploit, explore, k, rng, tau=self.tau)

    def rank(self, request: RankRequest, rng: np.random.Generator) -> RankedSlate:
        """An interleaved slate of W's and W̃'s rankings, with teams, propensities and features."""
        if not request.candidates:
            raise ValueError("no candidates to build a slate from")
        model = self.model()
        state, actions = self.features(request)
        exploit = ranking(model.online.score(state, actions), rng)
        explore = ranking(model.explore.score(state, actions), rng)
        slate = self.interleave(exploit, explore, request.k, rng)
        shown = [cast(int, i) for i in slate.items]  # the rankings hold candidate indices
        return RankedSlate(
            items=[request.candidates[i] for i in shown],
            propensities=list(slate.item_probabilities),
            model_version=model.explore_version,
            teams=list(slate.teams),
            context=state.tolist(),
            item_features=actions[shown].tolist(),
        )

    def close(self) -> None:
        """Stop the model source's background reloads, if it has any."""
        close = getattr(self.source, "close", None)
        if close is not None:
            close()
