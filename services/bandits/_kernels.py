"""Numeric kernels under the learners: tie-breaking, row grouping, per-row quadratic forms.

Pure numpy functions with no learner state: :func:`top_k` ranks scores with random
tie-breaking, :func:`group_rows` and :func:`grouped_outer_sums` sum a batch's
statistics per arm, and :func:`arm_forms` evaluates ``x @ M`` for each row against
its arm's matrix, choosing among gathered, shared-context and per-arm products by
size. :class:`SlotRun` describes slots that fill a run of table rows, so those
products can read the rows as a view.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

#: Up to this many multiply-adds, per-row forms gather one matrix per row (fewest
#: calls); above it they are computed per arm or in chunks of this size.
_GATHER_LIMIT = 1 << 16
#: Large calls take the shared-context path when the (context, arm) pairs it computes
#: are at most this many times the rows asked for.
_SHARED_CONTEXT_DENSITY = 2
#: Large calls loop over arms only when arms average at least this many rows.
_MIN_ROWS_PER_ARM = 16
#: Batched updates sum statistics in blocks of this many rows, bounding the
#: (rows, d, d) temporary of outer products.
UPDATE_BLOCK = 4096
#: Outer products are summed with one matrix product per group when groups
#: average at least this many rows.
_MIN_ROWS_PER_GROUP = 2


def top_k(scores: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of the ``k`` highest scores along the last axis, ties broken at random.

    Works on one score vector or on a stack of them (one row per decision), so a
    batch of decisions is ranked in one call. Returns fewer than ``k`` indices
    when there are fewer candidates.

    >>> top_k(np.array([0.1, 0.9, 0.5]), 2, np.random.default_rng(0)).tolist()
    [1, 2]
    """
    if k < 0:
        raise ValueError(f"k must be non-negative, got {k}")
    scores = np.asarray(scores, dtype=np.float64)
    if k == 1 and scores.ndim == 1 and len(scores) > 0:
        # One decision with a unique best row, the common online case: no draw needed.
        best = int(scores.argmax())
        if np.count_nonzero(scores == scores[best]) == 1:
            return np.array([best])
    keys = rng.random(scores.shape)
    if k == 1 and scores.shape[-1] > 0:
        # One pick: choose uniformly among the tied maxima without a full sort.
        tied = scores == scores.max(axis=-1, keepdims=True)
        return np.where(tied, keys, -1.0).argmax(axis=-1)[..., None]
    return np.lexsort((keys, -scores), axis=-1)[..., :k]


def greedy_inclusion(scores: np.ndarray, k: int) -> np.ndarray:
    """Probability of each candidate being in the top ``k`` under random tie-breaking.

    1 above the k-th best score, 0 below it, and for the ``t`` candidates tied at
    the k-th score, the ``s`` top-k places left for them divided by ``t``.

    >>> greedy_inclusion(np.array([3.0, 1.0, 1.0, 1.0, 0.0]), k=2).tolist()
    [1.0, 0.3333333333333333, 0.3333333333333333, 0.3333333333333333, 0.0]
    """
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    above = scores > threshold
    tied = scores == threshold
    return np.where(above, 1.0, np.where(tied, (k - above.sum()) / tied.sum(), 0.0))


def sampled_inclusion(draws: np.ndarray, shown: np.ndarray, k: int) -> np.ndarray:
    """Monte Carlo probability of each candidate being in the top ``k`` of a random score.

    ``draws`` is an (M, n) matrix of M independent score draws, ``shown`` the
    draw the slate was actually built from. Each candidate's estimate counts
    the draws that put it in the top ``k`` (ties, which have probability 0 for
    continuous scores, count fractionally) over all M + 1 draws, the shown one
    included: a shown item's estimate is at least ``1 / (M + 1)``, never 0, and
    the estimate's standard deviation is at most ``0.5 / sqrt(M + 1)``.

    >>> draws = np.array([[0.9, 0.1, 0.5], [0.2, 0.8, 0.1], [0.7, 0.3, 0.6]])
    >>> sampled_inclusion(draws, np.array([0.9, 0.4, 0.1]), k=1).tolist()
    [0.75, 0.25, 0.0]
    """
    m, n = draws.shape
    k = min(k, n)
    if k == n:
        return np.ones(n)
    # Rank by column: the k-th largest of each draw is its threshold.
    threshold = np.partition(draws, n - k, axis=1)[:, n - k : n - k + 1]
    counts = np.count_nonzero(draws > threshold, axis=0).astype(np.float64)
    tied = draws == threshold
    if np.count_nonzero(tied) > m:  # ties beyond the threshold itself: split the places
        above = np.count_nonzero(draws > threshold, axis=1, keepdims=True)
        share = (k - above) / np.count_nonzero(tied, axis=1, keepdims=True)
        counts += (tied * share).sum(axis=0)
    else:
        counts += tied.sum(axis=0)
    return (counts + greedy_inclusion(shown, k)) / (m + 1)


