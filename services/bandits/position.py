"""Examination probabilities of slate positions, estimated from randomised slates.

The position-based model (PBM; Richardson et al. 2007, the model of Lagrée et al.,
NeurIPS 2016) factors a click into examination and relevance::

    P(click | item, position p) = θ_p · P(relevant | item),    θ_0 = 1.

On slates whose order is random (the ``random`` policy's traffic, or slates whose
top items were shuffled), relevance is independent of the position, so the
click-through rate at position p over that at position 0 estimates θ_p / θ_0
(the randomisation estimate of Joachims et al., WSDM 2017). :class:`ExaminationModel`
keeps, per position, the slates shown and the rewards collected there -- additive
statistics, as every learner's -- and derives θ from them. Each position's rate is
shrunk towards the overall rate by ``prior_shows`` pseudo-impressions, so with
little data θ stays near 1 (position-blind) and moves away only on evidence; θ is
clipped to ``[floor, 1]`` so that a noisy estimate never gives a row a weight of 0
or more than the top slot's.

>>> model = ExaminationModel(positions=3, prior_shows=0.0)
>>> model.observe(np.array([0, 1, 2] * 100), np.array([1.0, 1.0, 0.0] * 50 + [1.0, 0.0, 0.0] * 50))
>>> model.examination(np.array([0, 1, 2])).tolist()
[1.0, 0.5, 0.05]
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from services.bandits.base import State, dimension, positive

#: Examination probabilities never drop below this (a row keeps some weight).
DEFAULT_FLOOR = 0.05


class ExaminationModel:
    """Per-position shows and rewards of randomised slates, and the θ they imply.

    Positions at or beyond ``positions`` share the last one's statistics. Rewards
    are numbers in [0, 1] (clicks, or graded rewards).
    """

    def __init__(
        self, positions: int, *, prior_shows: float = 200.0, floor: float = DEFAULT_FLOOR
    ) -> None:
        self.positions = dimension("positions", positions)
        self.prior_shows = positive("prior_shows", prior_shows, allow_zero=True)
        self.floor = positive("floor", floor)
        if self.floor > 1.0:
            raise ValueError(f"floor must be in (0, 1], got {floor!r}")
        self.shows = np.zeros(self.positions)
        self.rewards = np.zeros(self.positions)
        self._theta: np.ndarray | None = None

    def observe(self, positions: np.ndarray, rewards: np.ndarray) -> None:
        """Count rewards of randomised slates, one per (0-based) position shown."""
        slots = self._slots(positions)
        values = np.asarray(rewards, dtype=np.float64)
        if values.shape != slots.shape:
            raise ValueError(f"rewards must have shape {slots.shape}, got {values.shape}")
        if len(values) and not (values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError("rewards must lie in [0, 1]")
        np.add.at(self.shows, slots, 1.0)
        np.add.at(self.rewards, slots, values)
        self._theta = None

    def observe_one(self, position: int, reward: float) -> None:
        """:meth:`observe` for one row (the service's per-record path)."""
        if position < 0 or not 0.0 <= reward <= 1.0:
            raise ValueError(f"need position >= 0 and reward in [0, 1], got {position}, {reward}")
        slot = min(position, self.positions - 1)
        self.shows[slot] += 1.0
        self.rewards[slot] += reward
        self._theta = None

    def theta(self) -> np.ndarray:
        """θ of every tracked position (θ_0 = 1); all ones until position 0 saw a reward."""
        if self._theta is None:
            total_shows = float(self.shows.sum())
            overall = float(self.rewards.sum()) / total_shows if total_shows else 0.0
            weight = self.shows + self.prior_shows
            # A position never shown (and no prior) has no evidence: the overall rate.
            rates = np.where(
                weight > 0,
                (self.rewards + self.prior_shows * overall) / np.maximum(weight, 1e-300),
                overall,
            )
            theta = np.ones(self.positions)
            if rates[0] > 0.0:
                theta = np.clip(rates / rates[0], self.floor, 1.0)
                theta[0] = 1.0
            self._theta = theta
        return self._theta

    def examination(self, positions: np.ndarray) -> np.ndarray:
        """θ of each given (0-based) position."""
        return self.theta()[self._slots(positions)]

    def _slots(self, positions: np.ndarray) -> np.ndarray:
        slots = np.asarray(positions)
        if slots.ndim != 1 or (slots.size and slots.dtype.kind not in "iu"):
            raise ValueError(f"positions must be 1-D integers, got {slots.dtype} {slots.shape}")
        if slots.size and slots.min() < 0:
            raise ValueError("positions must be >= 0")
        return np.minimum(slots.astype(np.int64), self.positions - 1)

    def state(self) -> State:
        """The statistics as named float64 arrays (``shows``, ``rewards``)."""
        return {"shows": self.shows.copy(), "rewards": self.rewards.copy()}

    def load(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the statistics with those of ``state`` (ValueError if malformed)."""
        arrays = {}
        for name in ("shows", "rewards"):
            array = np.asarray(state[name]) if name in state else None
            if array is None or array.shape != (self.positions,) or array.dtype != np.float64:
                raise ValueError(
                    f"examination state {name!r} must be float64 of shape ({self.positions},)"
                )
            arrays[name] = array.copy()
        self.shows, self.rewards = arrays["shows"], arrays["rewards"]
        self._theta = None
