"""Versioned model parameters in Redis: atomic multi-part publish and one-round-trip reads.

A model's state is published in named *parts*. The bandits service publishes one
part per Kafka partition it owns (``p0``, ``p3``, ...), each holding that
partition's additive statistics; a single learner publishes one part (``main``)
or a few named ones. Parts published by different processes combine into one
model: every version's manifest names the newest blob of *every* part.

Layout (all keys of a model share the hash tag ``{model}``, so each script below
touches one Redis Cluster slot; see :class:`contracts.keys.KeySpace`):

- ``blob:{part}:{id}``: one immutable encoded blob (:func:`contracts.params.encode_params`).
- ``parts``: hash, part name → key of that part's newest blob.
- ``manifest:{version}``: hash, the ``parts`` hash as it was when ``version`` was published.
- ``current``: the newest version number (also the counter new versions come from).
- ``fence``: hash, part name → the highest fencing token a publish of it carried
  and its owner (``"<token> <owner>"``).

``publish`` is one Lua script: write the new blobs, repoint their parts, give each
replaced blob a TTL (readers that walk the keys one command at a time, and older
manifests, can still fetch it for ``blob_ttl_s``), INCR ``current``, copy ``parts``
into the new manifest, delete manifests older than ``keep_versions`` and PUBLISH
the version on the model's channel. A part published with a fencing token (the
publisher's ownership epoch of the partition the part holds) is skipped if the
same owner (consumer group) published it with a higher token: a process that
froze while publishing and wakes after a new owner of its partition took over
cannot put an older state back. ``latest_parts`` is
one Lua script too, so a reader gets ``current``, its manifest and every blob in
one round trip and never sees half a version. Every blob carries a sha256 that is checked on read.

Use a Redis eviction policy that does not evict these keys (``noeviction`` or a
``volatile-*`` policy): a current blob has no TTL and must not disappear.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.cluster import RedisCluster

from contracts.keys import KeySpace
from contracts.params import ParamError, ParamSet, decode_params
from services.common.clients import redis_client, redis_from_url
from services.common.metrics import LATENCY_BUCKETS
from services.common.settings import RedisSettings

if TYPE_CHECKING:
    from services.bandits import BanditLearner

log = logging.getLogger(__name__)

#: Combines the arrays of several parts (in part-name order) into one set of arrays.
Combiner = Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]

# Model and part names become parts of Redis keys; braces would break the hash tag.
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

# KEYS: current, parts, fence, then one fresh blob key per part.
# ARGV: manifest key prefix, blob TTL (ms), versions to keep, channel, fence owner,
#       then (part name, blob, fencing token or "") triples in the order of the blob
#       keys. A token is only compared with one of the same owner.
# Returns {version, stale part names...}; version is 0 if every part was stale.
# Manifest keys are built from the new version inside the script; they share the
# model's hash tag, so on Redis Cluster they live in the slot of the declared keys.
_PUBLISH = """
local current, parts, fence = KEYS[1], KEYS[2], KEYS[3]
local prefix, ttl, keep, channel = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local owner = ARGV[5]
local stale, fresh = {}, 0
for i = 4, #KEYS do
  local a = 6 + 3 * (i - 4)
  local part, blob, token = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local seen, by = nil, nil
  local fenced = redis.call('HGET', fence, part)
  if fenced then
    seen, by = string.match(fenced, '^(%d+) (.*)$')
  end
  if token ~= '' and by == owner and tonumber(seen) > tonumber(token) then
    stale[#stale + 1] = part
  else
    if token ~= '' then
      redis.call('HSET', fence, part, token .. ' ' .. owner)
    end
    redis.call('SET', KEYS[i], blob)
    local previous = redis.call('HGET', parts, part)
    if previous then
      redis.call('PEXPIRE', previous, ttl)
    end
    redis.call('HSET', parts, part, KEYS[i])
    fresh = fresh + 1
  end
end
if fresh == 0 then
  return {0, unpack(stale)}
end
local version = redis.call('INCR', current)
local manifest = prefix .. version
local pointers = redis.call('HGETALL', parts)
for i = 1, #pointers, 2 do
  redis.call('HSET', manifest, pointers[i], pointers[i + 1])
end
local old = version - keep
while old >= 1 and redis.call('DEL', prefix .. old) == 1 do
  old = old - 1
end
redis.call('PUBLISH', channel, version)
return {version, unpack(stale)}
"""

# The digest of a manifest: sha1 of its blob keys, sorted. Blob keys are unique, so
# the digest tells apart two versions with one number (after Redis lost its data).
_DIGEST = """
local function digest(pointers)
  local keys = {}
  for i = 2, #pointers, 2 do
    keys[#keys + 1] = pointers[i]
  end
  table.sort(keys)
  return redis.sha1hex(table.concat(keys, '\\n'))
end
"""

# KEYS: current. ARGV: manifest key prefix.
# Returns false when no version exists, else {version, digest, part, blob, part, blob, ...}
# with false (nil) for a blob that is gone.
_READ = (
    _DIGEST
    + """
local version = redis.call('GET', KEYS[1])
if not version then
  return false
end
local pointers = redis.call('HGETALL', ARGV[1] .. version)
local out = {version, digest(pointers)}
for i = 1, #pointers, 2 do
  out[#out + 1] = pointers[i]
  out[#out + 1] = redis.call('GET', pointers[i + 1])
end
return out
"""
)

# KEYS: current. ARGV: manifest key prefix. Returns false or {version, digest}.
_HEAD = (
    _DIGEST
    + """
local version = redis.call('GET', KEYS[1])
if not version then
  return false
end
return {version, digest(redis.call('HGETALL', ARGV[1] .. version))}
"""
)

# KEYS: current. ARGV: manifest key prefix. Retained versions, newest first.
_VERSIONS = """
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
local out = {}
while version >= 1 and redis.call('EXISTS', ARGV[1] .. version) == 1 do
  out[#out + 1] = version
  version = version - 1
end
return out
"""


class ModelNotFound(LookupError):
    """No version of the model has been published (or none is loaded yet)."""

    def __init__(self, model: str, detail: str = "no version published") -> None:
        super().__init__(f"model {model!r}: {detail}")
        self.model = model


class StalePublish(RuntimeError):
    """Every part of a publish carried a fencing token lower than one already seen."""

    def __init__(self, model: str, parts: list[str]) -> None:
        super().__init__(f"model {model!r}: parts {parts} are owned by a newer publisher")
        self.model = model
        self.parts = parts


class ParamMetrics:
    """Publisher and reader series of the parameter store, one set per registry.

    Several stores and watchers (one per model) may share a registry, so the
    series are created once per registry and carry a ``model`` label.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.publish_seconds = Histogram(
            "streamrec_params_publish_seconds",
            "Time to validate and publish one version (one Lua script).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.publish_bytes = Gauge(
            "streamrec_params_publish_bytes",
            "Bytes of blobs in the last version this process published.",
            ["model"],
            registry=registry,
        )
        self.version = Gauge(
            "streamrec_params_version",
            "Last version this process published.",
            ["model"],
            registry=registry,
        )
        self.publish_timestamp = Gauge(
            "streamrec_params_publish_timestamp_seconds",
            "Unix time of the last version this process published (age = time() - this).",
            ["model"],
            registry=registry,
        )
        self.fenced = Counter(
            "streamrec_params_fenced_parts",
            "Parts not published because a newer owner had published them (fencing).",
            ["model"],
            registry=registry,
        )
        self.reader_version = Gauge(
            "streamrec_params_reader_version",
            "Version this reader is serving.",
            ["model"],
            registry=registry,
        )
        self.reader_age = Gauge(
            "streamrec_params_reader_age_seconds",
            "Seconds since the serving version's newest part was encoded (NaN before the first).",
            ["model"],
            registry=registry,
        )
        self.reader_stale = Gauge(
            "streamrec_params_reader_stale",
            "1 while the last refresh failed and an older version keeps serving.",
            ["model"],
            registry=registry,
        )
        self.reader_errors = Counter(
            "streamrec_params_reader_errors",
            "Failed refreshes, by reason (redis, corrupt, missing, build).",
            ["model", "reason"],
            registry=registry,
        )


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, ParamMetrics] = weakref.WeakKeyDictionary()
_METRICS_LOCK = threading.Lock()


def param_metrics(registry: CollectorRegistry) -> ParamMetrics:
    """The parameter-store series of ``registry``, created on first use."""
    with _METRICS_LOCK:
        metrics = _METRICS.get(registry)
        if metrics is None:
            metrics = _METRICS[registry] = ParamMetrics(registry)
        return metrics


def _check_name(kind: str, name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"{kind} name must match {_NAME.pattern}, got {name!r}")
    return name


class ParamStore:
    """Publishes and reads versioned, multi-part model parameters in Redis.

    Args:
        client: the Redis or Redis Cluster connection (thread-safe; shared by every call).
        keys: the key layout and namespace.
        blob_ttl_s: how long a replaced blob stays readable.
        keep_versions: manifests kept (the newest ``keep_versions`` versions).
        registry: Prometheus registry for the publish series; ``None`` gives a
            private one (see :attr:`registry`).
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        keys: KeySpace | None = None,
        blob_ttl_s: float = 120.0,
        keep_versions: int = 20,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not (np.isfinite(blob_ttl_s) and blob_ttl_s > 0):
            raise ValueError(f"blob_ttl_s must be a positive number of seconds, got {blob_ttl_s!r}")
        if isinstance(keep_versions, bool) or not isinstance(keep_versions, int):
            raise ValueError(f"keep_versions must be an integer >= 1, got {keep_versions!r}")
        if keep_versions < 1:
            raise ValueError(f"keep_versions must be an integer >= 1, got {keep_versions!r}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "ParamStore needs a client with decode_responses=False (blobs are bytes)"
            )
        self._redis = client
        self.keys = keys if keys is not None else KeySpace()
        self.blob_ttl_s = float(blob_ttl_s)
        self.keep_versions = keep_versions
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = param_metrics(self.registry)
        self._publish = client.register_script(_PUBLISH)
        self._read = client.register_script(_READ)
        self._head = client.register_script(_HEAD)
        self._versions = client.register_script(_VERSIONS)
        self._registered: set[str] = set()
        self._owns_client = False

    @classmethod
    def from_url(cls, url: str, **kwargs: Any) -> ParamStore:
        """A store on its own connection to ``url`` (a Redis or Redis Cluster URL, see
        :func:`~services.common.clients.redis_from_url`); :meth:`close` closes it."""
        store = cls(redis_from_url(url), **kwargs)
        store._owns_client = True
        return store

    @classmethod
    def from_settings(cls, settings: RedisSettings, **kwargs: Any) -> ParamStore:
        """A store on its own connection, in the settings' namespace; :meth:`close` closes it."""
        kwargs.setdefault("keys", settings.keys())
        store = cls(redis_client(settings), **kwargs)
        store._owns_client = True
        return store

    def close(self) -> None:
        """Close the connection if this store opened it."""
        if self._owns_client:
            self._redis.close()

    def __enter__(self) -> ParamStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writing -----------------------------------------------------------------

    def publish(
        self,
        model: str,
        parts: Mapping[str, bytes],
        *,
        fence: Mapping[str, int] | None = None,
        owner: str = "",
    ) -> int:
        """Publish new blobs for some parts of ``model`` as one new version; returns it.

        Parts not named here keep their earlier blobs, which is how processes that
        each own some partitions build one model together. Each blob must decode
        (checksum included) and name ``model``; a bad one raises
        :class:`~contracts.params.ParamError` and nothing is published.

        ``fence`` maps part names to fencing tokens (the publisher's ownership
        epoch of the part, see :meth:`CheckpointStore.claim
        <services.common.checkpoint.CheckpointStore.claim>`), issued by ``owner``
        (its consumer group): a part whose token is lower than the highest one
        the same owner published for it is skipped and counted; if every part is
        skipped, :class:`StalePublish` is raised and no version is made. Another
        owner's publish (e.g. a rebuild under a new group) replaces the fence.
        """
        started = time.perf_counter()
        _check_name("model", model)
        if not parts:
            raise ValueError(f"publish of model {model!r} needs at least one part")
        fence = fence or {}
        keys = [
            self.keys.params_current(model),
            self.keys.params_parts(model),
            self.keys.params_fence(model),
        ]
        args: list[str | bytes | int] = [
            self._manifest_prefix(model),
            max(1, round(self.blob_ttl_s * 1000)),
            self.keep_versions,
            self.keys.params_channel(model),
            owner,
        ]
        size = 0
        for part, blob in parts.items():
            _check_name("part", part)
            blob = bytes(blob)
            try:
                decoded = decode_params(blob)
            except ParamError as exc:
                raise ParamError(f"model {model!r} part {part!r}: {exc}") from None
            if decoded.model != model:
                raise ParamError(
                    f"part {part!r} was encoded for model {decoded.model!r}, not {model!r}"
                )
            keys.append(self.keys.params_blob(model, part, uuid.uuid4().hex))
            token = fence.get(part)
            args += [part, blob, "" if token is None else int(token)]
            size += len(blob)
        version, *stale = self._publish(keys=keys, args=args)
        version = int(version)
        if stale:
            names = [name.decode() for name in stale]
            self._metrics.fenced.labels(model).inc(len(names))
            log.warning("%s: parts %s not published: a newer owner published them", model, names)
            if not version:
                raise StalePublish(model, names)
        if version == 1 or model not in self._registered:
            # models() has no hash tag (it spans models), so it stays out of the script;
            # version 1 also means a Redis that lost its data, models() included.
            self._redis.sadd(self.keys.models(), model)
            self._registered.add(model)
        self._metrics.publish_seconds.labels(model).observe(time.perf_counter() - started)
        self._metrics.publish_bytes.labels(model).set(size)
        self._metrics.version.labels(model).set(version)
        self._metrics.publish_timestamp.labels(model).set_to_current_time()
        log.debug("published %s v%d (%s, %d bytes)", model, version, ", ".join(parts), size)
        return version

    # -- reading -----------------------------------------------------------------

    def current_version(self, model: str) -> int | None:
        """The newest version of ``model`` (one GET), or ``None`` if none was published."""
        raw = self._redis.get(self.keys.params_current(_check_name("model", model)))
        return None if raw is None else int(raw)

    def versions(self, model: str) -> list[int]:
        """Versions whose manifests are retained, oldest first (empty if none)."""
        _check_name("model", model)
        found = self._versions(
            keys=[self.keys.params_current(model)], args=[self._manifest_prefix(model)]
        )
        return sorted(int(v) for v in found)

    def manifest(self, model: str, version: int) -> dict[str, str]:
        """Part name → blob key of a retained version (empty if the manifest is gone)."""
        key = self.keys.params_manifest(_check_name("model", model), version)
        raw = cast(dict[bytes, bytes], self._redis.hgetall(key))
        return {part.decode(): key.decode() for part, key in sorted(raw.items())}

    def models(self) -> list[str]:
        """Every model ever published in this namespace, sorted."""
        names = cast(set[bytes], self._redis.smembers(self.keys.models()))
        return sorted(name.decode() for name in names)

    def head(self, model: str) -> tuple[int, str] | None:
        """``(version, digest)`` of the current version in one small script, or ``None``.

        The digest (sha1 of the version's blob keys) changes with every publish even
        where the version number does not: a Redis that lost its data counts again
        from 1. Readers that poll compare both; see :class:`ParamWatcher`.
        """
        _check_name("model", model)
        found = self._head(
            keys=[self.keys.params_current(model)], args=[self._manifest_prefix(model)]
        )
        return None if found is None else (int(found[0]), found[1].decode())

    def latest_parts(self, model: str) -> tuple[int, dict[str, ParamSet]]:
        """The current version and every part of it, decoded and verified, in one round trip.

        Raises :class:`ModelNotFound` when nothing was published and
        :class:`~contracts.params.ParamError` (naming model, part and version)
        when a blob is missing or fails its checksum.
        """
        version, _, parts = self._load(model)
        return version, parts

    def latest(
        self, model: str, *, combine: Combiner | None = None
    ) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
        """The current version as ``(version, header, arrays)``, parts combined.

        See :func:`combine_parts` for the header and how several parts become one
        set of arrays; the header also carries the version's ``digest`` (see :meth:`head`).
        """
        version, digest, parts = self._load(model)
        header, arrays = combine_parts(model, version, parts, combine=combine)
        header["digest"] = digest
        return version, header, arrays

    def learner(self, model: str, *, seed: int | None = None) -> tuple[int, BanditLearner]:
        """The current version of a bandit model as a ready learner (parts merged)."""
        version, header, arrays = self.latest(model)
        return version, build_learner(version, header, arrays, seed=seed)

    def _load(self, model: str) -> tuple[int, str, dict[str, ParamSet]]:
        _check_name("model", model)
        reply = self._read(
            keys=[self.keys.params_current(model)], args=[self._manifest_prefix(model)]
        )
        if reply is None:
            raise ModelNotFound(model)
        version, digest = int(reply[0]), reply[1].decode()
        if len(reply) == 2:
            raise ParamError(f"model {model!r} v{version}: manifest is missing")
        parts: dict[str, ParamSet] = {}
        for raw_name, blob in zip(reply[2::2], reply[3::2], strict=True):
            part = raw_name.decode()
            where = f"model {model!r} part {part!r} v{version}"
            if blob is None:
                raise ParamError(f"{where}: blob is missing (deleted or evicted)")
            try:
                decoded = decode_params(blob)
            except ParamError as exc:
                raise ParamError(f"{where}: {exc}") from None
            if decoded.model != model:
                raise ParamError(f"{where}: blob names model {decoded.model!r}")
            parts[part] = decoded
        return version, digest, dict(sorted(parts.items()))

    def _manifest_prefix(self, model: str) -> str:
        # The scripts build manifest keys from the version; derive the prefix from
        # the key layout and make sure the version really is its suffix.
        prefix = self.keys.params_manifest(model, 0).removesuffix("0")
        if self.keys.params_manifest(model, 12345) != f"{prefix}12345":
            raise RuntimeError("params_manifest keys must end with the version number")
        return prefix


def combine_parts(
    model: str,
    version: int,
    parts: Mapping[str, ParamSet],
    *,
    combine: Combiner | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One header and one set of arrays from the parts of a version.

    One part is returned as is. Several parts are combined by ``combine`` (called
    with the parts' arrays in part-name order) or, without one, by the ``merge``
    of the bandit learner every part names in ``meta["learner"]``.

    The header holds ``model``, ``version`` (the store's version), ``parts``
    (the part names), ``offsets`` (the union of the parts' offsets; two parts may
    only claim the same partition at the same offset), ``meta`` (the entries all
    parts agree on) and ``created_at`` (of the newest part).

    >>> from contracts.params import encode_params
    >>> def part(value, partition):
    ...     blob = encode_params("m", 1, {"n": np.array([value])},
    ...                          offsets={"feedback": {partition: 10}}, created_at=5.0)
    ...     return decode_params(blob)
    >>> header, arrays = combine_parts(
    ...     "m", 3, {"p0": part(1, 0), "p1": part(2, 1)},
    ...     combine=lambda states: {"n": sum(s["n"] for s in states)})
    >>> header["parts"], header["offsets"], arrays["n"].tolist()
    (['p0', 'p1'], {'feedback': {0: 10, 1: 10}}, [3])
    """
    if not parts:
        raise ParamError(f"model {model!r} v{version} has no parts")
    names = sorted(parts)
    sets = [parts[name] for name in names]
    header: dict[str, Any] = {
        "model": model,
        "version": version,
        "parts": names,
        "offsets": _union_offsets(model, version, names, sets),
        "meta": _common_meta(sets),
        "created_at": max(p.created_at for p in sets),
    }
    if len(sets) == 1:
        return header, dict(sets[0].arrays)
    if combine is None:
        learners = {p.meta.get("learner") for p in sets}
        if len(learners) != 1 or None in learners:
            raise ParamError(
                f"model {model!r} v{version} has parts {names} but they do not all name one "
                f"bandit learner in meta['learner'] (found {sorted(map(str, learners))}); "
                "pass combine="
            )
        combine = _learner_class(str(learners.pop())).merge
    return header, dict(combine([dict(p.arrays) for p in sets]))


def build_learner(
    version: int,
    header: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
    *,
    seed: int | None = None,
) -> BanditLearner:
    """A bandit learner from combined parameters whose ``meta["learner"]`` names its class."""
    name = header.get("meta", {}).get("learner")
    if name is None:
        raise ParamError(f"model {header.get('model')!r} v{version} names no bandit learner")
    try:
        return _learner_class(str(name)).from_state(arrays, seed=seed)
    except ValueError as exc:
        if isinstance(exc, ParamError):
            raise
        raise ParamError(f"model {header.get('model')!r} v{version}: {exc}") from None


def _learner_class(name: str) -> Any:
    # Imported here: readers of non-bandit models need not import the learners.
    from services.bandits import LEARNERS

    if name not in LEARNERS:
        raise ParamError(f"unknown bandit learner {name!r}; known: {sorted(LEARNERS)}")
    return LEARNERS[name]


def _union_offsets(
    model: str, version: int, names: Sequence[str], sets: Sequence[ParamSet]
) -> dict[str, dict[int, int]]:
    union: dict[str, dict[int, int]] = {}
    claimed: dict[tuple[str, int], str] = {}
    for name, params in zip(names, sets, strict=True):
        for topic, partitions in params.offsets.items():
            merged = union.setdefault(topic, {})
            for partition, offset in partitions.items():
                if partition in merged and merged[partition] != offset:
                    raise ParamError(
                        f"model {model!r} v{version}: parts {claimed[topic, partition]!r} and "
                        f"{name!r} disagree on {topic}[{partition}] "
                        f"({merged[partition]} vs {offset})"
                    )
                merged[partition] = offset
                claimed.setdefault((topic, partition), name)
    return {topic: dict(sorted(parts.items())) for topic, parts in sorted(union.items())}


def _common_meta(sets: Sequence[ParamSet]) -> dict[str, Any]:
    first, *rest = sets
    missing = object()
    return {k: v for k, v in first.meta.items() if all(p.meta.get(k, missing) == v for p in rest)}
