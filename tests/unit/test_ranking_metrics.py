"""Ranking and online metrics against hand-computed values and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from services.evaluation.metrics import (
    auc,
    ctr,
    cumulative_regret,
    interleaving_win_rate,
    ndcg_at_k,
    recall_at_k,
)


def test_ndcg_binary_by_hand() -> None:
    # DCG = 1/log2(2) + 1/log2(4) = 1.5; IDCG = 1 + 1/log2(3).
    expected = 1.5 / (1 + 1 / math.log2(3))
    assert ndcg_at_k(["a", "b", "c"], {"a", "c"}, k=3) == pytest.approx(expected)
    assert ndcg_at_k(["a", "c", "b"], {"a", "c"}, k=3) == 1.0
    assert ndcg_at_k(["b", "d"], {"a", "c"}, k=2) == 0.0


def test_ndcg_graded_and_truncated_by_hand() -> None:
    gains = {"a": 3.0, "b": 2.0, "c": 1.0}
    # Ranked c, b, a: DCG = 1 + 2/log2(3) + 3/2; IDCG = 3 + 2/log2(3) + 1/2.
    dcg = 1 + 2 / math.log2(3) + 1.5
    idcg = 3 + 2 / math.log2(3) + 0.5
    assert ndcg_at_k(["c", "b", "a"], gains, k=3) == pytest.approx(dcg / idcg)
    # At k=1 only the first item counts against the single best gain.
    assert ndcg_at_k(["c", "b", "a"], gains, k=1) == pytest.approx(1 / 3)
    # Relevant items beyond k do not raise the ideal above k positions.
    assert ndcg_at_k(["a", "x"], {"a", "b", "c"}, k=2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_ndcg_with_k_longer_than_the_ranking() -> None:
    assert ndcg_at_k(["a"], {"a", "b"}, k=10) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_recall_by_hand() -> None:
    assert recall_at_k(["a", "b", "c", "d"], {"b", "d", "e"}, k=2) == pytest.approx(1 / 3)
    assert recall_at_k(["a", "b", "c", "d"], {"b", "d", "e"}, k=4) == pytest.approx(2 / 3)
    assert recall_at_k(["a", "b"], ["a"], k=1) == 1.0
    assert recall_at_k([], {"a"}, k=5) == 0.0


@pytest.mark.parametrize("metric", [ndcg_at_k, recall_at_k])
def test_undefined_rankings_are_refused(metric) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValueError, match="no relevant items"):
        metric(["a"], set(), k=3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        metric(["a"], {"a"}, k=0)


def test_auc_by_hand() -> None:
    # Pairs (pos, neg): (0.35 > 0.1) yes, (0.35 > 0.4) no, (0.8 > both) yes, yes -> 3/4.
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert auc([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 1.0
    assert auc([1, 0], [0.1, 0.9]) == 0.0
    # Ties count one half: pos 0.5 vs negs 0.5 (1/2) and 0.2 (1) -> 1.5 / 2.
    assert auc([1, 0, 0], [0.5, 0.5, 0.2]) == 0.75
    assert auc([1, 1, 0, 0], [0.3, 0.3, 0.3, 0.3]) == 0.5


def test_auc_matches_pair_counting_with_ties() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 8, size=60).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p, q in itertools.product(pos, neg))
    assert auc(labels, scores) == pytest.approx(wins / (len(pos) * len(neg)))


def test_auc_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="at least one positive and one negative"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc([0, 2], [0.2, 0.3])
    with pytest.raises(ValueError, match="equal length"):
        auc([0, 1], [0.2])


def test_ctr_and_regret() -> None:
    assert ctr([0, 1, 1, 0, 0]) == 0.4
    assert ctr(np.array([2, 0]), impressions=10) == 0.2
    with pytest.raises(ValueError, match="at least one impression"):
        ctr([])
    np.testing.assert_allclose(cumulative_regret([1.0, 2.0, 2.0], [1.0, 1.5, 0.0]), [0, 0.5, 2.5])
    with pytest.raises(ValueError, match="equal length"):
        cumulative_regret([1.0], [1.0, 2.0])


def test_interleaving_win_rate_by_hand() -> None:
    # 8 wins for A, 2 for B, 3 ties. Wilson 95% interval for 8/10 is (0.4902, 0.9433).
    a = [1] * 8 + [0] * 2 + [1, 0, 2]
    b = [0] * 8 + [1] * 2 + [1, 0, 2]
    win = interleaving_win_rate(a, b)
    assert (win.wins_a, win.wins_b, win.ties) == (8, 2, 3)
    assert win.rate == 0.8
    assert win.ci_low == pytest.approx(0.4902, abs=1e-4)
    assert win.ci_high == pytest.approx(0.9433, abs=1e-4)


def test_interleaving_win_rate_edges() -> None:
    tied = interleaving_win_rate([0, 1], [0, 1])
    assert (tied.rate, tied.ci_low, tied.ci_high, tied.ties) == (0.5, 0.0, 1.0, 2)
    sweep = interleaving_win_rate([1] * 50, [0] * 50)
    assert sweep.rate == 1.0 and sweep.ci_high == 1.0 and 0.9 < sweep.ci_low < 1.0
    wide = interleaving_win_rate([1] * 8 + [0] * 2, [0] * 8 + [1] * 2, level=0.99)
    assert wide.ci_low < 0.4902
    with pytest.raises(ValueError, match="level must be in"):
        interleaving_win_rate([1], [0], level=1.5)
