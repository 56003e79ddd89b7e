"""Versioned model parameters in Redis: atomic multi-part publish and one-round-trip reads.

A model's state is published in named *parts*. The bandits service publishes one
part per Kafka partition it owns (``p0``, ``p3``, ...), each holding that
partition's additive statistics; a single learner publishes one part (``main``)
or a few named ones. Parts published by different processes combine into one
model: every version's manifest names the newest blob of *every* part.

Layout (all keys of a model share the hash tag ``{model}``, so each script below
touches one Redis Cluster slot; see :class:`contracts.keys.KeySpace`):

- ``blob:{part}:{digest}``: one encoded part (:func:`contracts.params.encode_params`)
  under its sha256, the checksum in its own header. Blobs are content-addressed:
  publishing a part again unchanged finds its key and writes nothing, and every
  version that holds the same part shares one blob.
- ``parts``: hash, part name → digest of that part's newest blob.
- ``manifest:{version}``: hash, the ``parts`` hash as it was when ``version`` was published.
- ``current``: the newest version number (also the counter new versions come from).
- ``fence``: hash, part name → the highest fencing token a publish of it carried
  and its owner (``"<token> <owner>"``).

``publish`` is one Lua script: write the blobs that are not stored yet, repoint
the parts that changed, and, if any did, INCR ``current``, copy ``parts`` into the
new manifest and PUBLISH the version on the model's channel. A publish in which
no part changed makes no version. The same script then applies retention: walking
from the newest manifest down, it keeps manifests while there are fewer than
``keep_versions`` and the blobs they reference (each counted once) fit in
``keep_bytes``; the newest is always kept. Older manifests are deleted, and so is
(after ``blob_ttl_s``) every blob that no kept manifest references, so a model
holds at most about ``max(keep_bytes, its current size)`` of blobs plus what was
retired in the last ``blob_ttl_s`` (docs/decisions.md §8). The live set is derived
from the kept manifests on each publish, so there is no counter that could drift.

A part published with a fencing token (the publisher's ownership epoch of the
partition the part holds) is skipped if the same owner (consumer group) published
it with a higher token: a process that froze while publishing and wakes after a
new owner of its partition took over cannot put an older state back.

``latest_parts`` is one Lua script too, so a reader gets ``current``, its manifest
and every blob in one round trip and never sees half a version: scripts run one
at a time, and every publish leaves each blob of a kept manifest in place. A
reader that walks the keys one command at a time still finds the blobs of a
manifest it read while that manifest is kept, and for ``blob_ttl_s`` after. Every
blob carries a sha256 that is checked on read, together with the digest the
manifest names it by.

Use a Redis eviction policy that does not evict these keys (``noeviction`` or a
``volatile-*`` policy): a referenced blob has no TTL and must not disappear.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

import numpy as np
import redis
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.cluster import RedisCluster

from contracts.errors import StreamrecError
from contracts.keys import KeySpace
from contracts.params import ParamError, ParamSet, decode_params, verify_params
from services.common.clients import redis_client, redis_from_url
from services.common.metrics import LATENCY_BUCKETS
from services.common.settings import RedisSettings

log = logging.getLogger(__name__)

#: Combines the arrays of several parts (in part-name order) into one set of arrays.
Combiner = Callable[[list[dict[str, np.ndarray]]], dict[str, np.ndarray]]

# Model and part names become parts of Redis keys; braces would break the hash tag.
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")

# A manifest or ``parts`` entry maps a part to the digest of its blob. An entry
# that holds a colon is a whole blob key, as written before blobs were
# content-addressed: reading and retiring those keeps a store written by the
# earlier layout readable until each of its parts is published again.
_BLOB_KEY = """
local function blobkey(bprefix, part, ref)
  if string.find(ref, ':', 1, true) then
    return ref
  end
  return bprefix .. part .. ':' .. ref
end
"""

# KEYS: current, parts, fence, then the blob key of each part.
# ARGV: manifest key prefix, blob key prefix, channel, fence owner, retired-blob TTL
#       (ms), versions to keep, bytes to keep, then (part name, digest, blob or "",
#       fencing token or "") quadruples in the order of the blob keys. An empty blob
#       stands for one the caller believes stored; a token is only compared with
#       one of the same owner.
# Returns {version, kept versions, kept bytes, bytes written, part names...}:
# version 0 if every part was stale (the names are the stale parts), -1 if a blob
# left out is not stored (the names are those parts; nothing was written), else
# the new version, or the current one if no part changed (the names are the stale
# parts). Manifest and blob keys other than the declared ones are built inside the
# script; they share the model's hash tag, so on Redis Cluster they live in the
# slot of the declared keys.
_PUBLISH = (
    _BLOB_KEY
    + """
