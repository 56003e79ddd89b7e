"""The interface every bandit learner shares, and the per-arm table behind it.

A learner is a pure function of the feedback it has seen: arrays in, arrays out,
batch first. ``score`` rates candidate rows, ``select`` picks the best rows with
random tie-breaking, ``update`` folds in rewards. ``state`` exports additive
sufficient statistics (plus hyperparameters) as named float64/int64 arrays, so
per-partition states can be summed by ``merge`` (docs/decisions.md §7) and published to
the parameter store without pickle.

The random generator is not part of the state: it is no sufficient statistic
and cannot be summed across partitions. ``from_state(state, seed=s)`` gives a
learner that behaves exactly like any learner holding the same statistics whose
generator was seeded with ``s``.

Arms are created lazily from item labels, so a producer that invents ids would
otherwise grow a learner without bound. :meth:`BanditLearner.limit_arms` caps
the arms; when a new arm needs room, a share of the arms is evicted, chosen
by a rule that depends only on the sequence of updates (never on how they were
batched, see :meth:`BanditLearner.update`): arms on probation (fewer than
``admit_after`` updates, item not in the catalog) go first, then admitted arms
outside the catalog, then catalog arms, least recently updated first within
each tier. The clock that orders "recently" counts update rows; it is
bookkeeping, not a statistic, so it is exported apart from the state
(:meth:`BanditLearner.recency`) for checkpoints and never merged.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import numpy as np

from services.bandits._kernels import (
    SlotRun,
    greedy_inclusion,
    sampled_inclusion,
    slot_run,
    top_k,
)

#: A learner's exported state: named plain arrays (float64 or int64 only).
State = dict[str, np.ndarray]

#: Lookups of at most this many items are memoised (see ``ArmTable.lookup``).
_LOOKUP_MEMO_ROWS = 1024
#: A full capped learner evicts ``max_arms // EVICTION_DIVISOR`` arms (at least one) at
#: once: a flood of new items then re-sorts the label index once per that many items,
#: not once per item.
EVICTION_DIVISOR = 16
#: Why an arm was evicted, by tier: on probation, admitted but cold, in the catalog.
EVICTION_REASONS = ("probation", "cold", "catalog")
#: Posterior draws behind the top-k probabilities a randomised learner logs
#: (:meth:`BanditLearner.inclusion`): standard deviation at most 0.5 / sqrt(129) ≈ 0.044,
#: about 1 ms per request for 80 Beta Thompson candidates (the Beta draws dominate).
DEFAULT_PROPENSITY_DRAWS = 128
#: The table's bookkeeping array: the learner clock at each arm's last update.
LAST_UPDATE = "last_update"


class ArmTable:
    """Per-arm arrays addressed by item label; arms are added as they first appear.

    Every array has one row per arm plus row 0, which holds the prior: unknown
    items look up slot 0 and score from the prior without a branch. Arms occupy
    rows ``1..len(table)``, at first in order of registration. Rows beyond the
    last arm are kept at the prior so a newly registered arm starts from it. The
    arms new in one call are registered in label order. :meth:`remove` drops arms
    and moves the last ones into the freed rows, so rows stay contiguous.

    Besides the learner's arrays the table keeps ``LAST_UPDATE``, the learner
    clock at each arm's last update (:meth:`touch`), which eviction orders by.

    >>> table = ArmTable({"count": np.zeros((), np.int64)})
    >>> table.ensure(np.array([7, 3, 7])).tolist()
    [2, 1, 2]
    >>> table.lookup(np.array([3, 9])).tolist()
    [1, 0]
    >>> table.remove(np.array([1]))
    >>> table.labels.tolist(), table.lookup(np.array([3, 7])).tolist()
    ([7], [0, 1])
    """

    def __init__(self, prior: Mapping[str, np.ndarray], *, capacity: int = 16) -> None:
        if LAST_UPDATE in prior:
            raise ValueError(f"{LAST_UPDATE!r} is the table's own array")
        self._prior = {name: np.array(value) for name, value in prior.items()}
        self._prior[LAST_UPDATE] = np.zeros((), dtype=np.int64)
        #: Most arms the table will hold (growth stops there); None: no limit.
        self.limit: int | None = None
        self._size = 0
        self._labels = np.empty(capacity, dtype=np.int64)
        self._sorted_labels = np.empty(0, dtype=np.int64)
        self._sorted_slots = np.empty(0, dtype=np.intp)
        self._slot_by_label: dict[int, int] = {}
        self._memo_key: bytes | None = None
        self._memo_slots = np.empty(0, dtype=np.intp)
        self._memo_run: SlotRun | None = None
        self.arrays: dict[str, np.ndarray] = {
            name: self._prior_rows(value, capacity + 1) for name, value in self._prior.items()
        }

    @staticmethod
    def _prior_rows(value: np.ndarray, rows: int) -> np.ndarray:
        return np.repeat(value[None], rows, axis=0)

    def __len__(self) -> int:
        return self._size

    @property
    def labels(self) -> np.ndarray:
        """Arm labels in slot order (slot ``i + 1`` holds ``labels[i]``)."""
        return self._labels[: self._size].copy()

    def rows(self, name: str) -> np.ndarray:
        """The rows of array ``name`` that belong to arms (a view, prior excluded)."""
        return self.arrays[name][1 : self._size + 1]

    def lookup(self, items: np.ndarray) -> np.ndarray:
        """Slot of each item (read-only array); 0 (the prior) for items never registered.

        The last small lookup is remembered, keyed by the items' bytes: consecutive
        decisions usually rank the same candidate pool.
        """
        key = items.tobytes() if len(items) <= _LOOKUP_MEMO_ROWS else None
        if key is not None and key == self._memo_key:
            return self._memo_slots
        if self._size == 0:
            slots = np.zeros(len(items), dtype=np.intp)
        else:
            pos = np.minimum(np.searchsorted(self._sorted_labels, items), self._size - 1)
            slots = np.where(self._sorted_labels[pos] == items, self._sorted_slots[pos], 0)
        slots.flags.writeable = False
        self._memo_key, self._memo_slots, self._memo_run = key, slots, None
        if key is not None and len(slots):
            self._memo_run = slot_run(slots)
        return slots

    def run_of(self, slots: np.ndarray) -> SlotRun | None:
        """Where ``slots`` lie, if they are the last lookup's and fill a run of rows in any
        order (e.g. every arm), so arrays can be read as views instead of gathered."""
        return self._memo_run if slots is self._memo_slots else None

    def slot_of(self, label: int) -> int:
        """Slot of one label, 0 if it is not registered (the one-event fast path)."""
        return self._slot_by_label.get(label, 0)

    def ensure(self, items: np.ndarray) -> np.ndarray:
        """Slot of each item, registering the items not seen before."""
        slots = self.lookup(items)
        missing = slots == 0
        if missing.any():
            self._append(np.unique(items[missing]))
            slots = self.lookup(items)
        return slots

    def touch(self, slots: np.ndarray, first_tick: int) -> None:
        """Record that row ``i`` updated ``slots[i]`` at clock tick ``first_tick + i``."""
        ticks = np.arange(first_tick, first_tick + len(slots), dtype=np.int64)
        # Repeated slots keep their latest tick (plain assignment leaves that unspecified).
        np.maximum.at(self.arrays[LAST_UPDATE], slots, ticks)

    def remove(self, slots: np.ndarray) -> None:
        """Drop the arms in ``slots`` (distinct, registered); the last arms move into their rows."""
        n = self._size
        keep = n - len(slots)
        gone = np.zeros(n + 1, dtype=bool)
        gone[slots] = True
        holes = np.flatnonzero(gone[1 : keep + 1]) + 1
        movers = np.flatnonzero(~gone[keep + 1 :]) + keep + 1
        for name, array in self.arrays.items():
            array[holes] = array[movers]
            array[keep + 1 : n + 1] = self._prior[name]
        for label in self._labels[slots - 1].tolist():
            del self._slot_by_label[label]
        self._labels[holes - 1] = self._labels[movers - 1]
        self._slot_by_label.update(
            zip(self._labels[holes - 1].tolist(), holes.tolist(), strict=True)
        )
        self._size = keep
        self._reindex()

    def _append(self, labels: np.ndarray) -> None:
        needed = self._size + len(labels)
        capacity = len(self._labels)
        if needed > capacity:
            capacity = max(2 * capacity, needed)
            if self.limit is not None:
                # A capped table never needs rows past its cap: doubling would overshoot it.
                capacity = max(needed, min(capacity, self.limit))
            grown = np.empty(capacity, dtype=np.int64)
            grown[: self._size] = self._labels[: self._size]
            self._labels = grown
            for name, array in self.arrays.items():
                bigger = self._prior_rows(self._prior[name], capacity + 1)
                bigger[: self._size + 1] = array[: self._size + 1]
                self.arrays[name] = bigger
        self._labels[self._size : needed] = labels
        self._slot_by_label.update(
            zip(labels.tolist(), range(self._size + 1, needed + 1), strict=True)
        )
        self._size = needed
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the sorted label index after arms were added or moved; forget the memo."""
        order = np.argsort(self._labels[: self._size], kind="stable")
        self._sorted_labels = self._labels[order]
        self._sorted_slots = order + 1
        self._memo_key = None
        self._memo_run = None

    def load(self, labels: np.ndarray, arrays: Mapping[str, np.ndarray]) -> None:
        """Register ``labels`` (all new) and set their rows of the named arrays."""
        start = self._size + 1
        self._append(labels)
        for name, values in arrays.items():
            self.arrays[name][start : start + len(labels)] = values


