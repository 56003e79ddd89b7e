"""How the signals on one shown item combine into its reward (``STREAMREC_REWARD_*``).

Clicks are signals of kind ``click`` with value 1; :class:`~contracts.events.Reward`
events bring other kinds (a purchase, a dwell time, a rating) with a value in
[0, 1]. Within one kind the largest value counts (a second click adds nothing).
Across kinds the rule either takes the largest weighted value (``max``) or adds
the weighted values, capped at 1 (``sum``). An item with no signal at all gets
``default``.

>>> rule = RewardRule({"click": 0.3, "purchase": 1.0}, combine="sum")
>>> rule.reward({"click": 1.0, "purchase": 0.5})
0.8
>>> rule.reward({}), RewardRule().reward({"click": 1.0})
(0.0, 1.0)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from contracts.errors import StreamrecError

#: The kind clicks count as (``Click`` events; a ``Reward`` may not use it).
CLICK = "click"
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

Combine = Literal["max", "sum"]


class RewardRuleError(StreamrecError, ValueError):
    """A reward rule that cannot be used (unknown combination, bad weight or kind)."""


class RewardRule:
    """Per-kind weights in [0, 1], a combination (``max`` or ``sum``) and a default.

    ``graded`` says whether any kind besides clicks is configured: only then does
    the joiner read the rewards topic, and only configured kinds other than
    ``click`` are accepted as :class:`~contracts.events.Reward` events.
    """

    def __init__(
        self,
        weights: Mapping[str, float] | None = None,
        *,
        combine: str = "max",
        default: float = 0.0,
    ) -> None:
        self.weights = dict({CLICK: 1.0} if weights is None else weights)
        if combine not in ("max", "sum"):
            raise RewardRuleError(f"reward combine must be 'max' or 'sum', got {combine!r}")
        self.combine = combine
        if not 0.0 <= default < 1.0:
            raise RewardRuleError(f"default reward must be in [0, 1), got {default!r}")
        self.default = float(default)
        for kind, weight in self.weights.items():
            if not _KIND.match(kind):
                raise RewardRuleError(f"reward kind {kind!r} must match {_KIND.pattern}")
            if not 0.0 <= weight <= 1.0:
                raise RewardRuleError(f"weight of {kind!r} must be in [0, 1], got {weight!r}")

    @property
    def graded(self) -> bool:
        """Whether kinds other than clicks are configured (the rewards topic is read)."""
        return any(kind != CLICK for kind in self.weights)

    def refusal(self, kind: str) -> str | None:
        """Why a ``Reward`` of ``kind`` is refused, or None if it is accepted."""
        if kind == CLICK:
            return "invalid: kind 'click' is reserved for click events"
        if kind not in self.weights:
            return (
                f"invalid: reward kind {kind!r} is not configured "
                f"(STREAMREC_REWARD_WEIGHTS has {sorted(self.weights)})"
            )
        return None

    def reward(self, signals: Mapping[str, float]) -> float:
        """The reward of one shown item from the largest value of each kind seen."""
        if not signals:
            return self.default
        weighted = [self.weights.get(kind, 0.0) * value for kind, value in signals.items()]
        total = max(weighted) if self.combine == "max" else sum(weighted)
        return min(1.0, total)


class RewardSettings(BaseSettings):
    """The reward rule (``STREAMREC_REWARD_*``), read by the joiner, gateway and SDK."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_REWARD_", env_file=".env", extra="ignore"
    )

    weights: dict[str, float] = Field(default_factory=lambda: {CLICK: 1.0})
    """``STREAMREC_REWARD_WEIGHTS``: JSON ``{"kind": weight}``, weights in [0, 1]; clicks
    are kind ``click``. Kinds besides ``click`` turn graded rewards on."""
    combine: Combine = "max"
    """``STREAMREC_REWARD_COMBINE``: ``max`` (the largest weighted signal) or ``sum``
    (the weighted signals added, capped at 1)."""
    default: float = Field(0.0, ge=0.0, lt=1.0)
    """``STREAMREC_REWARD_DEFAULT``: the reward of a shown item no signal came for, in
    [0, 1) (1 would make it indistinguishable from a click in older feedback)."""

    @field_validator("weights")
    @classmethod
    def _valid(cls, weights: dict[str, float]) -> dict[str, float]:
        RewardRule(weights)
        return weights

    def rule(self) -> RewardRule:
        """The rule these settings describe."""
        return RewardRule(self.weights, combine=self.combine, default=self.default)
