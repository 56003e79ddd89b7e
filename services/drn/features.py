"""State and action feature vectors for DRN, from plain arrays.

DRN (Zheng et al., WWW 2018, §4.1) describes a request by user features and
context features (the state) and each candidate by item features and
user-item features (the action). These builders are pure numpy: the DRN
service fetches the user's click sequence (Redis) and item embeddings (the
faiss index) and hands them over as arrays. Anything missing — a cold user, an
item without an embedding, an unknown publish time, no request context —
becomes zeros plus an indicator column, never an error. Malformed input (wrong
shapes, NaN embeddings) is a bug in the caller and raises ``ValueError``.

State layout (``d`` = embedding dim, ``W`` = number of windows, ``C`` = context floats):

============================  =====  ===========================================
block                         width  meaning
============================  =====  ===========================================
``mean_w{i}_{j}``             W·d    mean embedding of known clicked items in window i
``log_clicks_w{i}``           W      log1p(clicks in window i), known or not
``recency_w{i}``              W      exp(−age of latest click / window), 0 if none
``cold_user``                 1      1 if no clicked item has an embedding
``tod_sin``, ``tod_cos``      2      time of day on the unit circle
``weekday_{0..6}``            7      one-hot weekday, Monday = 0
``context_{j}``               C      request context floats
``context_missing``           1      1 if no context was given
============================  =====  ===========================================

Action layout:

============================  =====  ===========================================
``item_{j}``                  d      item embedding
``item_unknown``              1      1 if the item has no embedding
``log_popularity_w{i}``       W      log1p(clicks on the item in window i)
``freshness``                 1      exp(−age / freshness scale), 0 if unknown
``log_age_hours``             1      log1p(age in hours), 0 if unknown
``age_unknown``               1      1 if the publish time is unknown
``max_cos_recent``            1      max cosine to the user's recent items
``mean_cos_recent``           1      mean cosine to the user's recent items
``cos_mean_w{i}``             W      cosine to the user's window-i mean embedding
``similarity_unknown``        1      1 if no known recent click or no item vector
============================  =====  ===========================================

Times are unix seconds; windows are look-backs from the request time ``now``.

>>> import numpy as np
>>> layout = FeatureLayout(embedding_dim=2, n_context=1)
>>> vectors, known = lookup({"a": [1.0, 0.0]}, ["a", "zzz"], 2)
>>> profile = user_profile(layout, vectors, [990.0, 995.0], now=1000.0, known=known)
>>> state = state_vector(layout, profile, context=[0.5])
>>> actions = action_matrix(layout, profile, vectors, known=known)
>>> candidate_rows(state, actions).shape == (2, layout.state_dim + layout.action_dim)
True
>>> float(actions[1, layout.action_feature_names.index("item_unknown")])
1.0
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

_DAY_S = 86_400.0
# 1970-01-01 was a Thursday; with Monday = 0 that is weekday 3.
_EPOCH_WEEKDAY = 3


def state_dim(embedding_dim: int, *, n_windows: int = 3, n_context: int = 0) -> int:
    """Width of the state vector for this layout (see the module table)."""
    return n_windows * (embedding_dim + 2) + 1 + 2 + 7 + n_context + 1


def action_dim(embedding_dim: int, *, n_windows: int = 3) -> int:
    """Width of one action row for this layout (see the module table)."""
    return embedding_dim + 1 + n_windows + 3 + 2 + n_windows + 1


def state_feature_names(layout: FeatureLayout) -> tuple[str, ...]:
    """Column names of the state vector, in order."""
    w = range(len(layout.windows_s))
    return (
        *(f"mean_w{i}_{j}" for i in w for j in range(layout.embedding_dim)),
        *(f"log_clicks_w{i}" for i in w),
        *(f"recency_w{i}" for i in w),
        "cold_user",
        "tod_sin",
        "tod_cos",
        *(f"weekday_{i}" for i in range(7)),
        *(f"context_{j}" for j in range(layout.n_context)),
        "context_missing",
    )


def action_feature_names(layout: FeatureLayout) -> tuple[str, ...]:
    """Column names of an action row, in order."""
    w = range(len(layout.windows_s))
    return (
        *(f"item_{j}" for j in range(layout.embedding_dim)),
        "item_unknown",
        *(f"log_popularity_w{i}" for i in w),
        "freshness",
        "log_age_hours",
        "age_unknown",
        "max_cos_recent",
        "mean_cos_recent",
        *(f"cos_mean_w{i}" for i in w),
        "similarity_unknown",
    )


@dataclass(frozen=True)
class FeatureLayout:
    """The fixed shape of DRN's features; the learner's dimensions follow from it.

    Args:
        embedding_dim: item embedding dimension ``d``.
        windows_s: look-back windows in seconds (default 1 h, 6 h, 24 h); the
            same windows serve user history and item popularity.
        n_context: number of request context floats.
        recent_k: how many most recent known clicks the user-item similarity uses.
        freshness_scale_s: time constant of the freshness decay.
        utc_offset_s: added to ``now`` before taking time of day and weekday.
    """

    embedding_dim: int
    windows_s: tuple[float, ...] = (3_600.0, 21_600.0, 86_400.0)
    n_context: int = 0
    recent_k: int = 10
    freshness_scale_s: float = 86_400.0
    utc_offset_s: float = 0.0
    state_feature_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    action_feature_names: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {self.embedding_dim}")
        windows = tuple(float(w) for w in self.windows_s)
        if not windows or not all(np.isfinite(w) and w > 0 for w in windows):
            raise ValueError(f"windows_s must be non-empty positive seconds, got {self.windows_s}")
        if self.n_context < 0:
            raise ValueError(f"n_context must be >= 0, got {self.n_context}")
        if self.recent_k < 1:
            raise ValueError(f"recent_k must be >= 1, got {self.recent_k}")
        if not np.isfinite(self.freshness_scale_s) or self.freshness_scale_s <= 0:
            raise ValueError(f"freshness_scale_s must be > 0, got {self.freshness_scale_s}")
        if not np.isfinite(self.utc_offset_s):
            raise ValueError(f"utc_offset_s must be finite, got {self.utc_offset_s}")
        object.__setattr__(self, "windows_s", windows)
        object.__setattr__(self, "state_feature_names", state_feature_names(self))
        object.__setattr__(self, "action_feature_names", action_feature_names(self))

    @property
    def state_dim(self) -> int:
        """Width of the state vector."""
        return state_dim(
            self.embedding_dim, n_windows=len(self.windows_s), n_context=self.n_context
        )

    @property
    def action_dim(self) -> int:
        """Width of one action row."""
        return action_dim(self.embedding_dim, n_windows=len(self.windows_s))

    def to_meta(self) -> dict[str, Any]:
        """The layout as JSON-ready values (published with the weights it was trained for).

        >>> FeatureLayout.from_meta(FeatureLayout(4, n_context=2).to_meta()) == FeatureLayout(
        ...     4, n_context=2)
        True
        """
        return {
            "embedding_dim": self.embedding_dim,
            "windows_s": list(self.windows_s),
            "n_context": self.n_context,
            "recent_k": self.recent_k,
            "freshness_scale_s": self.freshness_scale_s,
            "utc_offset_s": self.utc_offset_s,
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> FeatureLayout:
        """The layout :meth:`to_meta` describes; ``ValueError`` on unknown or bad fields."""
        fields = {
            "embedding_dim",
            "windows_s",
            "n_context",
            "recent_k",
            "freshness_scale_s",
            "utc_offset_s",
        }
        unknown = sorted(set(meta) - fields)
        if unknown or "embedding_dim" not in meta:
            raise ValueError(f"feature layout meta needs embedding_dim, got unknown {unknown}")
        values = dict(meta)
        if "windows_s" in values:
            values["windows_s"] = tuple(float(w) for w in values["windows_s"])
        return cls(**values)


@dataclass(frozen=True)
class UserProfile:
    """A user's click history summarised at request time ``now``.

    Built by :func:`user_profile`; feeds both :func:`state_vector` and the
    user-item columns of :func:`action_matrix`.
    """

    now: float
    window_means: np.ndarray  # (W, d) mean known embedding per window, zeros if none
    window_clicks: np.ndarray  # (W,) clicks per window, known or not
    window_recency: np.ndarray  # (W,) exp(-age of latest click / window), 0 if none
    recent_unit: np.ndarray  # (r, d) unit vectors of the r <= recent_k latest known clicks
    cold: bool  # no clicked item has an embedding


def _vectors(values: ArrayLike, n: int | None, dim: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size == 0 and n in (None, 0):
        return np.zeros((0, dim))
    if array.ndim != 2 or array.shape[1] != dim or (n is not None and array.shape[0] != n):
        expected = f"({'n' if n is None else n}, {dim})"
        raise ValueError(f"{what} must have shape {expected}, got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{what} contain NaN or infinite values")
    return array


def _mask(known: ArrayLike | None, n: int, what: str) -> np.ndarray:
    if known is None:
        return np.ones(n, dtype=bool)
    mask = np.asarray(known, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"{what} must have shape ({n},), got {mask.shape}")
    return mask


def _unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows scaled to unit length, and which rows had a non-zero length."""
    norms = np.linalg.norm(vectors, axis=1)
    nonzero = norms > 0
    unit = np.zeros_like(vectors)
    unit[nonzero] = vectors[nonzero] / norms[nonzero, None]
    return unit, nonzero


