"""Interleaved comparison of the exploit (W) and explore (W̃) rankings.

DRN (Zheng et al., WWW 2018, §4.4) shows users one slate merged from the
rankings of the current network W and the exploration network W̃ and lets the
clicks decide which network is better. Two merges are offered:

- :func:`probabilistic_interleave` (Hofmann, Whiteson & de Rijke, CIKM 2011),
  the one DRN uses: for each slot a team is picked by a fair coin, and that
  team draws an item from a softmax over its ranking, P(d) ∝ rank(d)^−τ, over
  the items not yet placed; the placed item is removed from both rankings.
- :func:`team_draft_interleave` (Radlinski, Kurup & Joachims, CIKM 2008): the
  team with fewer picks so far (a coin flip when level) places its best
  remaining item.

Each shown item records which team placed it, the probability of that
placement, and the probability of that item in that slot given the items
above it (whichever team placed it); the slate records the probability of its
item list, so propensities can be logged for off-policy estimators.

Credit: :func:`credit` gives every click to the team that placed the item and
lets the team with more clicks win. :func:`marginalized_credit` is the
lower-variance estimator for probabilistic interleaving (Hofmann et al., TOIS
2013): it averages the outcome over every team assignment that could have
produced the shown list.

>>> import numpy as np
>>> slate = probabilistic_interleave(["a", "b", "c"], ["c", "b", "a"], 2, np.random.default_rng(0))
>>> len(slate.items), set(slate.teams) <= {"exploit", "explore"}
(2, True)
>>> credit(["exploit", "explore", "explore"], [True, False, True])
'tie'
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

Team = Literal["exploit", "explore"]
Winner = Literal["exploit", "explore", "tie"]
Method = Literal["probabilistic", "team_draft"]

EXPLOIT: Team = "exploit"
EXPLORE: Team = "explore"
_TEAMS: tuple[Team, Team] = (EXPLOIT, EXPLORE)


@dataclass(frozen=True, slots=True)
class InterleavedSlate:
    """One merged slate and what is needed to log it and credit its clicks.

    Attributes:
        method: ``"probabilistic"`` or ``"team_draft"``.
        items: the shown items, top first.
        teams: per shown item, the network that placed it (``"exploit"`` = W,
            ``"explore"`` = W̃).
        placement_probabilities: per shown item, the probability that this team
            placed this item in this slot, given everything placed before it.
        item_probabilities: per shown item, the probability that this item
            fills this slot given the items shown above it, whichever team
            placed it; the first is the item's marginal probability of being
            shown on top, and their product is ``slate_probability``.
        slate_probability: the probability of showing exactly ``items`` in this
            order, whichever teams placed them.
        explore_posteriors: probabilistic interleaving only (else ``None``):
            per shown item, the probability that W̃ placed it given the shown
            list — the input of :func:`marginalized_credit`.
    """

    method: Method
    items: tuple[Hashable, ...]
    teams: tuple[Team, ...]
    placement_probabilities: tuple[float, ...]
    item_probabilities: tuple[float, ...]
    slate_probability: float
    explore_posteriors: tuple[float, ...] | None

    @property
    def assignment_probability(self) -> float:
        """Probability of exactly these items placed by exactly these teams."""
        return math.prod(self.placement_probabilities)


@dataclass(frozen=True, slots=True)
class MarginalCredit:
    """Outcome of :func:`marginalized_credit`: win probabilities and the verdict."""

    p_explore: float
    p_exploit: float
    p_tie: float
    winner: Winner


def _check_rankings(
    exploit: Sequence[Hashable], explore: Sequence[Hashable], k: int
) -> tuple[tuple[Hashable, ...], tuple[Hashable, ...], int]:
    if k < 1:
        raise ValueError(f"slate size k must be >= 1, got {k}")
    rankings = (tuple(exploit), tuple(explore))
    for team, ranking in zip(_TEAMS, rankings, strict=True):
        if len(set(ranking)) != len(ranking):
            raise ValueError(f"the {team} ranking contains duplicate items")
    universe = set(rankings[0]) | set(rankings[1])
    if not universe:
        raise ValueError("both rankings are empty")
    return rankings[0], rankings[1], min(k, len(universe))


def probabilistic_interleave(
    exploit: Sequence[Hashable],
    explore: Sequence[Hashable],
    k: int,
    rng: np.random.Generator,
    *,
    tau: float = 3.0,
) -> InterleavedSlate:
    """Merge two rankings (best first) into a slate of ``k`` items by probabilistic interleaving.

    ``tau`` sharpens the rank softmax, P(d) ∝ rank(d)^−τ; Hofmann et al. use 3.
    Items may appear in only one ranking (the other team then never draws
    them); when one team has nothing left, the other places the rest.
    """
    if not np.isfinite(tau) or tau <= 0:
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    exploit_ranking, explore_ranking, n_slots = _check_rankings(exploit, explore, k)
    rankings = (exploit_ranking, explore_ranking)
    weights = [np.arange(1, len(r) + 1, dtype=np.float64) ** -tau for r in rankings]
    position = [{item: i for i, item in enumerate(r)} for r in rankings]
    items: list[Hashable] = []
    teams: list[Team] = []
    placements: list[float] = []
    item_probabilities: list[float] = []
    posteriors: list[float] = []
    for _ in range(n_slots):
        mass = [float(w.sum()) for w in weights]
        if mass[0] > 0 and mass[1] > 0:
            pick = (0.5, 0.5)
        else:
            pick = (1.0, 0.0) if mass[0] > 0 else (0.0, 1.0)
        t = 1 if rng.random() < pick[1] else 0
        cumulative = np.cumsum(weights[t])
        index = int(np.searchsorted(cumulative, rng.random() * mass[t], side="right"))
        # Guard the float edge u * mass == mass: fall back to the last live item.
        index = min(index, int(np.flatnonzero(weights[t])[-1]))
        item = rankings[t][index]
        drawn = [
            float(weights[s][position[s][item]]) / mass[s] if item in position[s] else 0.0
            for s in (0, 1)
        ]
        total = pick[0] * drawn[0] + pick[1] * drawn[1]
        items.append(item)
        teams.append(_TEAMS[t])
        placements.append(pick[t] * drawn[t])
        item_probabilities.append(total)
        posteriors.append(pick[1] * drawn[1] / total)
        for s in (0, 1):
            if item in position[s]:
                weights[s][position[s][item]] = 0.0
    return InterleavedSlate(
        method="probabilistic",
        items=tuple(items),
        teams=tuple(teams),
        placement_probabilities=tuple(placements),
        item_probabilities=tuple(item_probabilities),
        slate_probability=math.prod(item_probabilities),
        explore_posteriors=tuple(posteriors),
    )


def _draft_pick(counts: tuple[int, int], live: tuple[bool, bool]) -> tuple[float, float]:
    """Team-draft turn: the team with fewer picks goes, a coin decides when level."""
    if not live[0]:
        return (0.0, 1.0)
    if not live[1]:
        return (1.0, 0.0)
    if counts[0] == counts[1]:
        return (0.5, 0.5)
    return (1.0, 0.0) if counts[0] < counts[1] else (0.0, 1.0)


def team_draft_interleave(
    exploit: Sequence[Hashable],
    explore: Sequence[Hashable],
    k: int,
    rng: np.random.Generator,
) -> InterleavedSlate:
    """Merge two rankings (best first) into a slate of ``k`` items by team-draft interleaving."""
    exploit_ranking, explore_ranking, n_slots = _check_rankings(exploit, explore, k)
    rankings = (exploit_ranking, explore_ranking)
    placed: set[Hashable] = set()
    cursor = [0, 0]
    counts = [0, 0]
    items: list[Hashable] = []
    teams: list[Team] = []
    placements: list[float] = []
    tops_per_slot: list[tuple[Hashable | None, Hashable | None]] = []
    for _ in range(n_slots):
        for s in (0, 1):
            while cursor[s] < len(rankings[s]) and rankings[s][cursor[s]] in placed:
                cursor[s] += 1
        tops = tuple(
            rankings[s][cursor[s]] if cursor[s] < len(rankings[s]) else None for s in (0, 1)
        )
        pick = _draft_pick((counts[0], counts[1]), (tops[0] is not None, tops[1] is not None))
        t = 1 if rng.random() < pick[1] else 0
        item = tops[t]
        items.append(item)
        teams.append(_TEAMS[t])
        placements.append(pick[t])
        tops_per_slot.append((tops[0], tops[1]))
        placed.add(item)
        counts[t] += 1
    prefixes = _team_draft_prefix_probabilities(items, tops_per_slot)
    return InterleavedSlate(
        method="team_draft",
        items=tuple(items),
        teams=tuple(teams),
        placement_probabilities=tuple(placements),
        item_probabilities=tuple(
            now / before for now, before in zip(prefixes, (1.0, *prefixes[:-1]), strict=True)
        ),
        slate_probability=prefixes[-1],
        explore_posteriors=None,
    )


def _team_draft_prefix_probabilities(
    items: Sequence[Hashable], tops_per_slot: Sequence[tuple[Hashable | None, Hashable | None]]
) -> list[float]:
    """P(the first j items of the list), j = 1..k, under team-draft, over every pick history.

    Each team's best remaining item depends only on the items already shown,
    so a forward pass over "exploit picks so far" covers all histories.
    """
    prefixes: list[float] = []
    forward = {0: 1.0}
    for slot, (item, tops) in enumerate(zip(items, tops_per_slot, strict=True)):
        live = (tops[0] is not None, tops[1] is not None)
        step: dict[int, float] = {}
        for exploit_picks, p in forward.items():
            pick = _draft_pick((exploit_picks, slot - exploit_picks), live)
            if tops[0] == item and pick[0] > 0:
                step[exploit_picks + 1] = step.get(exploit_picks + 1, 0.0) + p * pick[0]
            if tops[1] == item and pick[1] > 0:
                step[exploit_picks] = step.get(exploit_picks, 0.0) + p * pick[1]
        forward = step
        prefixes.append(sum(forward.values()))
    return prefixes


def _check_feedback(n: int, clicked: Sequence[bool], what: str) -> None:
    if len(clicked) != n:
        raise ValueError(f"{what} has {n} entries but clicked has {len(clicked)}")


def credit(teams: Sequence[str], clicked: Sequence[bool]) -> Winner:
    """The team whose placed items got more clicks; ``"tie"`` when level (or no clicks)."""
    _check_feedback(len(teams), clicked, "teams")
    score = 0
    for team, click in zip(teams, clicked, strict=True):
        if team not in _TEAMS:
            raise ValueError(f"team must be 'exploit' or 'explore', got {team!r}")
        if click:
            score += 1 if team == EXPLORE else -1
    if score > 0:
        return EXPLORE
    return EXPLOIT if score < 0 else "tie"


def marginalized_credit(
    explore_posteriors: Sequence[float], clicked: Sequence[bool]
) -> MarginalCredit:
    """Expected verdict over all team assignments consistent with a probabilistic slate.

    Given the shown list, probabilistic interleaving's team assignments are
    independent per slot (``explore_posteriors`` from
    :attr:`InterleavedSlate.explore_posteriors`), so the number of clicks
    credited to W̃ is Poisson-binomial over the clicked slots. W̃ wins when it
    gets more than half of them. The verdict is the likelier of the two wins.
    """
    _check_feedback(len(explore_posteriors), clicked, "explore_posteriors")
    q = [float(p) for p, c in zip(explore_posteriors, clicked, strict=True) if c]
    if any(not 0.0 <= p <= 1.0 for p in explore_posteriors):
        raise ValueError("explore_posteriors must lie in [0, 1]")
    distribution = np.zeros(len(q) + 1)
    distribution[0] = 1.0
    for p in q:
        distribution[1:] = distribution[1:] * (1 - p) + distribution[:-1] * p
        distribution[0] *= 1 - p
    explore_clicks = np.arange(len(q) + 1)
    p_explore = float(distribution[2 * explore_clicks > len(q)].sum())
    p_exploit = float(distribution[2 * explore_clicks < len(q)].sum())
    p_tie = float(distribution[2 * explore_clicks == len(q)].sum())
    if p_explore > p_exploit:
        winner: Winner = EXPLORE
    elif p_exploit > p_explore:
        winner = EXPLOIT
    else:
        winner = "tie"
    return MarginalCredit(p_explore=p_explore, p_exploit=p_exploit, p_tie=p_tie, winner=winner)
