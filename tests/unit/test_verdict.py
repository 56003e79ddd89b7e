"""The honest verdict: a policy beats random only when its Wilson interval is above random's."""

from __future__ import annotations

import pytest

from services.common.intervals import wilson
from services.evaluation.verdict import report, verdicts


def test_wilson_matches_a_hand_computed_interval() -> None:
    # p = 0.5, n = 100, z = 1.959964: centre 0.5, half = z/(1+z²/n)·sqrt(0.0025 + z²/(4n²)).
    low, high = wilson(50, 100)
    assert low == pytest.approx(0.40383, abs=1e-5)
    assert high == pytest.approx(0.59617, abs=1e-5)
    assert wilson(0, 0) == (0.0, 1.0)
    assert wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="successes <= trials"):
        wilson(3, 2)


def test_the_measured_demo_example_is_not_a_win() -> None:
    # ts_beta 0.061 against random's 0.060 on a few hundred requests (5 items each).
    _, rows = verdicts({"random": (90, 1500), "ts_beta": (92, 1500)})
    assert [v.outcome for v in rows] == ["not distinguishable yet"]
    assert rows[0].ci_low < 0.061 < rows[0].ci_high


def test_a_clear_difference_is_a_win_and_a_loss_both_ways() -> None:
    (_, _, random_high), rows = verdicts(
        {"random": (600, 10_000), "linucb": (800, 10_000), "bad": (400, 10_000)}
    )
    outcomes = {v.policy: v.outcome for v in rows}
    assert outcomes == {"linucb": "beats random", "bad": "trails random"}
    assert next(v for v in rows if v.policy == "linucb").ci_low > random_high


def test_the_boundary_between_win_and_noise() -> None:
    # Random 600/10000 has upper bound ~0.0652; the smallest winning count is where the
    # policy's lower bound passes it.
    _, random_high = wilson(600, 10_000)
    wins = [c for c in range(600, 800) if wilson(c, 10_000)[0] > random_high]
    first = wins[0]
    below = verdicts({"random": (600, 10_000), "p": (first - 1, 10_000)})[1][0]
    above = verdicts({"random": (600, 10_000), "p": (first, 10_000)})[1][0]
    assert below.outcome == "not distinguishable yet"
    assert above.outcome == "beats random"


def test_no_data_is_never_a_win() -> None:
    _, rows = verdicts({"random": (0, 0), "linucb": (10, 10)})
    assert rows[0].outcome == "not distinguishable yet"


def test_report_prints_the_rule_and_every_interval() -> None:
    lines = report({"random": (90, 1500), "ts_beta": (92, 1500)})
    assert lines[0].startswith("0 of 1 learning policies beat random")
    assert "95% Wilson" in lines[0]
    assert lines[1].strip().startswith("random 0.060 [")
    assert lines[2].strip().startswith("ts_beta 0.061 [") and "not distinguishable yet" in lines[2]


def test_a_missing_baseline_is_an_error() -> None:
    with pytest.raises(ValueError, match="no 'random'"):
        verdicts({"linucb": (1, 10)})
