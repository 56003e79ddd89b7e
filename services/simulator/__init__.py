"""A simulated user population with known ground truth, for driving and evaluating streamrec."""

from __future__ import annotations

from services.simulator.world import (
    Request,
    Scenario,
    World,
    WorldConfig,
    position_bias,
)

__all__ = [
    "Request",
    "Scenario",
    "World",
    "WorldConfig",
    "position_bias",
]