def lookup(
    embeddings: Mapping[Hashable, ArrayLike], ids: Sequence[Hashable], dim: int
) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings of ``ids`` as ``(vectors (n, dim), known (n,))``; unknown ids get zeros."""
    vectors = np.zeros((len(ids), dim))
    known = np.zeros(len(ids), dtype=bool)
    for i, item in enumerate(ids):
        vector = embeddings.get(item)
        if vector is None:
            continue
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (dim,):
            raise ValueError(f"embedding of {item!r} has shape {vector.shape}, expected ({dim},)")
        if not np.isfinite(vector).all():
            raise ValueError(f"embedding of {item!r} contains NaN or infinite values")
        vectors[i] = vector
        known[i] = True
    return vectors, known


def user_profile(
    layout: FeatureLayout,
    click_vectors: ArrayLike,
    click_times: ArrayLike,
    *,
    now: float,
    known: ArrayLike | None = None,
) -> UserProfile:
    """Summarise a user's clicks (any order) at request time ``now``.

    ``click_vectors`` ``(m, d)`` are the clicked items' embeddings and
    ``known`` ``(m,)`` says which of them exist (see :func:`lookup`); unknown
    clicks still count as clicks but add nothing to the means or similarities.
    Clicks stamped after ``now`` (clock skew) are treated as happening at ``now``.
    """
    if not np.isfinite(now):
        raise ValueError(f"now must be finite, got {now}")
    times = np.asarray(click_times, dtype=np.float64).reshape(-1)
    if not np.isfinite(times).all():
        raise ValueError("click_times contain NaN or infinite values")
    m, d = times.shape[0], layout.embedding_dim
    vectors = _vectors(click_vectors, m, d, "click_vectors")
    mask = _mask(known, m, "known")
    ages = np.maximum(now - times, 0.0)
    n_windows = len(layout.windows_s)
    means = np.zeros((n_windows, d))
    clicks = np.zeros(n_windows)
    recency = np.zeros(n_windows)
    for i, window in enumerate(layout.windows_s):
        inside = ages <= window
        clicks[i] = inside.sum()
        if clicks[i]:
            recency[i] = np.exp(-ages[inside].min() / window)
        known_inside = inside & mask
        if known_inside.any():
            means[i] = vectors[known_inside].mean(axis=0)
    latest_known = np.flatnonzero(mask)[np.argsort(ages[mask], kind="stable")][: layout.recent_k]
    unit, nonzero = _unit_rows(vectors[latest_known])
    return UserProfile(
        now=float(now),
        window_means=means,
        window_clicks=clicks,
        window_recency=recency,
        recent_unit=unit[nonzero],
        cold=not mask.any(),
    )


def state_vector(
    layout: FeatureLayout, profile: UserProfile, *, context: ArrayLike | None = None
) -> np.ndarray:
    """The state ``(state_dim,)`` float32: user features then context features."""
    local = profile.now + layout.utc_offset_s
    angle = 2 * np.pi * (local % _DAY_S) / _DAY_S
    weekday = np.zeros(7)
    weekday[int((local // _DAY_S + _EPOCH_WEEKDAY) % 7)] = 1.0
    if context is None:
        context_block = np.zeros(layout.n_context)
    else:
        context_block = np.asarray(context, dtype=np.float64).reshape(-1)
        if context_block.shape != (layout.n_context,):
            raise ValueError(
                f"context must have {layout.n_context} floats, got {context_block.shape[0]}"
            )
        if not np.isfinite(context_block).all():
            raise ValueError("context contains NaN or infinite values")
    return np.concatenate(
        [
            profile.window_means.reshape(-1),
            np.log1p(profile.window_clicks),
            profile.window_recency,
            [float(profile.cold), np.sin(angle), np.cos(angle)],
            weekday,
            context_block,
            [float(context is None)],
        ]
    ).astype(np.float32)


def action_matrix(
    layout: FeatureLayout,
    profile: UserProfile,
    item_vectors: ArrayLike,
    *,
    known: ArrayLike | None = None,
    popularity: ArrayLike | None = None,
    published_at: ArrayLike | None = None,
) -> np.ndarray:
    """Action rows ``(n, action_dim)`` float32 for ``n`` candidate items.

    Args:
        item_vectors: ``(n, d)`` candidate embeddings (zeros where unknown).
        known: ``(n,)`` which embeddings exist; default all.
        popularity: ``(n, W)`` click counts per window; default zeros (no clicks seen).
        published_at: ``(n,)`` publish times; NaN marks an unknown time; default all unknown.
    """
    d, n_windows = layout.embedding_dim, len(layout.windows_s)
    vectors = _vectors(item_vectors, None, d, "item_vectors")
    n = vectors.shape[0]
    mask = _mask(known, n, "known")
    vectors = np.where(mask[:, None], vectors, 0.0)
    if popularity is None:
        counts = np.zeros((n, n_windows))
    else:
        counts = np.asarray(popularity, dtype=np.float64)
        if counts.shape != (n, n_windows):
            raise ValueError(f"popularity must have shape ({n}, {n_windows}), got {counts.shape}")
        if not np.isfinite(counts).all() or (counts < 0).any():
            raise ValueError("popularity must be finite, non-negative click counts")
    if published_at is None:
        published = np.full(n, np.nan)
    else:
        published = np.asarray(published_at, dtype=np.float64).reshape(-1)
        if published.shape != (n,):
            raise ValueError(f"published_at must have shape ({n},), got {published.shape}")
        if np.isinf(published).any():
            raise ValueError("published_at must be finite or NaN (unknown)")
    age_known = ~np.isnan(published)
    age = np.where(age_known, np.maximum(profile.now - np.nan_to_num(published), 0.0), 0.0)
    freshness = np.where(age_known, np.exp(-age / layout.freshness_scale_s), 0.0)

    unit, nonzero = _unit_rows(vectors)
    comparable = nonzero & (len(profile.recent_unit) > 0)
    max_cos = np.zeros(n)
    mean_cos = np.zeros(n)
    if comparable.any():
        cos_recent = unit @ profile.recent_unit.T
        max_cos = np.where(comparable, cos_recent.max(axis=1), 0.0)
        mean_cos = np.where(comparable, cos_recent.mean(axis=1), 0.0)
    means_unit, _ = _unit_rows(profile.window_means)
    cos_means = np.where(comparable[:, None], unit @ means_unit.T, 0.0)

    return np.column_stack(
        [
            vectors,
            ~mask,
            np.log1p(counts),
            freshness,
            np.log1p(age / 3_600.0),
            ~age_known,
            max_cos,
            mean_cos,
            cos_means,
            ~comparable,
        ]
    ).astype(np.float32)


def candidate_rows(state: ArrayLike, actions: ArrayLike) -> np.ndarray:
    """Rows ``concat(state, action)`` ``(n, state_dim + action_dim)`` for the networks."""
    state_array = np.asarray(state, dtype=np.float32).reshape(-1)
    action_array = np.asarray(actions, dtype=np.float32)
    if action_array.ndim != 2:
        raise ValueError(f"actions must be 2-D (n, action_dim), got shape {action_array.shape}")
    repeated = np.broadcast_to(state_array, (action_array.shape[0], state_array.shape[0]))
    return np.hstack([repeated, action_array])
