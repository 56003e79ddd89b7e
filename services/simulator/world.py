"""A synthetic catalog and user population whose click probabilities are known exactly.

The world is the ground truth that every evaluation in streamrec measures against:
the Kafka-driving simulator asks it who arrives and what they click, the in-process
online evaluation computes regret from it, and the tests check learners and
estimators against it. It is pure numpy, seeded, and does no I/O.

Users and items live in a ``latent_dim``-dimensional space. Both are unit vectors
drawn around ``n_topics`` random topic centres, so the population has structure
(a topic's users like that topic's items) rather than being isotropic noise.

Click model (product form, positions independent)::

    p(click | u, i, pos, t) = posbias(pos) * sigmoid(logit(u, i, t))
    posbias(pos)            = 1 / (1 + pos) ** position_decay
    z                       = <u(t), v_i>                      (in [-1, 1])

    linear:     logit = c + s * z + b_i
    nonlinear:  logit = c + s * exp(-((z - rho) / w) ** 2) + b_i
                          + tau * cos(2 * pi * (h(t) - phi_i))

``s`` is ``affinity_scale``, ``b_i ~ N(0, popularity_skew**2)`` an item's popularity,
and ``c`` is calibrated at construction so that a uniformly random slate of
uniformly random users has a click-through rate of ``base_ctr`` (at step 0;
drift and the time of day move it a little). The nonlinear
scenario is a *novelty* effect: users engage most with items of moderate
similarity ``rho`` (``novelty_peak``, width ``w`` = ``novelty_width``), neither what
they already know (z near 1) nor the unrelated (z near 0) -- a non-monotone
function of the user that a per-item linear model cannot express -- plus a
time-of-day effect: item ``i`` peaks at phase ``phi_i`` of a simulated day of
``day_length`` requests (``h(t)`` is the phase of step ``t``), with strength ``tau``
(``time_of_day_effect``).

Observable features (what a learner sees; the latent vectors stay hidden):

* request context: ``[u(t) + N(0, context_noise**2), (nonlinear: cos 2*pi*h,
  sin 2*pi*h), distractors ~ N(0, 1/latent_dim), 1]`` -- the user's interests,
  the time of day, ``extra_context`` pure-noise columns and a bias, so disjoint
  LinUCB with ``x = context`` can learn the linear scenario;
* item features: ``[v_i + N(0, item_feature_noise**2), (nonlinear: cos 2*pi*phi_i,
  sin 2*pi*phi_i)]``, drawn once when the item is born.

Time moves one step per :meth:`World.request`; everything else (probabilities,
best slates, relevant items, sessions) is evaluated at the step of the latest
request. Interest drift is deterministic in time: each user's vector rotates in
the plane spanned by its home topic and a second topic,
``u(t) = cos(omega_u t) a_u + sin(omega_u t) b_u``, at ``drift`` radians per 1,000
requests times a per-user factor in [0.5, 1.5], so it never depends on who was
asked what. New items are born (Poisson, ``item_birth_rate`` per request) from
the same topic mixture and live items retire (``item_retire_rate`` per request);
ids are never reused.

Ids are strings: users ``"u<n>"``, items ``"i<n>"``; :func:`item_label` maps an item
id to the int64 label the bandit learners key their arms by.

>>> world = World(WorldConfig(n_users=50, n_items=40, n_candidates=10), seed=7)
>>> req = world.request()
>>> req.user_id.startswith("u"), len(req.candidates), req.context.shape
(True, 10, (9,))
>>> probs = world.click_probabilities(req.user_id, req.candidates[:5])
>>> bool(world.best_slate_value(req.user_id, req.candidates) >= probs.sum())
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Scenario = Literal["linear", "nonlinear"]
SCENARIOS: tuple[Scenario, ...] = ("linear", "nonlinear")

#: Drift (radians per 1,000 requests) used when ``WorldConfig.drift`` is left unset.
DEFAULT_DRIFT: dict[Scenario, float] = {"linear": 0.0, "nonlinear": 0.05}


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Size, click model and dynamics of a :class:`World`; validated on construction.

    ``drift`` left as ``None`` is resolved to the scenario's ``DEFAULT_DRIFT``.

    >>> WorldConfig().context_dim, WorldConfig(scenario="nonlinear").context_dim
    (9, 11)
    >>> WorldConfig(slate_size=0)
    Traceback (most recent call last):
    ...
    ValueError: slate_size must be >= 1, got 0
    """

    n_users: int = 2000
    #: Initial live catalog size.
    n_items: int = 300
    latent_dim: int = 8
    #: Pure-noise columns added to the request context (irrelevant features).
    extra_context: int = 0
    n_topics: int = 8
    #: Spread of users and items around their topic centre (norm of the offset).
    topic_spread: float = 0.6
    #: Click-through rate of a uniformly random slate, per shown item.
    base_ctr: float = 0.05
    affinity_scale: float = 4.0
    #: Standard deviation of the items' popularity logit offsets.
    popularity_skew: float = 0.5
    slate_size: int = 5
    #: Candidates offered per request, sampled from the live catalog (all if fewer).
    n_candidates: int = 50
    position_decay: float = 0.5
    context_noise: float = 0.05
    item_feature_noise: float = 0.05
    #: Angular speed of users' interests, radians per 1,000 requests; 0 is stationary.
    drift: float | None = None
    #: Expected new items per request.
    item_birth_rate: float = 0.0
    #: Expected retirements per request (the live catalog never drops below slate_size).
    item_retire_rate: float = 0.0
    scenario: Scenario = "linear"
    novelty_peak: float = 0.45
    novelty_width: float = 0.2
    time_of_day_effect: float = 1.0
    #: Requests per simulated day (the period of the time-of-day effect).
    day_length: int = 5000
    #: Simulated clock: request ``step`` happens at ``start_time + step * step_seconds``.
    start_time: float = 1_700_000_000.0
    step_seconds: float = 0.01

    def __post_init__(self) -> None:
        if self.scenario not in SCENARIOS:
            raise ValueError(f"scenario must be one of {SCENARIOS}, got {self.scenario!r}")
        for name in ("n_users", "n_items", "latent_dim", "n_topics", "slate_size", "day_length"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.extra_context < 0:
            raise ValueError(f"extra_context must be >= 0, got {self.extra_context}")
        if self.n_candidates < self.slate_size:
            raise ValueError(
                f"n_candidates ({self.n_candidates}) must be >= slate_size ({self.slate_size})"
            )
        if self.n_items < self.slate_size:
            raise ValueError(f"n_items ({self.n_items}) must be >= slate_size ({self.slate_size})")
        for name in (
            "topic_spread",
            "affinity_scale",
            "popularity_skew",
            "position_decay",
            "context_noise",
            "item_feature_noise",
            "item_birth_rate",
            "item_retire_rate",
            "time_of_day_effect",
            "step_seconds",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")
        if not 0.0 < self.novelty_width:
            raise ValueError(f"novelty_width must be > 0, got {self.novelty_width}")
        mean_bias = float(np.mean(position_bias(np.arange(self.slate_size), self.position_decay)))
        if not 0.0 < self.base_ctr < mean_bias:
            raise ValueError(
                f"base_ctr must be in (0, {mean_bias:.4f}) (the mean position bias of a "
                f"slate of {self.slate_size}), got {self.base_ctr}"
            )
        if self.drift is None:
            object.__setattr__(self, "drift", DEFAULT_DRIFT[self.scenario])
        elif not (math.isfinite(self.drift) and self.drift >= 0.0):
            raise ValueError(f"drift must be finite and >= 0, got {self.drift}")

    @property
    def context_dim(self) -> int:
        """Width of the request context: interests, (time of day,) noise columns, bias."""
        time_columns = 2 if self.scenario == "nonlinear" else 0
        return self.latent_dim + time_columns + self.extra_context + 1

    @property
    def item_dim(self) -> int:
        """Width of an item's observable feature vector."""
        return self.latent_dim + (2 if self.scenario == "nonlinear" else 0)


def position_bias(positions: np.ndarray, decay: float) -> np.ndarray:
    """Examination probability of each 0-based position: ``1 / (1 + pos) ** decay``.

    >>> position_bias(np.arange(3), 1.0).tolist()
    [1.0, 0.5, 0.3333333333333333]
    """
    return 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** decay


@dataclass(frozen=True, eq=False)
class Request:
    """One recommendation request: who asks, what they look like, what may be shown."""

    user_id: str
    #: Observable context, shape ``(context_dim,)``; the last entry is the bias 1.
    context: np.ndarray
    candidates: list[str]
    #: :func:`item_label` of each candidate, int64.
    candidate_labels: np.ndarray
    #: 1-based index of the request; the world's clock.
    step: int
    #: Simulated event time in seconds since the Unix epoch.
    ts: float
    #: Phase of the simulated day in [0, 1).
    time_of_day: float


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


class World:
    """Users, a live catalog and their true click probabilities; see the module doc.

    Independent random streams (all derived from ``seed``) drive construction,
    the request sequence, the catalog's births and retirements, clicks and
    sessions, so drawing clicks or sessions never changes which requests follow.
    """

    def __init__(self, config: WorldConfig | None = None, *, seed: int = 0) -> None:
        self.config = config or WorldConfig()
        cfg = self.config
        streams = np.random.SeedSequence(seed).spawn(5)
        init, self._request_rng, self._catalog_rng, self._click_rng, self._session_rng = (
            np.random.default_rng(s) for s in streams
        )
        d = cfg.latent_dim
        self._topics = _normalise(init.standard_normal((cfg.n_topics, d)))
        self._step = 0
        self._posbias = position_bias(np.arange(max(cfg.n_candidates, 100)), cfg.position_decay)

        home = init.integers(cfg.n_topics, size=cfg.n_users)
        self._home = self._around_topics(home, init)
        other = (home + init.integers(1, max(cfg.n_topics, 2), size=cfg.n_users)) % cfg.n_topics
        towards = self._topics[other] + 0.1 * init.standard_normal((cfg.n_users, d))
        towards -= np.sum(towards * self._home, axis=1, keepdims=True) * self._home
        self._away = _normalise(towards)
        self._omega = (cfg.drift or 0.0) / 1000.0 * init.uniform(0.5, 1.5, size=cfg.n_users)

        capacity = max(16, 2 * cfg.n_items)
        self._v = np.empty((capacity, d))
        self._features = np.empty((capacity, cfg.item_dim))
        self._popularity = np.empty(capacity)
        self._phase = np.empty(capacity)
        self._alive = np.zeros(capacity, dtype=bool)
        self._ids: list[str] = []
        self._index: dict[str, int] = {}
        self._add_items(cfg.n_items, init)
        self._offset = self._calibrate(init)

    # ----------------------------------------------------------------- construction

    def _around_topics(self, topics: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        d = self.config.latent_dim
        noise = rng.standard_normal((len(topics), d)) * (self.config.topic_spread / math.sqrt(d))
        return _normalise(self._topics[topics] + noise)

    def _add_items(self, n: int, rng: np.random.Generator) -> None:
        cfg = self.config
        start = len(self._ids)
        if start + n > len(self._alive):
            capacity = max(2 * len(self._alive), start + n)
            for name in ("_v", "_features", "_popularity", "_phase", "_alive"):
                old = getattr(self, name)
                new = np.zeros((capacity, *old.shape[1:]), dtype=old.dtype)
                new[:start] = old[:start]
                setattr(self, name, new)
        rows = slice(start, start + n)
        v = self._around_topics(rng.integers(cfg.n_topics, size=n), rng)
        phase = rng.uniform(size=n)
        self._v[rows] = v
        self._features[rows, : cfg.latent_dim] = v + cfg.item_feature_noise * rng.standard_normal(
            v.shape
        )
        if cfg.scenario == "nonlinear":
            self._features[rows, cfg.latent_dim] = np.cos(2 * np.pi * phase)
            self._features[rows, cfg.latent_dim + 1] = np.sin(2 * np.pi * phase)
        self._popularity[rows] = cfg.popularity_skew * rng.standard_normal(n)
        self._phase[rows] = phase
        self._alive[rows] = True
        for k in range(start, start + n):
            self._ids.append(f"i{k}")
            self._index[f"i{k}"] = k
        self._live = np.flatnonzero(self._alive[: len(self._ids)])

    def _calibrate(self, rng: np.random.Generator, n_pairs: int = 20_000) -> float:
        """The logit offset ``c`` at which a random slate's CTR is ``base_ctr``.

        Monte Carlo over random (user, item, time of day) triples, then bisection:
        the mean attractiveness is increasing in ``c``.
        """
        cfg = self.config
        users = rng.integers(cfg.n_users, size=n_pairs)
        items = rng.choice(self._live, size=n_pairs)
        z = np.sum(self._home[users] * self._v[items], axis=1)
        phase = rng.uniform(size=n_pairs)
        shape = self._shape(z, items, phase)
        target = cfg.base_ctr / float(np.mean(self._posbias[: cfg.slate_size]))
        low, high = -40.0, 40.0
        for _ in range(80):
            mid = 0.5 * (low + high)
            if float(np.mean(_sigmoid(mid + shape))) < target:
                low = mid
            else:
                high = mid
        return 0.5 * (low + high)

    def _shape(self, z: np.ndarray, items: np.ndarray, day_phase: float | np.ndarray) -> np.ndarray:
        """The logit without the calibrated offset ``c``."""
        cfg = self.config
        if cfg.scenario == "linear":
            return cfg.affinity_scale * z + self._popularity[items]
        novelty = np.exp(-(((z - cfg.novelty_peak) / cfg.novelty_width) ** 2))
        daily = np.cos(2 * np.pi * (day_phase - self._phase[items]))
        return (
            cfg.affinity_scale * novelty + self._popularity[items] + cfg.time_of_day_effect * daily
        )

    # ----------------------------------------------------------------- state

    @property
    def step(self) -> int:
        """Number of requests so far; probabilities are evaluated at this step."""
        return self._step

    @property
    def time_of_day(self) -> float:
        """Phase of the simulated day at the current step, in [0, 1)."""
        return (self._step % self.config.day_length) / self.config.day_length

    @property
    def context_dim(self) -> int:
        """Width of :attr:`Request.context`."""
        return self.config.context_dim

    @property
    def item_dim(self) -> int:
        """Width of :meth:`item_features` rows."""
        return self.config.item_dim

    def catalog(self) -> list[str]:
        """Ids of the live items, oldest first."""
        return [self._ids[k] for k in self._live]

    def user_ids(self) -> list[str]:
        """All user ids."""
        return [f"u{n}" for n in range(self.config.n_users)]

    def _user(self, user_id: str) -> int:
        digits = user_id[1:]
        if user_id.startswith("u") and digits.isdigit() and int(digits) < self.config.n_users:
            return int(digits)
        raise ValueError(f"unknown user id {user_id!r}")

    def _items(self, item_ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter(
                (self._index[i] for i in item_ids), dtype=np.int64, count=len(item_ids)
            )
        except KeyError as exc:
            raise ValueError(f"unknown item id {exc.args[0]!r}") from None

    def _user_vector(self, user: int) -> np.ndarray:
        angle = self._omega[user] * self._step
        if angle == 0.0:
            return self._home[user]
        return math.cos(angle) * self._home[user] + math.sin(angle) * self._away[user]

    # ----------------------------------------------------------------- dynamics

    def advance(self, n_steps: int = 1) -> None:
        """Move the clock ``n_steps`` requests forward without drawing requests.

        Items are born and retired as if that many requests had been served.
        """
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        cfg = self.config
        self._step += n_steps
        if cfg.item_birth_rate > 0.0:
            born = int(self._catalog_rng.poisson(cfg.item_birth_rate * n_steps))
            if born:
                self._add_items(born, self._catalog_rng)
        if cfg.item_retire_rate > 0.0:
            retiring = int(self._catalog_rng.poisson(cfg.item_retire_rate * n_steps))
            retiring = min(retiring, len(self._live) - cfg.slate_size)
            if retiring > 0:
                gone = self._catalog_rng.choice(self._live, size=retiring, replace=False)
                self._alive[gone] = False
                self._live = np.flatnonzero(self._alive[: len(self._ids)])

    def request(self) -> Request:
        """Advance the clock one step and draw the next request.

        The user is uniform over the population; the candidates are a uniform
        sample without replacement of ``n_candidates`` live items, in random order.
        """
        self.advance(1)
        cfg = self.config
        rng = self._request_rng
        user = int(rng.integers(cfg.n_users))
        size = min(cfg.n_candidates, len(self._live))
        chosen = rng.choice(self._live, size=size, replace=False)
        context = np.empty(self.context_dim)
        d = cfg.latent_dim
        context[:d] = self._user_vector(user) + cfg.context_noise * rng.standard_normal(d)
        column = d
        if cfg.scenario == "nonlinear":
            angle = 2 * np.pi * self.time_of_day
            context[column : column + 2] = (math.cos(angle), math.sin(angle))
            column += 2
        extra = self.context_dim - 1 - column
        if extra:
            context[column:-1] = rng.standard_normal(extra) / math.sqrt(d)
        context[-1] = 1.0
        return Request(
            user_id=f"u{user}",
            context=context,
            candidates=[self._ids[k] for k in chosen],
            candidate_labels=chosen.astype(np.int64),
            step=self._step,
            ts=cfg.start_time + self._step * cfg.step_seconds,
            time_of_day=self.time_of_day,
        )

    # ----------------------------------------------------------------- ground truth

    def item_features(self, item_ids: Sequence[str]) -> np.ndarray:
        """Observable features of the items, shape ``(len(item_ids), item_dim)``."""
        return self._features[self._items(item_ids)].copy()

    def _attractiveness(self, user: int, items: np.ndarray) -> np.ndarray:
        z = self._v[items] @ self._user_vector(user)
        return _sigmoid(self._offset + self._shape(z, items, self.time_of_day))

    def attractiveness(self, user_id: str, item_ids: Sequence[str]) -> np.ndarray:
        """Click probability of each item if shown at the top position."""
        return self._attractiveness(self._user(user_id), self._items(item_ids))

    def position_bias(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Examination probability of each 0-based position."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and positions.min() < 0:
            raise ValueError("positions must be >= 0")
        if positions.size and positions.max() < len(self._posbias):
            return self._posbias[positions]
        return position_bias(positions, self.config.position_decay)

    def click_probabilities(
        self,
        user_id: str,
        item_ids: Sequence[str],
        positions: Sequence[int] | np.ndarray | None = None,
    ) -> np.ndarray:
        """True click probability of each item at its position (default ``0..n-1``)."""
        if positions is None:
            positions = np.arange(len(item_ids))
        elif len(positions) != len(item_ids):
            raise ValueError(
                f"got {len(positions)} positions for {len(item_ids)} items; need one each"
            )
        return self.position_bias(positions) * self.attractiveness(user_id, item_ids)

    def sample_clicks(
        self,
        user_id: str,
        item_ids: Sequence[str],
        positions: Sequence[int] | np.ndarray | None = None,
        *,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Independent Bernoulli clicks with :meth:`click_probabilities`.

        Draws from the world's click stream unless ``rng`` is given (the online
        evaluation gives each policy its own stream).
        """
        probs = self.click_probabilities(user_id, item_ids, positions)
        return (rng or self._click_rng).random(len(probs)) < probs

    def slate_value(self, user_id: str, item_ids: Sequence[str]) -> float:
        """Expected clicks of the slate shown in this order (positions ``0..n-1``)."""
        return float(np.sum(self.click_probabilities(user_id, item_ids)))

    def best_slate(self, user_id: str, candidates: Sequence[str]) -> list[str]:
        """The slate of ``slate_size`` candidates with the most expected clicks.

        Position bias is the same for every item and decreasing, so sorting by
        attractiveness is optimal (rearrangement inequality).
        """
        order = self._best_order(self._user(user_id), self._items(candidates))
        return [candidates[k] for k in order]

    def _best_order(self, user: int, items: np.ndarray) -> np.ndarray:
        k = min(self.config.slate_size, len(items))
        return np.argsort(-self._attractiveness(user, items), kind="stable")[:k]

    def best_slate_value(self, user_id: str, candidates: Sequence[str]) -> float:
        """Expected clicks of :meth:`best_slate` -- the benchmark for regret."""
        user = self._user(user_id)
        attract = self._attractiveness(user, self._items(candidates))
        top = np.sort(attract)[::-1][: self.config.slate_size]
        return float(np.dot(self._posbias[: len(top)], top))

    def relevant_items(self, user_id: str, k: int) -> list[str]:
        """The user's true top-``k`` live items by attractiveness (for recall@k)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        attract = self._attractiveness(self._user(user_id), self._live)
        top = np.argsort(-attract, kind="stable")[:k]
        return [self._ids[j] for j in self._live[top]]

    def sample_session(
        self, user_id: str, length: int, *, rng: np.random.Generator | None = None
    ) -> list[str]:
        """A plausible click sequence: ``length`` distinct live items the user clicks.

        Items are drawn without replacement with probability proportional to
        their attractiveness -- what the user would click if shown the whole
        catalog uniformly -- so sequences carry the user's true tastes (and item
        popularity), which is what item embeddings learn from.
        """
        if not 1 <= length <= len(self._live):
            raise ValueError(f"length must be in [1, {len(self._live)}], got {length}")
        attract = self._attractiveness(self._user(user_id), self._live)
        rng = rng or self._session_rng
        chosen = rng.choice(self._live, size=length, replace=False, p=attract / attract.sum())
        return [self._ids[j] for j in chosen]
