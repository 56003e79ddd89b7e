"""Interleaving: fairness between identical rankers, sensitivity to a better one, propensities."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from services.drn.interleaving import (
    InterleavedSlate,
    credit,
    marginalized_credit,
    probabilistic_interleave,
    team_draft_interleave,
)

N_CANDIDATES = 20
SLATE = 10
# Position bias of a cascade-free examination model: the top slot is looked at most.
EXAMINE = 1.0 / (1.0 + np.arange(SLATE))

Interleave = Callable[..., InterleavedSlate]
METHODS = [
    pytest.param(probabilistic_interleave, id="probabilistic"),
    pytest.param(team_draft_interleave, id="team_draft"),
]


def _simulate(
    interleave: Interleave, n_slates: int, *, explore_better: bool, seed: int
) -> tuple[np.ndarray, np.ndarray, Counter[str], Counter[str]]:
    """Per slate: clicks credited to W̃, all clicks; verdict counts (standard, marginalised)."""
    rng = np.random.default_rng(seed)
    explore_clicks = np.zeros(n_slates)
    all_clicks = np.zeros(n_slates)
    verdicts: Counter[str] = Counter()
    marginal: Counter[str] = Counter()
    for s in range(n_slates):
        attractiveness = rng.uniform(0.1, 0.9, size=N_CANDIDATES)
        if explore_better:
            explore = list(np.argsort(-attractiveness))
            exploit = explore[::-1]
        else:
            exploit = explore = list(rng.permutation(N_CANDIDATES))
        slate = interleave(exploit, explore, SLATE, rng)
        shown = np.asarray(slate.items)
        clicked = rng.random(len(shown)) < EXAMINE[: len(shown)] * attractiveness[shown]
        by_explore = np.asarray(slate.teams) == "explore"
        explore_clicks[s] = (clicked & by_explore).sum()
        all_clicks[s] = clicked.sum()
        verdicts[credit(slate.teams, list(clicked))] += 1
        if slate.explore_posteriors is not None:
            marginal[marginalized_credit(slate.explore_posteriors, list(clicked)).winner] += 1
    return explore_clicks, all_clicks, verdicts, marginal


def _share_ci(explore_clicks: np.ndarray, all_clicks: np.ndarray) -> tuple[float, float]:
    """95% CI of W̃'s share of credited clicks, with slates as clusters (clicks within
    one slate are not independent)."""
    total = all_clicks.sum()
    share = explore_clicks.sum() / total
    se = math.sqrt(((explore_clicks - share * all_clicks) ** 2).sum()) / total
    return share - 1.96 * se, share + 1.96 * se


@pytest.mark.slow
@pytest.mark.parametrize("interleave", METHODS)
def test_identical_rankers_split_clicks_evenly(interleave: Interleave) -> None:
    explore_clicks, all_clicks, verdicts, _ = _simulate(
        interleave, 20_000, explore_better=False, seed=11
    )
    low, high = _share_ci(explore_clicks, all_clicks)
    assert low < 0.5 < high
    assert high - low < 0.03  # enough slates for the CI to mean something
    decided = verdicts["explore"] + verdicts["exploit"]
    z = (verdicts["explore"] - decided / 2) / math.sqrt(decided / 4)
    assert abs(z) < 1.96


def test_marginalized_credit_never_prefers_an_identical_ranker() -> None:
    # With identical rankings every placement is equally likely to be either
    # team's, so the marginalised outcome is exactly even: always a tie.
    *_, marginal = _simulate(probabilistic_interleave, 2_000, explore_better=False, seed=5)
    assert marginal == Counter({"tie": 2_000})


@pytest.mark.parametrize("interleave", METHODS)
def test_better_explore_ranker_wins(interleave: Interleave) -> None:
    explore_clicks, all_clicks, verdicts, marginal = _simulate(
        interleave, 3_000, explore_better=True, seed=3
    )
    low, _ = _share_ci(explore_clicks, all_clicks)
    assert low > 0.6
    decided = verdicts["explore"] + verdicts["exploit"]
    z = (verdicts["explore"] - decided / 2) / math.sqrt(decided / 4)
    assert z > 5
    if marginal:
        assert marginal["explore"] > 3 * marginal["exploit"]


@pytest.mark.parametrize("interleave", METHODS)
def test_logged_probabilities_match_empirical_frequencies(interleave: Interleave) -> None:
    rng = np.random.default_rng(0)
    exploit, explore = ["a", "b", "c", "d"], ["c", "a", "d", "b"]
    n = 40_000
    lists: Counter[tuple] = Counter()
    assignments: Counter[tuple] = Counter()
    logged_list: dict[tuple, float] = {}
    logged_assignment: dict[tuple, float] = {}
    for _ in range(n):
        slate = interleave(exploit, explore, 2, rng)
        key = (slate.items, slate.teams)
        lists[slate.items] += 1
        assignments[key] += 1
        logged_list[slate.items] = slate.slate_probability
        logged_assignment[key] = slate.assignment_probability
    assert sum(logged_list.values()) == pytest.approx(1.0)
    assert sum(logged_assignment.values()) == pytest.approx(1.0)
    for items, count in lists.items():
        p = logged_list[items]
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9
    for key, count in assignments.items():
        p = logged_assignment[key]
        assert abs(count / n - p) < 4 * math.sqrt(p * (1 - p) / n) + 1e-9


def test_probabilistic_placement_and_posterior_values() -> None:
    tau = 3.0
    slate = probabilistic_interleave(["a", "b"], ["b", "a"], 1, np.random.default_rng(1), tau=tau)
    top, second = 1.0, 2.0**-tau
    p_top = top / (top + second)
    # Either team draws its own top item with p_top, the other's with 1 - p_top.
    assert slate.slate_probability == pytest.approx(0.5 * p_top + 0.5 * (1 - p_top))
    own_top = slate.items[0] == ("a" if slate.teams[0] == "exploit" else "b")
    assert slate.placement_probabilities[0] == pytest.approx(
        0.5 * (p_top if own_top else 1 - p_top)
    )
    expected_posterior = p_top if slate.items[0] == "b" else 1 - p_top
    assert slate.explore_posteriors == (pytest.approx(expected_posterior),)


def test_items_in_only_one_ranking_and_exhausted_team() -> None:
    rng = np.random.default_rng(2)
    for interleave in (probabilistic_interleave, team_draft_interleave):
        slate = interleave(["a"], ["b", "c", "d"], 10, rng)
        assert sorted(slate.items) == ["a", "b", "c", "d"]
        # Once "a" is placed the exploit team has nothing left.
        after_a = slate.items.index("a") + 1
        assert all(t == "explore" for t in slate.teams[after_a:])
        # The team turn is forced then; team-draft's pick is too, and the last
        # item left is certain under either method.
        if interleave is team_draft_interleave:
            assert all(p == 1.0 for p in slate.placement_probabilities[after_a:])
        assert slate.placement_probabilities[-1] == pytest.approx(1.0)


def test_team_draft_keeps_teams_balanced() -> None:
    rng = np.random.default_rng(4)
    for _ in range(200):
        slate = team_draft_interleave(list(rng.permutation(15)), list(rng.permutation(15)), 9, rng)
        for prefix in range(1, len(slate.teams) + 1):
            counts = Counter(slate.teams[:prefix])
            assert abs(counts["explore"] - counts["exploit"]) <= 1


def test_slate_is_deterministic_for_a_seed() -> None:
    first = probabilistic_interleave(range(30), range(29, -1, -1), 8, np.random.default_rng(9))
    again = probabilistic_interleave(range(30), range(29, -1, -1), 8, np.random.default_rng(9))
    assert first == again
    assert len(set(first.items)) == 8


def test_credit_counts_clicks_per_team() -> None:
    assert credit(["exploit", "explore", "explore"], [True, True, True]) == "explore"
    assert credit(["exploit", "explore", "exploit"], [True, False, False]) == "exploit"
    assert credit(["exploit", "explore"], [True, True]) == "tie"
    assert credit(["exploit", "explore"], [False, False]) == "tie"


def test_marginalized_credit_poisson_binomial() -> None:
    # Two clicked slots, W̃ placed them with probability 0.5 and 1.0: W̃ gets both
    # clicks half the time (win) and one click otherwise (tie).
    outcome = marginalized_credit([0.5, 1.0, 0.2], [True, True, False])
    assert (outcome.p_explore, outcome.p_tie, outcome.p_exploit) == pytest.approx((0.5, 0.5, 0.0))
    assert outcome.winner == "explore"
    assert marginalized_credit([0.3], [False]).winner == "tie"
    assert marginalized_credit([0.1, 0.2], [True, True]).winner == "exploit"


def test_invalid_input_is_rejected() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="duplicate"):
        probabilistic_interleave(["a", "a"], ["a"], 2, rng)
    with pytest.raises(ValueError, match="k must be >= 1"):
        team_draft_interleave(["a"], ["a"], 0, rng)
    with pytest.raises(ValueError, match="tau"):
        probabilistic_interleave(["a"], ["a"], 1, rng, tau=0.0)
    with pytest.raises(ValueError, match="both rankings are empty"):
        team_draft_interleave([], [], 3, rng)
    with pytest.raises(ValueError, match="team must be"):
        credit(["W"], [True])
    with pytest.raises(ValueError, match="clicked has 1"):
        credit(["explore", "exploit"], [True])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        marginalized_credit([1.5], [True])
