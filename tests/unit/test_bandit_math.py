"""The shared pieces under every learner: tie-breaking, the arm table, per-row products."""

from __future__ import annotations

import numpy as np
import pytest

from services.bandits._kernels import (
    _context_runs,
    _shared_context_forms,
    arm_forms,
    group_rows,
    grouped_outer_sums,
    row_dots,
    top_k,
)
from services.bandits.base import ArmTable


def test_top_k_orders_by_score_along_the_last_axis():
    rng = np.random.default_rng(0)
    scores = np.array([[0.1, 0.7, 0.3, 0.9], [5.0, -1.0, 2.0, 4.0]])
    assert top_k(scores, 2, rng).tolist() == [[3, 1], [0, 3]]
    assert top_k(scores, 1, rng).tolist() == [[3], [0]]
    assert top_k(scores[0], 10, rng).tolist() == [3, 1, 2, 0]
    assert top_k(np.empty(0), 1, rng).shape == (0,)
    with pytest.raises(ValueError, match="non-negative"):
        top_k(scores, -1, rng)


@pytest.mark.parametrize("k", [1, 2])
def test_top_k_breaks_ties_uniformly(k):
    rng = np.random.default_rng(1)
    scores = np.tile([1.0, 3.0, 3.0, 3.0, 0.0], (6_000, 1))
    picks = top_k(scores, k, rng)[:, 0]
    counts = np.bincount(picks, minlength=5)
    assert counts[0] == counts[4] == 0
    np.testing.assert_allclose(counts[1:4] / 6_000, 1 / 3, atol=0.03)


def test_arm_table_grows_and_keeps_rows():
    table = ArmTable({"value": np.full(2, -1.0)}, capacity=2)
    first = table.ensure(np.array([40, 10], dtype=np.int64))
    table.arrays["value"][first] = [[4.0, 4.0], [1.0, 1.0]]
    more = np.arange(100, 150, dtype=np.int64)
    table.ensure(more)
    assert len(table) == 52
    slots = table.lookup(np.array([10, 40, 120, 7], dtype=np.int64))
    assert slots[-1] == 0
    values = table.arrays["value"][slots]
    assert values.tolist() == [[1.0, 1.0], [4.0, 4.0], [-1.0, -1.0], [-1.0, -1.0]]
    assert sorted(table.labels.tolist()) == sorted([10, 40, *more.tolist()])


def test_group_rows_keeps_event_order_within_each_arm():
    slots = np.array([3, 1, 3, 2, 1, 3])
    order, arms, starts = group_rows(slots)
    assert arms.tolist() == [1, 2, 3]
    assert starts.tolist() == [0, 2, 3]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]


@pytest.mark.parametrize("n_groups", [3, 40], ids=["matrix-products", "outer-products"])
def test_grouped_outer_sums_sum_each_group(n_groups):
    """Few groups of many rows take one product per group, many small groups the outer
    products; both give the per-group sums."""
    rng = np.random.default_rng(n_groups)
    x, z = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
    starts = np.sort(rng.choice(np.arange(1, 50), size=n_groups - 1, replace=False))
    starts = np.concatenate([[0], starts])
    ends = [*starts[1:], 50]
    expected = [
        sum(np.outer(x[i], z[i]) for i in range(lo, hi))
        for lo, hi in zip(starts, ends, strict=True)
    ]
    np.testing.assert_allclose(grouped_outer_sums(x, z, starts), expected, rtol=1e-12)


@pytest.mark.parametrize(
    ("n_rows", "n_arms", "shared"),
    [(20, 30, False), (3_000, 30, False), (3_000, 2_000, False), (3_000, 40, True)],
    ids=["gathered", "per-arm", "chunked", "shared-context"],
)
def test_arm_forms_agree_with_a_direct_computation(n_rows, n_arms, shared):
    rng = np.random.default_rng(n_rows + n_arms)
    d, m = 8, 11
    mats = rng.normal(size=(n_arms, d, m))
    mats[:, :, :d] += np.swapaxes(mats[:, :, :d], 1, 2)  # the quadratic part is symmetric
    if shared:
        # 100 decisions over 30 candidates each (a random subset per decision), every
        # decision's candidates sharing its context.
        slots = np.concatenate([rng.choice(n_arms, size=30, replace=False) for _ in range(100)])
        X = np.repeat(rng.normal(size=(100, d)), 30, axis=0)
    else:
        slots = rng.integers(0, n_arms, size=n_rows)
        X = rng.normal(size=(n_rows, d))
    # The batch takes the contexts x arms path exactly when its rows share contexts.
    assert (_shared_context_forms(mats, slots, X) is not None) == shared
    products = np.einsum("nd,ndm->nm", X, mats[slots])
    quadratic, linear = arm_forms(mats, slots, X)
    np.testing.assert_allclose(quadratic, row_dots(products[:, :d], X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(linear, products[:, d:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("labels", "candidates", "kind"),
    [
        ([5, 6, 7, 8], [5, 6, 7, 8], "in order"),
        ([5, 6, 7, 8], [7, 5, 8, 6], "permuted"),
        ([5, 6, 7, 8], [6, 9, 5], "with the prior row"),
        ([5, 6, 7, 8], [6, 6, 7], "repeated"),
        ([5, 6, 7, 8], [5, 7, 8], "gap"),
    ],
)
def test_lookups_on_a_run_of_rows_read_views_with_the_same_results(labels, candidates, kind):
    """A candidate set that covers a run of table rows, in any order, is read from a view
    of the matrices (gathering X instead); every other set is gathered. Both agree."""
    table = ArmTable({"mats": np.zeros((3, 5))})
    table.ensure(np.array(labels, dtype=np.int64))
    rng = np.random.default_rng(len(candidates))
    mats = table.arrays["mats"]
    mats[:] = rng.normal(size=mats.shape)
    mats[:, :, :3] += np.swapaxes(mats[:, :, :3], 1, 2)
    slots = table.lookup(np.array(candidates, dtype=np.int64))
    run = table.run_of(slots)
    is_run = kind in ("in order", "permuted", "with the prior row")
    assert (run is not None) == is_run
    if run is not None:
        assert (run.rank is None) == (kind == "in order")
    X = rng.normal(size=(len(candidates), 3))
    expected = arm_forms(mats, slots, X)
    found = arm_forms(mats, slots, X, run)
    np.testing.assert_allclose(found[0], expected[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(found[1], expected[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sizes", [[4, 4, 4], [3, 5, 1, 2]], ids=["regular", "irregular"])
def test_context_runs_find_repeated_rows(sizes):
    rng = np.random.default_rng(3)
    contexts = rng.normal(size=(len(sizes), 6))
    X = np.repeat(contexts, sizes, axis=0)
    found, run_of_row = _context_runs(X, max_runs=len(sizes))
    np.testing.assert_array_equal(found, contexts)
    assert run_of_row.tolist() == np.repeat(np.arange(len(sizes)), sizes).tolist()
    assert _context_runs(X, max_runs=len(sizes) - 1) is None


def test_context_runs_compare_whole_rows():
    """Rows equal in some columns but not all are separate runs."""
    X = np.ones((6, 3))
    X[3:, 2] = 2.0
    found, run_of_row = _context_runs(X, max_runs=6)
    assert found.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 2.0]]
    assert run_of_row.tolist() == [0, 0, 0, 1, 1, 1]