class BanditLearner(abc.ABC):
    """A bandit policy that scores candidate rows and learns from batched rewards.

    Rows are decisions flattened into one batch: row ``i`` is candidate
    ``items[i]`` with features ``X[i]``; items may repeat and each row is scored
    independently. Unknown items are new arms scored from the prior; they become
    arms on their first update.

    Subclasses declare which constructor arguments are hyperparameters and which
    state arrays are additive statistics (per arm, or global); ``state``,
    ``from_state``, ``merge`` and ``clone`` are implemented once, here.

    A learner holds any number of arms unless :meth:`limit_arms` caps them (the
    bandits service does: item ids come from producers). Eviction is a function
    of the update sequence alone, so a learner fed the same events in any
    batching, or restored from ``state()`` and ``recency()`` midway, evicts the
    same arms and ends with the same statistics. Per-partition learners merged by
    readers equal one learner on all data only while no arm was evicted: each
    partition evicts by its own traffic, so once it has, the merged statistics
    of an arm are the sum, over partitions, of the updates since that partition
    last evicted it.
    """

    #: Registry name, also the model name in the parameter store.
    name: ClassVar[str]
    #: Whether ``score``/``update`` need the feature matrix ``X``.
    needs_features: ClassVar[bool]
    #: Whether the policy's features hold the candidates' item features besides the
    #: request context (see :meth:`policy_features`).
    uses_item_features: ClassVar[bool] = False
    #: Constructor arguments (besides ``seed``) exported as 0-d arrays in the state.
    _hyperparameters: ClassVar[tuple[str, ...]]
    #: Per-arm additive statistics exported in the state, summed by ``merge``.
    _arm_statistics: ClassVar[tuple[str, ...]]
    #: Global additive statistics exported in the state, summed by ``merge``; each is
    #: held in the attribute ``_<name>``.
    _global_statistics: ClassVar[tuple[str, ...]] = ()
    #: Whether :meth:`score` samples (Thompson sampling): its top-k probabilities are
    #: then estimated from posterior draws (:meth:`inclusion`).
    randomised: ClassVar[bool] = False
    #: Bounds rewards must respect, if the model needs any.
    _reward_range: ClassVar[tuple[float, float] | None] = None

    def __init__(self, *, seed: int | None = None) -> None:
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self._table = ArmTable(self._arm_prior())
        self._max_arms: int | None = None
        self._admit_after = 1
        self._catalog = np.empty(0, dtype=np.int64)
        #: Update rows applied so far: the clock of ``LAST_UPDATE``.
        self._clock = 0
        #: reason -> (arms, updates they held), evicted since the last ``drain_evictions``.
        self._evicted: dict[str, tuple[int, float]] = {}

    # -- what each learner defines -------------------------------------------------

    @abc.abstractmethod
    def _arm_prior(self) -> dict[str, np.ndarray]:
        """Per-arm arrays (statistics and derived terms) for an arm with no data."""

    @abc.abstractmethod
    def _score(self, slots: np.ndarray, X: np.ndarray | None) -> np.ndarray:
        """Scores for rows already resolved to arm slots (0 = prior)."""

    @abc.abstractmethod
    def _update(self, slots: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        """Fold validated rewards into the statistics of already-registered slots."""

    def _draw_scores(self, slots: np.ndarray, X: np.ndarray | None, draws: int) -> np.ndarray:
        """``draws`` independent score vectors of the rows, shape (draws, n).

        Only randomised learners (``randomised = True``) are asked; they override it.
        """
        raise NotImplementedError(f"{type(self).__name__} scores deterministically")

    def _settle(self) -> None:  # noqa: B027 - a hook: most learners queue nothing
        """Fold events a learner queues into its statistics (before rows move or are read)."""

    def _arms_removed(self) -> None:  # noqa: B027 - a hook: most learners derive per arm only
        """Invalidate derived terms that sum over arms, after some arms were evicted."""

    def _arm_updates(self) -> np.ndarray:
        """Updates each arm has had, in slot order (decides probation).

        Learners keep this as their ``counts`` statistic; one without it overrides this.
        """
        return self._table.rows("counts")

    def _global_state(self) -> dict[str, np.ndarray]:
        """Copies of the global statistics, each held in attribute ``_<name>``."""
        return {name: getattr(self, f"_{name}").copy() for name in self._global_statistics}

    @abc.abstractmethod
    def _rebuild(self) -> None:
        """Recompute every derived term from the statistics (after a restore)."""

    @classmethod
    @abc.abstractmethod
    def _unit_test_params(cls) -> dict[str, Any]:
        """Small constructor arguments for the conformance suite."""

    # -- the policy's feature layout -------------------------------------------------

    @classmethod
    def dimensions(cls, context_dim: int, item_dim: int) -> dict[str, int]:
        """Constructor arguments that the policy's feature widths decide (none by default).

        ``context_dim`` is the width of the request context, ``item_dim`` that of
        the candidates' item features.
        """
        return {}

    @classmethod
    def policy_features(cls, context: np.ndarray, item_features: np.ndarray) -> np.ndarray:
        """The feature matrix ``X`` of a policy's candidates, one row per candidate.

        ``context`` is (c,) for every row or (n, c) per row; ``item_features`` is
        (n, f) and decides the number of rows (pass ``np.empty((n, 0))`` when the
        learner does not use them). Serving (scoring candidates) and the bandits
        service (learning from feedback) both build ``X`` here, so a model never
        sees features built one way and scored another. Every row is the request
        context unless the learner uses item features.

        >>> BanditLearner.policy_features(np.array([1.0, 2.0]), np.empty((2, 0)))
        array([[1., 2.],
               [1., 2.]])
        """
        items = np.asarray(item_features, dtype=np.float64)
        ctx = np.asarray(context, dtype=np.float64)
        rows = np.broadcast_to(ctx, (len(items), ctx.shape[-1])) if ctx.ndim == 1 else ctx
        return np.array(rows, dtype=np.float64)

    # -- the shared interface ------------------------------------------------------

    @property
    def n_features(self) -> int:
        """Number of feature columns ``X`` must have (0 when features are ignored)."""
        return 0

    @property
    def n_arms(self) -> int:
        """Number of arms that have received at least one update."""
        return len(self._table)

    @property
    def max_arms(self) -> int | None:
        """The cap set by :meth:`limit_arms`, or None."""
        return self._max_arms

    def limit_arms(self, max_arms: int | None, *, admit_after: int = 1) -> None:
        """Hold at most ``max_arms`` arms (None: no limit); evicts at once if it holds more.

        When an update needs a new arm and the learner is full, it evicts
        ``max(1, max_arms // EVICTION_DIVISOR)`` arms: first arms on probation
        (fewer than ``admit_after`` updates, item not in :meth:`set_catalog`), then
        admitted arms, then catalog arms, least recently updated first within each
        tier (label breaks ties). A flood of one-off ids thus only churns the
        probation tier, and catalog arms go only if every arm is one. An evicted
        arm's statistics are dropped and its item scores from the prior again;
        :meth:`drain_evictions` reports how many arms and updates went.

        >>> from services.bandits import EpsilonGreedy
        >>> learner = EpsilonGreedy(epsilon=0.0)
        >>> learner.limit_arms(2, admit_after=2)
        >>> learner.update(np.array([1, 1, 2]), None, np.ones(3))
        >>> learner.update(np.array([3]), None, np.ones(1))  # evicts 2: on probation
        >>> learner.state()["items"].tolist(), learner.drain_evictions()
        ([1, 3], {'probation': (1, 1.0)})
        """
        self._max_arms = None if max_arms is None else dimension("max_arms", max_arms)
        self._admit_after = dimension("admit_after", admit_after)
        self._table.limit = self._max_arms
        if self._max_arms is not None and len(self._table) > self._max_arms:
            self._evict(len(self._table) - self._max_arms)

    def set_catalog(self, labels: np.ndarray) -> None:
        """Labels of the items in the catalog: their arms are evicted last.

        The catalog only orders eviction; it admits nothing and drops nothing, so
        a learner that never fills up behaves the same with any catalog.
        """
        catalog = np.asarray(labels, dtype=np.int64)
        if catalog.ndim != 1:
            raise ValueError(f"catalog labels must be 1-D, got shape {catalog.shape}")
        if len(catalog) > 1 and not (np.diff(catalog) > 0).all():
            catalog = np.unique(catalog)
        self._catalog = catalog

    def drain_evictions(self) -> dict[str, tuple[int, float]]:
        """``{reason: (arms, updates they held)}`` evicted since the last call (reasons:
        ``EVICTION_REASONS``); for the discounted Beta learner "updates" is the decayed mass."""
        evicted, self._evicted = self._evicted, {}
        return evicted

    def state_bytes_per_arm(self) -> int:
        """Bytes one arm adds to ``state()`` and ``recency()`` (what bounds a checkpoint)."""
        arrays = self._table.arrays
        label_and_tick = 2 * np.dtype(np.int64).itemsize
        return label_and_tick + sum(arrays[name][0].nbytes for name in self._arm_statistics)

    def recency(self) -> np.ndarray:
        """Clock tick of each arm's last update, aligned with ``state()["items"]``.

        Not a statistic (never merged or published): a checkpoint keeps it beside
        the state so that a restored learner evicts as the original would have.
        """
        order = np.argsort(self._table.labels, kind="stable")
        return self._table.rows(LAST_UPDATE)[order].copy()

    @property
    def rng(self) -> np.random.Generator:
        """The learner's own generator (for tie-breaking a batch of scores with ``top_k``)."""
        return self._rng

    def hyperparameters(self) -> dict[str, Any]:
        """Constructor arguments, without ``seed``."""
        return {name: getattr(self, name) for name in self._hyperparameters}

    def score(self, items: np.ndarray, X: np.ndarray | None = None) -> np.ndarray:
        """Exploration-adjusted score of every row: float64 array of shape (n,)."""
        items = _check_items(items)
        features = self._check_features(X, len(items))
        return self._score(self._table.lookup(items), features)

    def inclusion(
        self,
        items: np.ndarray,
        X: np.ndarray | None,
        scores: np.ndarray,
        k: int,
        *,
        draws: int = DEFAULT_PROPENSITY_DRAWS,
    ) -> np.ndarray:
        """Probability that each row is among the ``k`` best of a call to :meth:`score`.

        ``scores`` is the call the slate was built from. A deterministic learner's
        probabilities follow from it exactly (ties split at random). A randomised
        one (``randomised = True``: Thompson sampling) samples its scores from the
        posterior, so the scores of one call say nothing exact: the marginal is
        estimated from ``draws`` fresh posterior draws plus ``scores`` itself
        (:func:`~services.bandits._kernels.sampled_inclusion`: standard deviation at
        most ``0.5 / sqrt(draws + 1)``, and a shown row's estimate is never 0).
        Learners with a closed form (ε-greedy) override this.
        """
        if not self.randomised:
            return greedy_inclusion(scores, k)
        if draws < 1:
            raise ValueError(f"draws must be at least 1, got {draws}")
        items = _check_items(items)
        features = self._check_features(X, len(items))
        sampled = self._draw_scores(self._table.lookup(items), features, draws)
        return sampled_inclusion(sampled, scores, k)

    def select(self, items: np.ndarray, X: np.ndarray | None = None, k: int = 1) -> np.ndarray:
        """Row indices of the ``k`` best-scoring rows, ties broken with the learner's RNG.

        Random tie-breaking matters for batches: without it every decision in a
        batch would pick the same untried arm.
        """
        return top_k(self.score(items, X), k, self._rng)

    def update(self, items: np.ndarray, X: np.ndarray | None, rewards: np.ndarray) -> None:
        """Fold in one reward per row; a batch of one is the online case.

        A capped learner applies a batch in runs that fit, evicting between runs
        exactly where the same rows applied one at a time would have, so batching
        never changes which arms are evicted.
        """
        items = _check_items(items)
        features = self._check_features(X, len(items))
        if features is not None and not np.isfinite(features).all():
            raise ValueError("X must be finite")
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.shape != items.shape:
            raise ValueError(f"rewards must have shape {items.shape}, got {rewards.shape}")
        if len(items) == 1:
            # The online case: plain Python scalars cost far less than array operations.
            reward = float(rewards[0])
            self._check_rewards(reward, reward)
            slot = self._table.slot_of(int(items[0]))
            if not slot:
                if self._max_arms is not None and len(self._table) >= self._max_arms:
                    self._evict(self._eviction_size())
                slot = int(self._table.ensure(items)[0])
            self._update_one(slot, None if features is None else features[0], reward)
            self._clock += 1
            self._table.arrays[LAST_UPDATE][slot] = self._clock
        elif len(items):
            self._check_rewards(float(rewards.min()), float(rewards.max()))
            start = 0
            while start < len(items):
                stop = self._rows_that_fit(items, start)
                if stop == start:
                    self._evict(self._eviction_size())
                    continue
                rows = slice(start, stop)
                slots = self._table.ensure(items[rows])
                self._update(slots, None if features is None else features[rows], rewards[rows])
                self._table.touch(slots, self._clock + 1)
                self._clock += stop - start
                start = stop

    def _rows_that_fit(self, items: np.ndarray, start: int) -> int:
        """End of the longest run of rows from ``start`` whose new arms fit under the cap."""
        if self._max_arms is None:
            return len(items)
        free = self._max_arms - len(self._table)
        rest = items[start:]
        if len(rest) <= free:
            return len(items)
        new = np.flatnonzero(self._table.lookup(rest) == 0)
        _, first = np.unique(rest[new], return_index=True)
        if len(first) <= free:
            return len(items)
        # The row that would register the (free + 1)-th new arm starts the next run.
        return start + int(np.sort(new[first])[free])

    def _eviction_size(self) -> int:
        assert self._max_arms is not None
        return max(1, self._max_arms // EVICTION_DIVISOR)

    def _evict(self, count: int) -> None:
        """Evict ``count`` arms in the order :meth:`limit_arms` describes."""
        self._settle()
        table = self._table
        labels = table.labels
        updates = self._arm_updates()
        tier = (updates >= self._admit_after).astype(np.int64)
        if len(self._catalog) and len(labels):
            at = np.minimum(np.searchsorted(self._catalog, labels), len(self._catalog) - 1)
            tier[self._catalog[at] == labels] = 2
        chosen = np.lexsort((labels, table.rows(LAST_UPDATE), tier))[:count]
        for level, reason in enumerate(EVICTION_REASONS):
            picked = chosen[tier[chosen] == level]
            if len(picked):
                arms, held = self._evicted.get(reason, (0, 0.0))
                self._evicted[reason] = (arms + len(picked), held + float(updates[picked].sum()))
        table.remove(chosen + 1)
        self._arms_removed()

    def _check_rewards(self, smallest: float, largest: float) -> None:
        """ValueError unless every reward is finite and in range, judged by the extremes.

        NaN propagates through ``min``/``max``, so finite extremes mean finite rewards.
        """
        if not (math.isfinite(smallest) and math.isfinite(largest)):
            raise ValueError("rewards must be finite")
        if self._reward_range is not None:
            low, high = self._reward_range
            if smallest < low or largest > high:
                raise ValueError(f"{self.name} rewards must lie in [{low}, {high}]")

    def _update_one(self, slot: int, x: np.ndarray | None, reward: float) -> None:
        """One event; learners with a cheaper rank-one path override this."""
        self._update(
            np.array([slot]), None if x is None else x[None, :], np.array([reward], dtype=float)
        )

    def _check_features(self, X: np.ndarray | None, n: int) -> np.ndarray | None:
        if not self.needs_features:
            if X is not None and len(X) != n:
                raise ValueError(f"X must have {n} rows (one per item), got {len(X)}")
            return None
        if X is None:
            raise ValueError(f"{self.name} needs features X of shape (n, {self.n_features})")
        features = np.asarray(X, dtype=np.float64)
        if features.shape != (n, self.n_features):
            raise ValueError(
                f"X must have shape ({n}, {self.n_features}) for {n} items, got {features.shape}"
            )
        return features

    def state(self) -> State:
        """Hyperparameters and additive statistics as named arrays, arms sorted by label.

        Sorting makes the state canonical: two learners holding the same
        statistics export equal states whatever order their arms appeared in.
        """
        labels = self._table.labels
        order = np.argsort(labels, kind="stable")
        out: State = {"items": labels[order]}
        for name, value in self.hyperparameters().items():
            out[name] = np.array(value, dtype=np.int64 if isinstance(value, int) else np.float64)
        for name in self._arm_statistics:
            out[name] = self._table.rows(name)[order].copy()
        out.update(self._global_state())
        return out

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, np.ndarray],
        *,
        seed: int | None = None,
        recency: np.ndarray | None = None,
    ) -> Self:
        """A learner holding exactly the statistics and hyperparameters of ``state``.

        ``recency`` (from :meth:`recency`) restores the eviction order too; without
        it every arm counts as last updated at tick 0. Limits are not part of a
        state: call :meth:`limit_arms` on the result.
        """
        cls._check_state_keys(state)
        learner = cls(**cls._hyperparameters_of(state), seed=seed)
        labels = np.asarray(state["items"])
        if labels.ndim != 1 or labels.dtype != np.int64:
            raise ValueError(f"state 'items' must be 1-D int64, got {labels.dtype} {labels.shape}")
        if len(np.unique(labels)) != len(labels):
            raise ValueError("state 'items' holds duplicate labels")
        arm_stats = {}
        for name in cls._arm_statistics:
            prior = learner._table.arrays[name][0]
            arm_stats[name] = _checked_array(state, name, (len(labels), *prior.shape), prior.dtype)
        if recency is not None:
            arm_stats[LAST_UPDATE] = _checked_array(
                {"recency": recency}, "recency", (len(labels),), np.dtype(np.int64)
            )
            learner._clock = int(arm_stats[LAST_UPDATE].max()) if len(labels) else 0
        global_stats = {}
        current = learner._global_state()
        for name in cls._global_statistics:
            expected = current[name]
            global_stats[name] = _checked_array(state, name, expected.shape, expected.dtype)
        learner._table.load(labels, arm_stats)
        for name, array in global_stats.items():
            setattr(learner, f"_{name}", array.copy())
        learner._rebuild()
        return learner

    @classmethod
    def merge(cls, states: Sequence[Mapping[str, np.ndarray]]) -> State:
        """Combine per-partition states: align arms by label and sum the statistics.

        The prior is a hyperparameter, not a statistic, so it is counted once.
        Raises ValueError when the states' hyperparameters differ.
        """
        if not states:
            raise ValueError("merge needs at least one state")
        for state in states:
            cls._check_state_keys(state)
        reference = cls._hyperparameters_of(states[0])
        for index, state in enumerate(states[1:], start=1):
            other = cls._hyperparameters_of(state)
            for name, value in reference.items():
                if other[name] != value:
                    raise ValueError(
                        f"cannot merge {cls.name} states: {name} is {value} in state 0 "
                        f"but {other[name]} in state {index}"
                    )
        labels = np.unique(np.concatenate([np.asarray(s["items"], np.int64) for s in states]))
        out: State = {"items": labels}
        for name in cls._hyperparameters:
            out[name] = np.array(states[0][name])
        for name in cls._arm_statistics:
            first = np.asarray(states[0][name])
            total = np.zeros((len(labels), *first.shape[1:]), dtype=first.dtype)
            for state in states:
                total[np.searchsorted(labels, state["items"])] += state[name]
            out[name] = total
        for name in cls._global_statistics:
            out[name] = np.sum([np.asarray(s[name]) for s in states], axis=0)
        return out

    def clone(self) -> Self:
        """A fresh learner with the same hyperparameters, seed, limits and catalog, and no data."""
        twin = type(self)(**self.hyperparameters(), seed=self.seed)
        twin.limit_arms(self._max_arms, admit_after=self._admit_after)
        twin._catalog = self._catalog
        return twin

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({params}, seed={self.seed!r}) with {self.n_arms} arms"

    # -- state helpers -------------------------------------------------------------

    @classmethod
    def _check_state_keys(cls, state: Mapping[str, np.ndarray]) -> None:
        expected = {"items", *cls._hyperparameters, *cls._arm_statistics, *cls._global_statistics}
        if missing := expected - set(state):
            raise ValueError(f"{cls.name} state lacks arrays {sorted(missing)}")
        if extra := set(state) - expected:
            raise ValueError(f"{cls.name} state has unexpected arrays {sorted(extra)}")

    @classmethod
    def _hyperparameters_of(cls, state: Mapping[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in cls._hyperparameters:
            value = np.asarray(state[name])
            if value.shape != () or value.dtype not in (np.int64, np.float64):
                raise ValueError(
                    f"state hyperparameter {name!r} must be a 0-d int64 or float64 array, "
                    f"got {value.dtype} of shape {value.shape}"
                )
            out[name] = value.item()
        return out


def _check_items(items: np.ndarray) -> np.ndarray:
    array = np.asarray(items)
    if array.ndim != 1:
        raise ValueError(f"items must be a 1-D array of item labels, got shape {array.shape}")
    if array.dtype.kind not in "iu":
        if array.size == 0:
            return array.astype(np.int64)
        raise ValueError(f"items must be integer labels, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _checked_array(
    state: Mapping[str, np.ndarray], name: str, shape: tuple[int, ...], dtype: np.dtype
) -> np.ndarray:
    array = np.asarray(state[name])
    if array.shape != shape or array.dtype != dtype:
        raise ValueError(
            f"state array {name!r} must be {dtype} of shape {shape}, "
            f"got {array.dtype} of shape {array.shape}"
        )
    return array


def positive(name: str, value: float, *, allow_zero: bool = False) -> float:
    """``value`` as a float, or ValueError unless it is finite and positive."""
    number = float(value)
    if not np.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} must be finite and {bound}, got {value!r}")
    return number


def dimension(name: str, value: int, *, minimum: int = 1) -> int:
    """``value`` as an int, or ValueError unless it is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)
