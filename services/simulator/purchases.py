"""A graded signal for the simulator: purchases after clicks, with a known value.

A click on item ``i`` turns into a purchase with the item's conversion rate
``q_i`` and is worth ``v_i`` (its price, scaled to [0.2, 1]). Both are hidden item
properties drawn once per item id from the seed, independent of the click model
(an item's attractiveness says nothing about whether it sells), so a learner
that sees only clicks cannot learn them and one that sees the graded reward can.
Each item's properties depend only on ``(seed, item id)``, never on the order
items are asked about, so every policy faces the same items.

>>> model = PurchaseModel(seed=3)
>>> q, v = model.conversion(["i1", "i2"]), model.value(["i1", "i2"])
>>> bool(((0 < q) & (q < 1)).all() and ((0.2 <= v) & (v <= 1)).all())
True
>>> (model.conversion(["i2"]) == q[1:]).all()
np.True_
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from contracts.ids import item_labels


class PurchaseModel:
    """Per-item conversion rates (logit-normal around ``mean_conversion``) and values."""

    def __init__(
        self, *, seed: int, mean_conversion: float = 0.2, conversion_spread: float = 1.5
    ) -> None:
        if not 0.0 < mean_conversion < 1.0:
            raise ValueError(f"mean_conversion must be in (0, 1), got {mean_conversion}")
        self.seed = seed
        self._logit = float(np.log(mean_conversion / (1.0 - mean_conversion)))
        self._spread = conversion_spread
        self._items: dict[str, tuple[float, float]] = {}

    def _properties(self, item_ids: Sequence[str]) -> np.ndarray:
        missing = [i for i in dict.fromkeys(item_ids) if i not in self._items]
        for item_id, label in zip(missing, item_labels(missing), strict=True):
            rng = np.random.default_rng([self.seed, int(label) & 0x7FFF_FFFF_FFFF_FFFF])
            logit = self._logit + self._spread * rng.standard_normal()
            self._items[item_id] = (1.0 / (1.0 + np.exp(-logit)), 0.2 + 0.8 * rng.random())
        return np.array([self._items[i] for i in item_ids], dtype=np.float64).reshape(-1, 2)

    def conversion(self, item_ids: Sequence[str]) -> np.ndarray:
        """Probability that a click on each item becomes a purchase."""
        return self._properties(item_ids)[:, 0]

    def value(self, item_ids: Sequence[str]) -> np.ndarray:
        """What a purchase of each item is worth, in [0.2, 1]."""
        return self._properties(item_ids)[:, 1]

    def sample(
        self, item_ids: Sequence[str], clicked: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """Each item's purchase value (0 where nothing was bought); only clicks buy."""
        properties = self._properties(item_ids)
        bought = clicked & (rng.random(len(item_ids)) < properties[:, 0])
        return np.where(bought, properties[:, 1], 0.0)
