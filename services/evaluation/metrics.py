"""Recommender metrics: CTR, cumulative regret, AUC, nDCG@k, recall@k, interleaving.

Each takes plain arrays or sequences and returns plain numbers, so the same code
scores a simulation, a replayed log and a test's hand-computed example.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from services.common.intervals import wilson


def ctr(clicks: np.ndarray | Sequence[float], impressions: int | None = None) -> float:
    """Click-through rate: clicks per impression.

    ``clicks`` holds one 0/1 (or count) per impression unless ``impressions``
    says how many impressions the counts are spread over.

    >>> ctr([1, 0, 0, 1])
    0.5
    >>> ctr([3, 1], impressions=10)
    0.4
    """
    clicks = np.asarray(clicks, dtype=np.float64)
    n = clicks.size if impressions is None else impressions
    if n <= 0:
        raise ValueError("ctr needs at least one impression")
    return float(clicks.sum() / n)


def cumulative_regret(
    best: np.ndarray | Sequence[float], obtained: np.ndarray | Sequence[float]
) -> np.ndarray:
    """Running sum of ``best - obtained`` per step (expected, i.e. pseudo-regret).

    >>> cumulative_regret([1.0, 1.0, 0.5], [0.5, 1.0, 0.0]).tolist()
    [0.5, 0.5, 1.0]
    """
    best = np.asarray(best, dtype=np.float64)
    obtained = np.asarray(obtained, dtype=np.float64)
    if best.shape != obtained.shape or best.ndim != 1:
        raise ValueError(
            f"best and obtained must be 1-d of equal length, got {best.shape} and {obtained.shape}"
        )
    return np.cumsum(best - obtained)


def auc(labels: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float]) -> float:
    """Area under the ROC curve from ranks (Mann-Whitney U); tied scores count 1/2.

    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
    >>> auc([0, 1], [0.5, 0.5])
    0.5
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-d of equal length, got {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("auc needs at least one positive and one negative label")
    ranks = _average_ranks(scores)
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    mean_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _gains(relevant: Mapping[Hashable, float] | Collection[Hashable]) -> Mapping[Hashable, float]:
    gains = relevant if isinstance(relevant, Mapping) else dict.fromkeys(relevant, 1.0)
    if not any(g > 0 for g in gains.values()):
        raise ValueError("no relevant items: the metric is undefined")
    return gains


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


def ndcg_at_k(
    ranked: Sequence[Hashable],
    relevant: Mapping[Hashable, float] | Collection[Hashable],
    k: int,
) -> float:
    """Normalised discounted cumulative gain of the first ``k`` of ``ranked``.

    ``relevant`` is a set (binary gains) or a mapping item -> graded gain.
    DCG = sum of ``gain / log2(rank + 1)`` over 1-based ranks; the ideal DCG puts
    the largest gains first.

    >>> ndcg_at_k(["a", "b", "c"], {"b"}, k=3)  # 1/log2(3)
    0.6309297535714575
    >>> ndcg_at_k(["a", "b"], {"a": 3.0, "b": 1.0}, k=2)
    1.0
    """
    _check_k(k)
    gains = _gains(relevant)
    dcg = sum(gains.get(item, 0.0) / math.log2(rank + 2) for rank, item in enumerate(ranked[:k]))
    ideal = sorted((g for g in gains.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 2) for rank, g in enumerate(ideal))
    return dcg / idcg


def recall_at_k(ranked: Sequence[Hashable], relevant: Collection[Hashable], k: int) -> float:
    """Fraction of the relevant items found in the first ``k`` of ``ranked``.

    >>> recall_at_k(["a", "b", "c", "d"], {"b", "d", "e"}, k=2)
    0.3333333333333333
    """
    _check_k(k)
    relevant = set(relevant)
    if not relevant:
        raise ValueError("no relevant items: the metric is undefined")
    return len(relevant.intersection(ranked[:k])) / len(relevant)


@dataclass(frozen=True)
class WinRate:
    """How often ranker A beat ranker B in interleaved impressions, with a CI.

    ``rate`` is wins_a / (wins_a + wins_b), ties excluded; the interval is the
    Wilson score interval at the requested level.
    """

    rate: float
    ci_low: float
    ci_high: float
    wins_a: int
    wins_b: int
    ties: int


def interleaving_win_rate(
    credit_a: np.ndarray | Sequence[float],
    credit_b: np.ndarray | Sequence[float],
    *,
    level: float = 0.95,
) -> WinRate:
    """Win rate of A over B from per-impression credits (e.g. clicks on each team's items).

    An impression is a win for whichever team got more credit, a tie otherwise.
    With no decisive impression the rate is 0.5 with the interval [0, 1].

    >>> w = interleaving_win_rate([1, 1, 0, 2, 0], [0, 1, 1, 0, 0])
    >>> (w.wins_a, w.wins_b, w.ties, round(w.rate, 4))
    (2, 1, 2, 0.6667)
    """
    a = np.asarray(credit_a, dtype=np.float64)
    b = np.asarray(credit_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"credit_a and credit_b must be 1-d of equal length, got {a.shape} and {b.shape}"
        )
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    wins_a, wins_b = int(np.sum(a > b)), int(np.sum(b > a))
    ties = a.size - wins_a - wins_b
    n = wins_a + wins_b
    if n == 0:
        return WinRate(0.5, 0.0, 1.0, 0, 0, ties)
    low, high = wilson(wins_a, n, level)
    return WinRate(wins_a / n, low, high, wins_a, wins_b, ties)
