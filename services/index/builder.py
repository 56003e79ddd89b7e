"""Build a faiss index over item vectors from a small, serialisable spec.

Three kinds cover the catalog sizes streamrec expects:

- ``flat``: exact search, the right choice up to ~100k items;
- ``hnsw``: a graph index, high recall at sub-millisecond latency for millions;
- ``ivfpq``: an inverted file with product-quantised codes, when memory matters.

Ids are positional: row ``i`` of the vectors is faiss id ``i``, and the
snapshot's manifest carries the item-id list that maps positions back to item
ids. A snapshot is always rebuilt whole, so nothing needs stable external ids
(no ``IndexIDMap``).

Parameters left as ``None`` are derived from the catalog size by
:func:`resolve_spec`; :func:`build_index` records the resolved spec, and an
``ivfpq`` request on a catalog too small to train falls back to ``flat`` (the
resolved spec says so, and a warning is logged).

>>> import numpy as np
>>> vectors = np.eye(4, dtype=np.float32)
>>> index = build_index(IndexSpec(kind="flat"), vectors)
>>> index.ntotal, index.d
(4, 4)
>>> resolve_spec(IndexSpec(kind="ivfpq"), n=500, d=32).kind
'flat'
>>> spec = resolve_spec(IndexSpec(kind="ivfpq"), n=40_000, d=32)
>>> spec.ivf_nlist, spec.pq_m, spec.nprobe
(800, 16, 50)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Literal, get_args

import faiss
import numpy as np

log = logging.getLogger(__name__)

IndexKind = Literal["flat", "hnsw", "ivfpq"]
Metric = Literal["ip", "l2"]

#: k-means wants ~39 training points per centroid (faiss warns below that).
POINTS_PER_CENTROID = 39
_FAISS_METRICS = {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """What index to build and how to search it.

    Args:
        kind: ``flat``, ``hnsw`` or ``ivfpq``.
        metric: ``ip`` (inner product; cosine on L2-normalised vectors) or ``l2``.
        hnsw_m: HNSW graph degree.
        ef_construction: HNSW candidate list size while building.
        ef_search: HNSW candidate list size while searching.
        ivf_nlist: IVF lists; ``None`` → ``4·sqrt(n)``, at most ``n / 39``.
        pq_m: PQ sub-quantizers; must divide the dimension; ``None`` → the largest
            divisor of ``d`` that is at most ``d / 2``: 2-dimensional sub-vectors,
            ``d / 2`` bytes a vector at 8 bits (8x smaller than float32). Coarser
            codes (``d / 4``) lose too much recall on embedding-like data.
        pq_nbits: bits per PQ code.
        nprobe: IVF lists visited per query; ``None`` → ``nlist / 16``, at least 1.
    """

    kind: IndexKind
    metric: Metric = "ip"
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 64
    ivf_nlist: int | None = None
    pq_m: int | None = None
    pq_nbits: int = 8
    nprobe: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in get_args(IndexKind):
            raise ValueError(f"kind must be one of {get_args(IndexKind)}, got {self.kind!r}")
        if self.metric not in get_args(Metric):
            raise ValueError(f"metric must be one of {get_args(Metric)}, got {self.metric!r}")
        for name in ("hnsw_m", "ef_construction", "ef_search", "ivf_nlist", "pq_m", "nprobe"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 1 <= self.pq_nbits <= 16:
            raise ValueError(f"pq_nbits must be between 1 and 16, got {self.pq_nbits!r}")

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready dict (for the snapshot manifest)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> IndexSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown IndexSpec fields: {sorted(unknown)}")
        return cls(**raw)


def resolve_spec(spec: IndexSpec, *, n: int, d: int) -> IndexSpec:
    """Fill the derived parameters for ``n`` vectors of dimension ``d``.

    An ``ivfpq`` spec whose catalog cannot train its quantizers (fewer than
    ``39 · 2**pq_nbits`` vectors, or ``pq_m`` not dividing ``d``) resolves to
    ``flat``: at that size exact search is cheap anyway.
    """
    if spec.kind != "ivfpq":
        return spec
    pq_m = spec.pq_m if spec.pq_m is not None else _default_pq_m(d)
    min_train = POINTS_PER_CENTROID * 2**spec.pq_nbits
    if n < min_train or d % pq_m:
        reason = f"n={n} < {min_train}" if n < min_train else f"pq_m={pq_m} does not divide d={d}"
        log.warning("ivfpq index cannot be trained (%s); building a flat index instead", reason)
        return dataclasses.replace(spec, kind="flat", ivf_nlist=None, pq_m=None, nprobe=None)
    nlist = spec.ivf_nlist
    if nlist is None:
        nlist = max(1, min(round(4 * math.sqrt(n)), n // POINTS_PER_CENTROID))
    nprobe = spec.nprobe if spec.nprobe is not None else max(1, nlist // 16)
    return dataclasses.replace(spec, ivf_nlist=nlist, pq_m=pq_m, nprobe=min(nprobe, nlist))


def build_index(spec: IndexSpec, vectors: np.ndarray) -> faiss.Index:
    """Build and fill an index over ``vectors`` (``float32 (n, d)``); ids are row positions."""
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise ValueError(f"vectors must have shape (n, d) with d >= 1, got {vectors.shape}")
    if not np.isfinite(vectors).all():
        raise ValueError("vectors contain NaN or infinity")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    spec = resolve_spec(spec, n=n, d=d)
    metric = _FAISS_METRICS[spec.metric]
    index: faiss.Index
    if spec.kind == "flat":
        index = faiss.IndexFlat(d, metric)
    elif spec.kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, spec.hnsw_m, metric)
        index.hnsw.efConstruction = spec.ef_construction
    else:
        assert spec.ivf_nlist is not None and spec.pq_m is not None  # set by resolve_spec
        quantizer = faiss.IndexFlat(d, metric)
        index = faiss.IndexIVFPQ(quantizer, d, spec.ivf_nlist, spec.pq_m, spec.pq_nbits, metric)
        index.train(vectors)
    index.add(vectors)
    apply_search_params(index, spec)
    return index


def apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    """Set the search-time knobs (``efSearch``, ``nprobe``) of ``spec`` on ``index``."""
    if isinstance(index, faiss.IndexHNSW):
        index.hnsw.efSearch = spec.ef_search
    elif isinstance(index, faiss.IndexIVF) and spec.nprobe is not None:
        index.nprobe = spec.nprobe


def index_kind(index: faiss.Index) -> IndexKind:
    """The :data:`IndexKind` of an index this module built (for checks on load)."""
    if isinstance(index, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(index, faiss.IndexIVFPQ):
        return "ivfpq"
    if isinstance(index, faiss.IndexFlat):
        return "flat"
    raise ValueError(f"unsupported faiss index type {type(index).__name__}")


def index_metric(index: faiss.Index) -> Metric:
    """The :data:`Metric` of ``index``."""
    for name, code in _FAISS_METRICS.items():
        if index.metric_type == code:
            return name  # type: ignore[return-value]
    raise ValueError(f"unsupported faiss metric type {index.metric_type}")


def _default_pq_m(d: int) -> int:
    target = max(1, d // 2)
    return max(m for m in range(1, target + 1) if d % m == 0)