def group_rows(slots: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows grouped by arm: ``(order, arms, starts)``.

    ``order`` sorts rows by slot, keeping event order within an arm; group ``g``
    is ``order[starts[g]:starts[g + 1]]`` and belongs to slot ``arms[g]``.
    """
    # int32 keys sort faster, and a table never holds 2**31 arms.
    order = np.argsort(slots.astype(np.int32), kind="stable")
    ordered = slots[order]
    starts = np.flatnonzero(np.concatenate([[True], ordered[1:] != ordered[:-1]]))
    return order, ordered[starts], starts


def grouped_outer_sums(x: np.ndarray, z: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``Σ x_i z_iᵀ`` over each group of consecutive rows; group ``g`` begins at ``starts[g]``.

    Groups of a few rows or more take one matrix product each, which costs far
    less than materialising every outer product; mostly single rows are summed
    from their outer products.
    """
    if len(x) < _MIN_ROWS_PER_GROUP * len(starts):
        return np.add.reduceat(x[:, :, None] * z[:, None, :], starts)
    ends = [*starts[1:].tolist(), len(x)]
    return np.stack([x[lo:hi].T @ z[lo:hi] for lo, hi in zip(starts.tolist(), ends, strict=True)])


def arm_forms(
    mats: np.ndarray, slots: np.ndarray, X: np.ndarray, run: SlotRun | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, with ``M = mats[slots[i]]`` of shape (d, m ≥ d) and ``x = X[i]``:
    the quadratic form ``x @ M[:, :d] @ x`` (n,) and the linear forms ``x @ M[:, d:]`` (n, m - d).

    ``M[:, :d]`` must be symmetric (it is ``A⁻¹``, or ``A⁻¹`` beside other terms):
    learners keep ``[A⁻¹ | …]`` per arm, so one product per row yields the
    exploration width and the means. Small calls gather one matrix per row.
    Large calls where consecutive rows share a context (a batch of decisions,
    each over a candidate set) take one matrix product over contexts × arms;
    other large calls with many rows per arm do one product per arm, and the
    rest gather in cache-sized chunks, so no call copies a matrix per row into
    one huge temporary. ``run``, when given, places ``slots`` on a run of table
    rows (:meth:`ArmTable.run_of`): small calls then read the matrices as a view
    and gather the rows of ``X`` instead, which are far smaller.
    """
    n, d = X.shape
    m = mats.shape[-1]
    if n * d * m <= _GATHER_LIMIT:
        return _gathered_forms(mats, slots, X, run)
    shared = _shared_context_forms(mats, slots, X)
    if shared is not None:
        return shared
    order, arms, starts = group_rows(slots)
    if len(arms) * _MIN_ROWS_PER_ARM > n:
        step = max(1, _GATHER_LIMIT // (d * m))
        parts = [
            _gathered_forms(mats, slots[i : i + step], X[i : i + step]) for i in range(0, n, step)
        ]
        return np.concatenate([q for q, _ in parts]), np.concatenate([lin for _, lin in parts])
    quadratic = np.empty(n)
    linear = np.empty((n, m - d))
    ends = [*starts[1:].tolist(), n]
    for arm, start, end in zip(arms.tolist(), starts.tolist(), ends, strict=True):
        rows = order[start:end]
        x = X[rows]
        products = x @ mats[arm]
        quadratic[rows] = row_dots(products[:, :d], x)
        linear[rows] = products[:, d:]
    return quadratic, linear


def _shared_context_forms(
    mats: np.ndarray, slots: np.ndarray, X: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Forms for a batch of decisions whose candidates share each decision's context.

    A decision's candidates are consecutive rows with the same features (the
    context is per request). Then all (context, arm) pairs come out of two
    matrix products, far cheaper than a product per row: the quadratic forms as
    ``vec(x xᵀ) · vec(M)`` over the upper triangle (``M[:, :d]`` is symmetric),
    the linear forms as ``contexts @ M[:, d:]``. Returns None when rows do not
    repeat that way.
    """
    n, d = X.shape
    m = mats.shape[-1]
    arms = np.flatnonzero(np.bincount(slots, minlength=len(mats)))
    runs = _context_runs(X, max_runs=_SHARED_CONTEXT_DENSITY * n // len(arms))
    if runs is None:
        return None
    contexts, context_of_row = runs
    rows, cols = np.triu_indices(d)
    off_diagonal = np.where(rows == cols, 1.0, 2.0)
    upper = mats[arms[:, None], rows, cols] * off_diagonal
    quadratic = (contexts[:, rows] * contexts[:, cols]) @ upper.T
    tails = mats[arms, :, d:].transpose(1, 0, 2).reshape(d, len(arms) * (m - d))
    linear = (contexts @ tails).reshape(len(contexts), len(arms), m - d)
    column = np.zeros(len(mats), dtype=np.intp)
    column[arms] = np.arange(len(arms))
    arm_of_row = column[slots]
    return quadratic[context_of_row, arm_of_row], linear[context_of_row, arm_of_row]


def _context_runs(X: np.ndarray, *, max_runs: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Runs of identical consecutive rows: ``(one row per run, run of each row)``.

    Returns None when there are more than ``max_runs`` runs. Candidate run
    boundaries come from a fixed random projection (equal rows always agree
    on it); runs of one common length, the usual fixed-size candidate set, are
    then verified in one comparison, and anything else is compared row by row.
    """
    n, d = X.shape
    signature = X @ _projection(d)
    changes = np.flatnonzero(signature[1:] != signature[:-1]) + 1
    if len(changes) >= max_runs:
        return None
    width = int(changes[0]) if len(changes) else n
    if n % width == 0 and np.array_equal(changes, np.arange(width, n, width)):
        runs = X.reshape(n // width, width, d)
        if (runs == runs[:, :1]).all():
            return X[::width], np.arange(n) // width
    first = np.concatenate([[True], (X[1:] != X[:-1]).any(axis=1)])
    if np.count_nonzero(first) > max_runs:
        return None
    return X[first], np.cumsum(first) - 1


@functools.cache
def _projection(d: int) -> np.ndarray:
    """A fixed random direction; it only proposes run boundaries, so it never alters a result."""
    return np.random.default_rng(0x5EED).standard_normal(d)


def _gathered_forms(
    mats: np.ndarray, slots: np.ndarray, X: np.ndarray, run: SlotRun | None = None
) -> tuple[np.ndarray, np.ndarray]:
    d = X.shape[1]
    if run is None:
        rows = mats.take(slots, axis=0)
    else:
        rows = mats[run.rows]
        if run.by_slot is not None:
            X = X.take(run.by_slot, axis=0)
    products = np.matmul(X[:, None, :], rows)[:, 0, :]
    quadratic, linear = row_dots(products[:, :d], X), products[:, d:]
    if run is not None and run.rank is not None:
        return quadratic[run.rank], linear[run.rank]
    return quadratic, linear


def row_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise dot products of two (n, d) real arrays."""
    return np.vecdot(a, b)


@dataclasses.dataclass(frozen=True)
class SlotRun:
    """Slots that are table rows ``rows``, each exactly once, in any order.

    ``by_slot`` lists the positions of the slots in slot order, and ``rank[i]`` is
    slot ``i``'s place in the run; both are None when the slots are in order.
    """

    rows: slice
    by_slot: np.ndarray | None
    rank: np.ndarray | None


def slot_run(slots: np.ndarray) -> SlotRun | None:
    """``slots`` as a :class:`SlotRun`, or None if they are not one run of rows, each once."""
    n = len(slots)
    start = int(slots.min())
    if int(slots.max()) - start + 1 != n:
        return None
    rank = slots - start
    by_slot = np.argsort(rank)
    in_run = np.arange(n)
    if not np.array_equal(rank[by_slot], in_run):
        return None  # a repeated slot leaves a gap elsewhere
    if np.array_equal(by_slot, in_run):
        return SlotRun(slice(start, start + n), None, None)
    return SlotRun(slice(start, start + n), by_slot, rank)
