"""Settings of the bandit policies (``STREAMREC_BANDITS_*``), shared by every layer.

The bandits service learns the configured policies; serving, the simulator and
the evaluation tools build the same learners from the same settings, so they
import them from here rather than from the service.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: The policies learned and served when ``STREAMREC_BANDITS_POLICIES`` is unset.
DEFAULT_POLICIES: dict[str, dict[str, Any]] = {
    "linucb": {"learner": "linucb", "alpha": 0.5},
    "ts": {"learner": "ts_linear", "v": 0.1},
    "ts_beta": {"learner": "ts_beta"},
    "egreedy": {"learner": "egreedy", "epsilon": 0.1},
}


class BanditsSettings(BaseSettings):
    """Bandits service settings (``STREAMREC_BANDITS_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_BANDITS_", env_file=".env", extra="ignore"
    )

    group: str = "bandits"
    """``STREAMREC_BANDITS_GROUP``: consumer group and checkpoint namespace."""
    policies: dict[str, dict[str, Any]] = Field(default_factory=lambda: dict(DEFAULT_POLICIES))
    """``STREAMREC_BANDITS_POLICIES``: JSON ``{"policy": {"learner": name, **params}}``."""
    context_dim: int = Field(9, ge=1)
    """``STREAMREC_BANDITS_CONTEXT_DIM``: length of Impression.context."""
    item_dim: int = Field(8, ge=0)
    """``STREAMREC_BANDITS_ITEM_DIM``: length of SlateItem.features (hybrid LinUCB)."""
    learn_from: Literal["own", "all"] = "own"
    """``STREAMREC_BANDITS_LEARN_FROM``: each policy learns from its own traffic, or from all."""
    publish_interval_s: float = Field(0.25, gt=0)
    """``STREAMREC_BANDITS_PUBLISH_INTERVAL_S``: checkpoint + publish this often."""
    seed: int = 0
    """``STREAMREC_BANDITS_SEED``."""
    max_arms: int = Field(100_000, ge=1)
    """``STREAMREC_BANDITS_MAX_ARMS``: arms each learner (policy × partition) holds at most;
    a full one evicts a sixteenth of them, coldest first (see the module doc). An arm of
    the default policies takes 1,552 bytes of checkpoint (744 for each LinUCB and linear
    TS arm with 9 context features), 148 MiB per partition at 100k; a value whose
    checkpoint could pass 256 MiB is refused at start."""
    admit_after: int = Field(2, ge=1)
    """``STREAMREC_BANDITS_ADMIT_AFTER``: an arm of an item outside the catalog is on
    probation, evicted before any other, until it has had this many updates."""
    catalog_refresh_s: float = Field(5.0, gt=0)
    """``STREAMREC_BANDITS_CATALOG_REFRESH_S``: how often the catalog version is checked."""
    known_policies: list[str] = Field(default_factory=lambda: ["random", "drn"])
    """``STREAMREC_BANDITS_KNOWN_POLICIES``: policies served by others (the random baseline,
    DRN) whose feedback is ignored here under their own metric label; other names are
    counted as ``other``."""
    position_aware: list[str] = Field(default_factory=list)
    """``STREAMREC_BANDITS_POSITION_AWARE``: policies that learn with the position-based
    model (docs/decisions.md §23): each feedback is weighted by the estimated examination
    probability of its slot, so a non-click low on the slate is weaker evidence than one
    at the top. Their learners must take examination probabilities (linucb,
    hybrid_linucb, ts_linear, ts_beta)."""
    examination_from: list[str] = Field(default_factory=lambda: ["random"])
    """``STREAMREC_BANDITS_EXAMINATION_FROM``: policies whose slates are in random order;
    their feedback estimates the examination probability of each position."""
    examination_prior_shows: float = Field(200.0, ge=0)
    """``STREAMREC_BANDITS_EXAMINATION_PRIOR_SHOWS``: pseudo-impressions per position at
    the overall click rate, so that θ stays near 1 (position-blind) until data moves it."""