local current, parts, fence = KEYS[1], KEYS[2], KEYS[3]
local mprefix, bprefix, channel, owner = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ttl, keep, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local stale, missing, accepted = {}, {}, {}
for i = 4, #KEYS do
  local a = 8 + 4 * (i - 4)
  local part, blob, token = ARGV[a], ARGV[a + 2], ARGV[a + 3]
  local seen, by = nil, nil
  local fenced = redis.call('HGET', fence, part)
  if fenced then
    seen, by = string.match(fenced, '^(%d+) (.*)$')
  end
  if token ~= '' and by == owner and tonumber(seen) > tonumber(token) then
    stale[#stale + 1] = part
  elseif blob == '' and redis.call('EXISTS', KEYS[i]) == 0 then
    missing[#missing + 1] = part
  else
    accepted[#accepted + 1] = i
  end
end
if #missing > 0 then
  return {-1, 0, 0, 0, unpack(missing)}
end
if #accepted == 0 then
  return {0, 0, 0, 0, unpack(stale)}
end
local changed, written = 0, 0
for _, i in ipairs(accepted) do
  local a = 8 + 4 * (i - 4)
  local part, digest, blob, token = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if token ~= '' then
    redis.call('HSET', fence, part, token .. ' ' .. owner)
  end
  if redis.call('EXISTS', KEYS[i]) == 1 then
    -- Stored already: nothing to write. It may be a retired blob counting down
    -- its TTL, which a kept manifest is about to reference again.
    redis.call('PERSIST', KEYS[i])
  else
    redis.call('SET', KEYS[i], blob)
    written = written + #blob
  end
  if redis.call('HGET', parts, part) ~= digest then
    redis.call('HSET', parts, part, digest)
    changed = changed + 1
  end
end
local version = tonumber(redis.call('GET', current) or '0')
local made = changed > 0 or version == 0 or redis.call('EXISTS', mprefix .. version) == 0
if made then
  version = redis.call('INCR', current)
  redis.call('HSET', mprefix .. version, unpack(redis.call('HGETALL', parts)))
end
-- Retention: keep the newest manifests while fewer than `keep` and their blobs fit
-- in `budget` bytes (the newest always), then drop the older ones and retire each
-- of their blobs that no kept manifest references.
local live, bytes, kept, v = {}, 0, 0, version
while v >= 1 do
  local pointers = redis.call('HGETALL', mprefix .. v)
  if #pointers == 0 then
    break
  end
  local adds, add = {}, 0
  for i = 1, #pointers, 2 do
    local key = blobkey(bprefix, pointers[i], pointers[i + 1])
    if not live[key] and not adds[key] then
      adds[key] = true
      add = add + redis.call('STRLEN', key)
    end
  end
  if kept >= 1 and (kept >= keep or bytes + add > budget) then
    break
  end
  for key in pairs(adds) do
    live[key] = true
  end
  bytes, kept, v = bytes + add, kept + 1, v - 1
end
while v >= 1 do
  local manifest = mprefix .. v
  local pointers = redis.call('HGETALL', manifest)
  if #pointers == 0 then
    break
  end
  for i = 1, #pointers, 2 do
    local key = blobkey(bprefix, pointers[i], pointers[i + 1])
    if not live[key] then
      redis.call('PEXPIRE', key, ttl)
    end
  end
  redis.call('DEL', manifest)
  v = v - 1
end
if made then
  redis.call('PUBLISH', channel, version)
end
return {version, kept, bytes, written, unpack(stale)}
"""
)

# The digest of a manifest: sha1 of its "part digest" entries, sorted. It names the
# content of a version, so it tells apart two versions with one number (after Redis
# lost its data and counted from 1 again) unless they hold the very same blobs.
_DIGEST = """
local function digest(pointers)
  local entries = {}
  for i = 1, #pointers, 2 do
    entries[#entries + 1] = pointers[i] .. ' ' .. pointers[i + 1]
  end
  table.sort(entries)
  return redis.sha1hex(table.concat(entries, '\\n'))
end
"""

# KEYS: current. ARGV: manifest key prefix, blob key prefix.
# Returns false when no version exists, else
# {version, digest, part, blob digest, blob, part, blob digest, blob, ...}
# with false (nil) for a blob that is gone.
_READ = (
    _DIGEST
    + _BLOB_KEY
    + """
local version = redis.call('GET', KEYS[1])
if not version then
  return false
end
local pointers = redis.call('HGETALL', ARGV[1] .. version)
local out = {version, digest(pointers)}
for i = 1, #pointers, 2 do
  out[#out + 1] = pointers[i]
  out[#out + 1] = pointers[i + 1]
  out[#out + 1] = redis.call('GET', blobkey(ARGV[2], pointers[i], pointers[i + 1]))
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


class ParamStoreSettings(BaseSettings):
    """How many versions of each model the parameter store keeps.

    Each publish applies these to the model it publishes, so every publisher of a
    model should run with the same values. The defaults keep 20 versions (five
    seconds of history at the services' 0.25 s publish interval, enough to compare
    or roll back to a recent version) unless they hold more than 256 MiB of blobs:
    a large model (10k arms over 8 partitions of LinUCB is about 60 MB a version)
    keeps fewer versions instead of more memory.
    """

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_PARAMS_", env_file=".env", extra="ignore"
    )

    keep_versions: int = Field(20, ge=1)
    """``STREAMREC_PARAMS_KEEP_VERSIONS``: the newest versions (manifests) kept per model."""
    keep_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """``STREAMREC_PARAMS_KEEP_BYTES``: bytes of blobs the kept versions may reference,
    per model, each blob counted once; the newest version is kept even if larger."""
    blob_ttl_s: float = Field(1.0, gt=0)
    """``STREAMREC_PARAMS_BLOB_TTL_S``: how long a blob that no kept version references
    stays readable, for readers that fetch a manifest and its blobs in separate commands."""


class ModelNotFound(StreamrecError, LookupError):
    """No version of the model has been published (or none is loaded yet)."""

    def __init__(self, model: str, detail: str = "no version published") -> None:
        super().__init__(f"model {model!r}: {detail}")
        self.model = model


class StalePublish(StreamrecError, RuntimeError):
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
        self.written_bytes = Counter(
            "streamrec_params_written_bytes_total",
            "Bytes of blobs written to Redis; a part published unchanged writes none.",
            ["model"],
            registry=registry,
        )
        self.retained_versions = Gauge(
            "streamrec_params_retained_versions",
            "Versions of the model kept in Redis after this process's last publish.",
            ["model"],
            registry=registry,
        )
        self.retained_bytes = Gauge(
            "streamrec_params_retained_bytes",
            "Bytes of blobs the kept versions reference, after this process's last publish.",
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
            "streamrec_params_fenced_parts_total",
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
            "streamrec_params_reader_errors_total",
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
        blob_ttl_s: how long a blob that no kept version references stays readable.
        keep_versions: the newest versions kept per model.
        keep_bytes: bytes of blobs the kept versions may reference per model (the
            newest version is kept whatever its size).
        registry: Prometheus registry for the publish series; ``None`` gives a
            private one (see :attr:`registry`).

    Retention arguments left out come from :class:`ParamStoreSettings` (the
    environment), so every publisher of a deployment applies the same retention.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        keys: KeySpace | None = None,
        blob_ttl_s: float | None = None,
        keep_versions: int | None = None,
        keep_bytes: int | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if blob_ttl_s is None or keep_versions is None or keep_bytes is None:
            defaults = ParamStoreSettings()
            blob_ttl_s = defaults.blob_ttl_s if blob_ttl_s is None else blob_ttl_s
            keep_versions = defaults.keep_versions if keep_versions is None else keep_versions
            keep_bytes = defaults.keep_bytes if keep_bytes is None else keep_bytes
        if not (np.isfinite(blob_ttl_s) and blob_ttl_s > 0):
            raise ValueError(f"blob_ttl_s must be a positive number of seconds, got {blob_ttl_s!r}")
        for name, value in (("keep_versions", keep_versions), ("keep_bytes", keep_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "ParamStore needs a client with decode_responses=False (blobs are bytes)"
            )
        self._redis = client
        self.keys = keys if keys is not None else KeySpace()
        self.blob_ttl_s = float(blob_ttl_s)
        self.keep_versions = keep_versions
        self.keep_bytes = keep_bytes
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = param_metrics(self.registry)
        self._publish = client.register_script(_PUBLISH)
        self._read = client.register_script(_READ)
        self._head = client.register_script(_HEAD)
        self._versions = client.register_script(_VERSIONS)
        self._registered: set[str] = set()
        # (model, part) -> digest of the blob this store last published for it. A part
        # published again with that digest is sent without its bytes; the script asks
        # for them if the blob is gone after all (e.g. Redis lost its data).
        self._stored: dict[tuple[str, str], str] = {}
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
        """Publish blobs for some parts of ``model``; returns the version that holds them.

        Parts not named here keep their earlier blobs, which is how processes that
        each own some partitions build one model together. Each blob must verify
        (checksum included) and name ``model``; a bad one raises
        :class:`~contracts.params.ParamError` and nothing is published. A part
        whose blob is byte for byte the one it has writes nothing; if no part
        changes, no version is made and the current one is returned.

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
        blobs: list[tuple[str, bytes, str]] = []
        for part, blob in parts.items():
            _check_name("part", part)
            blob = bytes(blob)
            try:
                header = verify_params(blob)
            except ParamError as exc:
                raise ParamError(f"model {model!r} part {part!r}: {exc}") from None
            if header["model"] != model:
                raise ParamError(
                    f"part {part!r} was encoded for model {header['model']!r}, not {model!r}"
                )
            blobs.append((part, blob, str(header["sha256"])))
        elide = {part for part, _, digest in blobs if self._stored.get((model, part)) == digest}
        reply = self._run_publish(model, blobs, fence, owner, elide)
        if int(reply[0]) == -1:  # a blob left out is gone: send them all
            reply = self._run_publish(model, blobs, fence, owner, set())
        version, kept, kept_bytes, written = (int(n) for n in reply[:4])
        names = [name.decode() for name in reply[4:]]
        for part, _, digest in blobs:
            if part in names:
                self._stored.pop((model, part), None)
            else:
                self._stored[(model, part)] = digest
        if names:
            self._metrics.fenced.labels(model).inc(len(names))
            log.warning("%s: parts %s not published: a newer owner published them", model, names)
            if not version:
                raise StalePublish(model, names)
        if version == 1 or model not in self._registered:
            # models() has no hash tag (it spans models), so it stays out of the script;
            # version 1 also means a Redis that lost its data, models() included.
            self._redis.sadd(self.keys.models(), model)
            self._registered.add(model)
        size = sum(len(blob) for _, blob, _ in blobs)
        self._metrics.publish_seconds.labels(model).observe(time.perf_counter() - started)
        self._metrics.publish_bytes.labels(model).set(size)
        self._metrics.written_bytes.labels(model).inc(written)
        self._metrics.retained_versions.labels(model).set(kept)
        self._metrics.retained_bytes.labels(model).set(kept_bytes)
        self._metrics.version.labels(model).set(version)
        self._metrics.publish_timestamp.labels(model).set_to_current_time()
        log.debug(
            "published %s v%d (%s: %d bytes, %d written; keeping %d versions, %d bytes)",
            model,
            version,
            ", ".join(parts),
            size,
            written,
            kept,
            kept_bytes,
        )
        return version

    def _run_publish(
        self,
        model: str,
        blobs: Sequence[tuple[str, bytes, str]],
        fence: Mapping[str, int],
        owner: str,
        elide: set[str],
    ) -> list[Any]:
        keys = [
            self.keys.params_current(model),
            self.keys.params_parts(model),
            self.keys.params_fence(model),
        ]
        args: list[str | bytes | int] = [
            self._manifest_prefix(model),
            self._blob_prefix(model),
            self.keys.params_channel(model),
            owner,
            max(1, round(self.blob_ttl_s * 1000)),
            self.keep_versions,
            self.keep_bytes,
        ]
        for part, blob, digest in blobs:
            keys.append(self.keys.params_blob(model, part, digest))
            token = fence.get(part)
            args += [
                part,
                digest,
                b"" if part in elide else blob,
                "" if token is None else int(token),
            ]
        return cast(list[Any], self._publish(keys=keys, args=args))

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
        """Part name → blob key of a retained version (empty if the manifest is gone).

        The key ends with the blob's digest (see :meth:`digests`).
        """
        return {
            part: self._blob_key(model, part, ref)
            for part, ref in self.digests(model, version).items()
        }

    def digests(self, model: str, version: int) -> dict[str, str]:
        """Part name → sha256 of its blob in a retained version (empty if the manifest is gone).

        A manifest written before blobs were content-addressed names whole blob
        keys instead; those are returned as they are.
        """
        key = self.keys.params_manifest(_check_name("model", model), version)
        raw = cast(dict[bytes, bytes], self._redis.hgetall(key))
        return {part.decode(): ref.decode() for part, ref in sorted(raw.items())}

    def models(self) -> list[str]:
        """Every model ever published in this namespace, sorted."""
        names = cast(set[bytes], self._redis.smembers(self.keys.models()))
        return sorted(name.decode() for name in names)

    def head(self, model: str) -> tuple[int, str] | None:
        """``(version, digest)`` of the current version in one small script, or ``None``.

        The digest (sha1 of the version's part names and blob digests) names the
        version's content, so it tells two versions with one number apart: a Redis
        that lost its data counts again from 1. Readers that poll compare both;
        see :class:`ParamWatcher`.
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
        when a blob is missing, fails its checksum or is not the one its manifest names.
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

    def _load(self, model: str) -> tuple[int, str, dict[str, ParamSet]]:
        _check_name("model", model)
        reply = self._read(
            keys=[self.keys.params_current(model)],
            args=[self._manifest_prefix(model), self._blob_prefix(model)],
        )
        if reply is None:
            raise ModelNotFound(model)
        version, digest = int(reply[0]), reply[1].decode()
        if len(reply) == 2:
            raise ParamError(f"model {model!r} v{version}: manifest is missing")
        parts: dict[str, ParamSet] = {}
        for raw_name, raw_ref, blob in zip(reply[2::3], reply[3::3], reply[4::3], strict=True):
            part, ref = raw_name.decode(), raw_ref.decode()
            where = f"model {model!r} part {part!r} v{version}"
            if blob is None:
                raise ParamError(f"{where}: blob is missing (deleted or evicted)")
            try:
                decoded = decode_params(blob)
            except ParamError as exc:
                raise ParamError(f"{where}: {exc}") from None
            if decoded.model != model:
                raise ParamError(f"{where}: blob names model {decoded.model!r}")
            if ":" not in ref and decoded.checksum != ref:
                raise ParamError(f"{where}: blob is not the one the manifest names ({ref})")
            parts[part] = decoded
        return version, digest, dict(sorted(parts.items()))

    def _blob_key(self, model: str, part: str, ref: str) -> str:
        # As the scripts' blobkey(): a reference with a colon is a whole key (earlier layout).
        return ref if ":" in ref else self.keys.params_blob(model, part, ref)

    def _manifest_prefix(self, model: str) -> str:
        # The scripts build manifest keys from the version; derive the prefix from
        # the key layout and make sure the version really is its suffix.
        prefix = self.keys.params_manifest(model, 0).removesuffix("0")
        if self.keys.params_manifest(model, 12345) != f"{prefix}12345":
            raise RuntimeError("params_manifest keys must end with the version number")
        return prefix

    def _blob_prefix(self, model: str) -> str:
        # The scripts build blob keys as prefix .. part .. ':' .. digest; check the layout agrees.
        prefix = self.keys.params_blob(model, "p", "d").removesuffix("p:d")
        if self.keys.params_blob(model, "part", "0f") != f"{prefix}part:0f":
            raise RuntimeError("params_blob keys must end with <part>:<digest>")
        return prefix


def combine_parts(
    model: str,
    version: int,
    parts: Mapping[str, ParamSet],
    *,
    combine: Combiner | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """One header and one set of arrays from the parts of a version.

    One part is returned as is. Several parts are combined by ``combine``, called
    with the parts' arrays in part-name order; the reader passes it, because only
    it knows what the arrays are (a bandit learner's ``merge`` sums per-partition
    statistics). Without one, a version of several parts raises
    :class:`~contracts.params.ParamError`.

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
        raise ParamError(f"model {model!r} v{version} has parts {names}: pass combine=")
    return header, dict(combine([dict(p.arrays) for p in sets]))


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
