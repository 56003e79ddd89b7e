"""The format DRN's W and W̃ are published in, written by the service and read by serving.

One ParamStore version holds both networks: part ``main`` with W's arrays under
``W/…`` and W̃'s under ``W_explore/…`` (float32, checksummed by
:mod:`contracts.params`), and meta naming the model kind, the W̃ draw
(``explore_version``) and the feature layout the networks expect. The DRN
service (:mod:`services.drn.service`) writes it with :func:`published_arrays`
and :func:`published_meta`; the serving policy
(:mod:`services.serving.drn_policy`) reads it back with :func:`read_published`.

>>> from services.drn.features import FeatureLayout
>>> layout = FeatureLayout(embedding_dim=2, n_context=1)
>>> w = {"value.out.bias": np.zeros(1)}
>>> published = read_published(
...     3, {"meta": published_meta(7, layout)}, published_arrays(w, w))
>>> published.explore_version, sorted(published.online), published.layout == layout
(7, ['value.out.bias'], True)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from services.drn.features import FeatureLayout

#: Array-name prefixes of W and W̃ in the published part ``main``.
ONLINE_PREFIX = "W/"
EXPLORE_PREFIX = "W_explore/"
#: ``meta["kind"]`` of a published DRN version.
MODEL_KIND = "drn"


def published_arrays(
    online: Mapping[str, np.ndarray], explore: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """W and W̃ as the float32 arrays of one published part (``W/…``, ``W_explore/…``)."""
    arrays = {f"{ONLINE_PREFIX}{k}": np.asarray(v, dtype=np.float32) for k, v in online.items()}
    arrays.update(
        {f"{EXPLORE_PREFIX}{k}": np.asarray(v, dtype=np.float32) for k, v in explore.items()}
    )
    return arrays


def published_meta(explore_version: int, layout: FeatureLayout) -> dict[str, Any]:
    """The meta of a published DRN version: kind, W̃ draw and the feature layout."""
    return {
        "kind": MODEL_KIND,
        "explore_version": int(explore_version),
        "state_dim": layout.state_dim,
        "action_dim": layout.action_dim,
        "layout": layout.to_meta(),
    }


@dataclass(frozen=True, eq=False)
class PublishedWeights:
    """W's and W̃'s named arrays of one published version, with what its meta says."""

    explore_version: int
    online: dict[str, np.ndarray]
    explore: dict[str, np.ndarray]
    state_dim: int
    layout: FeatureLayout | None


def read_published(
    version: int, header: Mapping[str, Any], arrays: Mapping[str, np.ndarray]
) -> PublishedWeights:
    """W and W̃ of a ParamStore version (``ValueError`` if it is not DRN's)."""
    meta = header.get("meta", {})
    if meta.get("kind") != MODEL_KIND:
        raise ValueError(f"version {version} is not a DRN model (meta kind {meta.get('kind')!r})")
    online = {k[len(ONLINE_PREFIX) :]: v for k, v in arrays.items() if k.startswith(ONLINE_PREFIX)}
    explore = {
        k[len(EXPLORE_PREFIX) :]: v for k, v in arrays.items() if k.startswith(EXPLORE_PREFIX)
    }
    if not online or set(online) != set(explore):
        raise ValueError(f"version {version} does not hold matching W and W_explore arrays")
    return PublishedWeights(
        explore_version=int(meta["explore_version"]),
        online=online,
        explore=explore,
        state_dim=int(meta["state_dim"]),
        layout=FeatureLayout.from_meta(meta["layout"]) if "layout" in meta else None,
    )
