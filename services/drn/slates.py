"""DRN's slates: served slates' outcomes, assembled from feedback records, packed as arrays.

The DRN serving policy logs, with every shown item, the state vector as the
impression context, the item's action vector as its features, its team
(``exploit`` = W, ``explore`` = W̃) and, as ``model_version``, the W̃ draw
(see :mod:`services.serving.drn_policy`). The joiner emits one Feedback per
shown item, a slate's items back to back in one partition: an
:class:`OpenSlate` collects them until a record of another request follows,
then closes into a :class:`SlateFeedback`, what :class:`~services.drn.trainer.DRNTrainer`
learns from. :func:`pack_slates` and :func:`unpack_slates` store slates as
named arrays in checkpoints (:mod:`contracts.params`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from contracts.events import Feedback
from services.drn.interleaving import EXPLOIT, EXPLORE

_TEAM_CODES: dict[str | None, int] = {None: 0, EXPLOIT: 1, EXPLORE: 2}
_TEAMS = (None, EXPLOIT, EXPLORE)


@dataclass(frozen=True, eq=False)
class SlateFeedback:
    """One served slate's outcome, as DRN learns from it.

    ``teams`` holds each item's interleaving team, or ``None`` for items of a
    slate that was not interleaved (those train the major update only).
    ``user_id`` ``None`` means the user is unknown: no return signal.
    """

    user_id: str | None
    ts: float
    explore_version: int
    state: np.ndarray  # (state_dim,) float32
    actions: np.ndarray  # (k, action_dim) float32
    clicks: np.ndarray  # (k,) float32, 0/1
    teams: tuple[str | None, ...]

    def __post_init__(self) -> None:
        k = self.actions.shape[0]
        if self.actions.ndim != 2 or self.clicks.shape != (k,) or len(self.teams) != k:
            raise ValueError(
                f"slate has {self.actions.shape} actions, {self.clicks.shape} clicks and "
                f"{len(self.teams)} teams; need k rows of each"
            )

    @property
    def interleaved(self) -> bool:
        return all(team in (EXPLOIT, EXPLORE) for team in self.teams)


def pack_slates(prefix: str, slates: Sequence[SlateFeedback]) -> dict[str, np.ndarray]:
    """Slates as named arrays (user ids go to the meta, see :func:`slate_users`)."""
    if not slates:
        empty = np.zeros((0, 0), dtype=np.float32)
        states, actions, clicks = empty, empty, np.zeros(0, dtype=np.float32)
    else:
        states = np.stack([s.state for s in slates]).astype(np.float32)
        actions = np.concatenate([s.actions for s in slates]).astype(np.float32)
        clicks = np.concatenate([s.clicks for s in slates]).astype(np.float32)
    return {
        f"{prefix}/ts": np.array([s.ts for s in slates], dtype=np.float64),
        f"{prefix}/version": np.array([s.explore_version for s in slates], dtype=np.int64),
        f"{prefix}/sizes": np.array([s.actions.shape[0] for s in slates], dtype=np.int64),
        f"{prefix}/states": states,
        f"{prefix}/actions": actions,
        f"{prefix}/clicks": clicks,
        f"{prefix}/teams": np.array(
            [_TEAM_CODES[t] for s in slates for t in s.teams], dtype=np.uint8
        ),
    }


def unpack_slates(
    prefix: str, arrays: Mapping[str, np.ndarray], users: Sequence[str | None]
) -> list[SlateFeedback]:
    """The slates :func:`pack_slates` packed, with their users in order."""
    sizes = np.asarray(arrays[f"{prefix}/sizes"], dtype=np.int64)
    if len(users) != len(sizes):
        raise ValueError(f"{prefix}: {len(sizes)} slates but {len(users)} users")
    ends = np.cumsum(sizes)
    out = []
    for i, (user, end, size) in enumerate(zip(users, ends, sizes, strict=True)):
        rows = slice(int(end - size), int(end))
        out.append(
            SlateFeedback(
                user_id=user,
                ts=float(arrays[f"{prefix}/ts"][i]),
                explore_version=int(arrays[f"{prefix}/version"][i]),
                state=np.asarray(arrays[f"{prefix}/states"][i], dtype=np.float32),
                actions=np.asarray(arrays[f"{prefix}/actions"][rows], dtype=np.float32),
                clicks=np.asarray(arrays[f"{prefix}/clicks"][rows], dtype=np.float32),
                teams=tuple(_TEAMS[int(c)] for c in arrays[f"{prefix}/teams"][rows]),
            )
        )
    return out


@dataclass
class OpenSlate:
    """Feedback records of one request, collected until another request follows."""

    request_id: str
    user_id: str
    ts: float
    version: int
    state: list[float]
    actions: list[list[float]] = field(default_factory=list)
    clicks: list[float] = field(default_factory=list)
    teams: list[str | None] = field(default_factory=list)

    def add(self, fb: Feedback) -> None:
        self.actions.append(fb.item_features)
        self.clicks.append(float(fb.reward))
        self.teams.append(fb.team)

    def closed(self) -> SlateFeedback:
        return SlateFeedback(
            user_id=self.user_id,
            ts=self.ts,
            explore_version=self.version,
            state=np.asarray(self.state, dtype=np.float32),
            actions=np.asarray(self.actions, dtype=np.float32),
            clicks=np.asarray(self.clicks, dtype=np.float32),
            teams=tuple(self.teams),
        )
