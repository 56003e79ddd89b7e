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
- ``history``: sorted set, each retained version → its publish time (Redis TIME,
  microseconds, strictly rising with the version).
- ``refs`` and ``sizes``: hashes, blob key → how many retained manifests name it,
  and its bytes; ``retention``: hash with the live blob ``bytes`` (each blob
  counted once), the ``last`` publish time and the age tiers' cursors.
- ``pin``: hash (``version``, ``reason``, ``by``, ``at``), present while the model
  is pinned.

``publish`` is one Lua script: write the blobs that are not stored yet, repoint
the parts that changed, and, if any did, INCR ``current``, copy ``parts`` into the
new manifest, add it to ``history`` and count its blobs' references, and PUBLISH
the version on the model's channel. A publish in which no part changed makes no
version. The same script then applies retention, incrementally
(docs/decisions.md, "Model history"):

1. Age tiers (:class:`ParamStoreSettings`): every version younger than
   ``keep_all_s`` is kept; up to ``keep_recent_s`` the newest version of each
   second; up to ``keep_age_s`` the newest of each minute; older ones go. A
   version's fate changes only when its age passes a tier's edge (rounded down to
   the tier's bucket, so a bucket is judged complete), so each tier keeps a cursor
   and judges only the versions that passed its edge since the last publish: about
   one per publish, whatever the history holds.
2. Count and bytes: while more than ``keep_versions`` versions are kept, or the
   blobs they name (each counted once) exceed ``keep_bytes``, the oldest goes.

The newest version and the pinned one are never dropped. Dropping a version
deletes its manifest and decrements its blobs' references; a blob no retained
manifest names is retired: it expires after ``blob_ttl_s``, so a reader that walks
the keys one command at a time still finds the blobs of a manifest it read. A
model written before the history existed joins it at its next publish or pin (its
manifests get the time of that publish).

Pins: :meth:`ParamStore.pin` (and :meth:`~ParamStore.rollback`) set ``pin`` in a
script that checks the version is retained, so retention, which reads ``pin`` in
its own script, can never drop it afterwards. ``head`` and the read behind
``latest_parts``/``latest`` read ``pin`` inside the same script as the manifest
and blobs, so a reader gets the pinned version or the newest, whole, never a mix;
the digest ``head`` returns includes whether the version is served by a pin, so
every :class:`ParamWatcher` reloads on a pin and on an unpin. Publishes go on
while pinned (``current`` moves on); unpinning serves the newest at once.

A part published with a fencing token (the publisher's ownership epoch of the
partition the part holds) is skipped if the same owner (consumer group) published
it with a higher token: a process that froze while publishing and wakes after a
new owner of its partition took over cannot put an older state back.

``latest_parts`` is one Lua script too, so a reader gets the version served, its
manifest and every blob in one round trip and never sees half a version: scripts
run one at a time, and every publish leaves each blob of a kept manifest in place. A
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
from dataclasses import dataclass
from typing import Any, cast

import msgspec
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

# The scripts that change a model's versions (publish, pin, unpin) share one key and
# argument layout and the retention functions below.
# KEYS: current, parts, fence, history, pin, refs, sizes, retention, then the
#       script's own (publish: the blob key of each part).
# ARGV: manifest key prefix, blob key prefix, channel, retired-blob TTL (ms), the
#       time in microseconds ("" for Redis TIME), versions to keep, bytes to keep,
#       then the ages (microseconds) up to which every version is kept, one per
#       second is kept, one per minute is kept; then the script's own arguments.
# Times are microseconds since the epoch: exact in a Lua number (a double) and
# written with us(), since tostring() would round them.
_RETAIN = (
    _BLOB_KEY
    + """
local current, parts, fence, history, pin, refs, sizes, retention =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local mprefix, bprefix, channel = ARGV[1], ARGV[2], ARGV[3]
local ttl, keep, budget = tonumber(ARGV[4]), tonumber(ARGV[6]), tonumber(ARGV[7])
-- {age above which the tier applies, width of its buckets (false: none kept)}
local tiers = {{tonumber(ARGV[8]), 1000000}, {tonumber(ARGV[9]), 60000000},
               {tonumber(ARGV[10]), false}}

local function us(t)
  return string.format('%.0f', t)
end

-- Now, never before the last publish, so that publish times rise with versions.
local function now()
  local t
  if ARGV[5] ~= '' then
    t = tonumber(ARGV[5])
  else
    local clock = redis.call('TIME')
    t = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
  end
  return math.max(t, tonumber(redis.call('HGET', retention, 'last') or '0'))
end

local function ref(key)
  if redis.call('HINCRBY', refs, key, 1) == 1 then
    local size = redis.call('STRLEN', key)
    redis.call('HSET', sizes, key, size)
    redis.call('HINCRBY', retention, 'bytes', size)
    redis.call('PERSIST', key)
  end
end

local function unref(key)
  if redis.call('HINCRBY', refs, key, -1) <= 0 then
    local size = tonumber(redis.call('HGET', sizes, key) or '0')
    redis.call('HDEL', refs, key)
    redis.call('HDEL', sizes, key)
    redis.call('HINCRBY', retention, 'bytes', -size)
    redis.call('PEXPIRE', key, ttl)
  end
end

local function blobs(version, each)
  local pointers = redis.call('HGETALL', mprefix .. version)
  for i = 1, #pointers, 2 do
    each(blobkey(bprefix, pointers[i], pointers[i + 1]))
  end
end

local function add(version, t)
  redis.call('ZADD', history, us(t), version)
  blobs(version, ref)
end

local function drop(version)
  blobs(version, unref)
  redis.call('DEL', mprefix .. version)
  redis.call('ZREM', history, version)
end

-- A model written before the history existed: its manifests join it, oldest first.
local function bootstrap(t)
  if redis.call('EXISTS', history) == 1 then
    return
  end
  local found, v = {}, tonumber(redis.call('GET', current) or '0')
  while v >= 1 and redis.call('EXISTS', mprefix .. v) == 1 do
    found[#found + 1] = v
    v = v - 1
  end
  for i = #found, 1, -1 do
    add(found[i], t - i)
  end
end

local function pinned()
  return tonumber(redis.call('HGET', pin, 'version') or '0')
end

-- Whether a newer retained version was published in the same bucket as `score`.
local function newer_in(score, width)
  local stop = (math.floor(score / width) + 1) * width
  local found = redis.call('ZRANGEBYSCORE', history, '(' .. us(score), '(' .. us(stop),
                           'LIMIT', 0, 1)
  return #found > 0
end

-- Where tier i begins: versions published before it are past the tier's age. For the
-- tiers that keep one version per bucket, it is rounded down to a bucket boundary, so
-- that a bucket is judged once it is complete.
local function edge(i, t)
  local limit, width = tiers[i][1], tiers[i][2]
  if not width then
    return t - limit
  end
  return math.floor((t - limit) / width) * width
end

-- Whether the age tiers drop a version published at `score` (never the newest).
local function judged(version, score, t, newest)
  if version == newest then
    return false
  end
  for i = #tiers, 1, -1 do
    if score < edge(i, t) then
      return (not tiers[i][2]) or newer_in(score, tiers[i][2])
    end
  end
  return false
end

-- Thinning: a version's fate only changes when it passes a tier's edge, so each tier
-- keeps a cursor (the edge it had reached) and judges just the versions that passed
-- it since: about one per publish.
local function thin(t, newest)
  local keeping = pinned()
  for i = 1, #tiers do
    local cursor = 'cursor' .. i
    local from = redis.call('HGET', retention, cursor) or '-inf'
    local upto = edge(i, t)
    if from == '-inf' or upto > tonumber(from) then
      local crossed = redis.call('ZRANGEBYSCORE', history, from, '(' .. us(upto), 'WITHSCORES')
      for j = 1, #crossed, 2 do
        local version = tonumber(crossed[j])
        if version ~= keeping and judged(version, tonumber(crossed[j + 1]), t, newest) then
          drop(version)
        end
      end
      redis.call('HSET', retention, cursor, us(upto))
    end
  end
end

-- Count and bytes: drop the oldest versions (never the pinned one or the newest).
local function bound(newest)
  local keeping, skip = pinned(), 0
  while redis.call('ZCARD', history) > keep
      or tonumber(redis.call('HGET', retention, 'bytes') or '0') > budget do
    local oldest = redis.call('ZRANGE', history, skip, skip)
    if #oldest == 0 or tonumber(oldest[1]) == newest then
      break
    end
    if tonumber(oldest[1]) == keeping then
      skip = skip + 1
    else
      drop(tonumber(oldest[1]))
    end
  end
  return redis.call('ZCARD', history), tonumber(redis.call('HGET', retention, 'bytes') or '0')
end
"""
)

# ARGV (after the shared ten): fence owner, then (part name, digest, blob or "",
# fencing token or "") quadruples in the order of the blob keys. An empty blob
# stands for one the caller believes stored; a token is only compared with one of
# the same owner.
# Returns {version, kept versions, kept bytes, bytes written, part names...}:
# version 0 if every part was stale (the names are the stale parts), -1 if a blob
# left out is not stored (the names are those parts; nothing was written), else
# the new version, or the current one if no part changed (the names are the stale
# parts). Manifest and blob keys other than the declared ones are built inside the
# script; they share the model's hash tag, so on Redis Cluster they live in the
# slot of the declared keys.
_PUBLISH = (
    _RETAIN
    + """
local owner = ARGV[11]
local stale, missing, accepted = {}, {}, {}
for i = 9, #KEYS do
  local a = 12 + 4 * (i - 9)
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
local t = now()
bootstrap(t)
local changed, written = 0, 0
for _, i in ipairs(accepted) do
  local a = 12 + 4 * (i - 9)
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
  -- Strictly after the previous publish: versions and times order alike.
  local last = tonumber(redis.call('HGET', retention, 'last') or '-1')
  if t <= last then
    t = last + 1
  end
  add(version, t)
  redis.call('HSET', retention, 'last', us(t))
end
thin(t, version)
local kept, bytes = bound(version)
if made then
  redis.call('PUBLISH', channel, version)
end
return {version, kept, bytes, written, unpack(stale)}
"""
)

# ARGV (after the shared ten): the version to pin ("": the newest retained one older
# than the version served now), reason, by. Returns {version, time pinned} or
# {0} if that version is not retained, {-1} if none is older than the one served.
_PIN = (
    _RETAIN
    + """
local t = now()
bootstrap(t)
local version = ARGV[11]
if version == '' then
  local served = redis.call('HGET', pin, 'version') or redis.call('GET', current)
  local score = served and redis.call('ZSCORE', history, served)
  if not score then
    return {0}
  end
  local older = redis.call('ZREVRANGEBYSCORE', history, '(' .. score, '-inf', 'LIMIT', 0, 1)
  if #older == 0 then
    return {-1}
  end
  version = older[1]
elseif not redis.call('ZSCORE', history, version)
    or redis.call('EXISTS', mprefix .. version) == 0 then
  return {0}
end
redis.call('HSET', pin, 'version', version, 'reason', ARGV[12], 'by', ARGV[13], 'at', us(t))
return {tonumber(version), us(t)}
"""
)

# Returns the pin removed (HGETALL pairs), empty if there was none. The version it
# kept is judged by the retention policy at once, as if it had never been pinned.
_UNPIN = (
    _RETAIN
    + """
local removed = redis.call('HGETALL', pin)
if #removed == 0 then
  return removed
end
redis.call('DEL', pin)
local t = now()
local version = 0
for i = 1, #removed, 2 do
  if removed[i] == 'version' then
    version = tonumber(removed[i + 1])
  end
end
local newest = tonumber(redis.call('GET', current) or '0')
local score = redis.call('ZSCORE', history, version)
if score and judged(version, tonumber(score), t, newest) then
  drop(version)
end
bound(newest)
return removed
"""
)

# The digest of a manifest: sha1 of its "part digest" entries, sorted, and of whether
# the version is served because it is pinned. It names the content of a version, so
# it tells apart two versions with one number (after Redis lost its data and counted
# from 1 again) unless they hold the very same blobs; and it changes when a pin is
# set or lifted, so that every reader that polls it reloads.
_DIGEST = """
local function digest(pointers, pinned)
  local entries = {}
  for i = 1, #pointers, 2 do
    entries[#entries + 1] = pointers[i] .. ' ' .. pointers[i + 1]
  end
  table.sort(entries)
  if pinned then
    entries[#entries + 1] = 'pinned'
  end
  return redis.sha1hex(table.concat(entries, '\\n'))
end

-- The version served: the pinned one if there is a pin, else the newest.
local function served(current, pin)
  local pinned = redis.call('HGET', pin, 'version')
  if pinned then
    return pinned, true
  end
  return redis.call('GET', current), false
end
"""

# KEYS: current, pin. ARGV: manifest key prefix, blob key prefix, version ("": the
# one served). Returns false when there is no such version, else
# {version, digest, pinned (0/1), part, blob digest, blob, part, blob digest, blob, ...}
# with false (nil) for a blob that is gone. Reading the pin, the manifest and the
# blobs in one script is what makes a reader see one whole version, pinned or not.
_READ = (
    _DIGEST
    + _BLOB_KEY
    + """
local version, pinned = ARGV[3], false
if version == '' then
  version, pinned = served(KEYS[1], KEYS[2])
  if not version then
    return false
  end
else
  pinned = redis.call('HGET', KEYS[2], 'version') == version
  if redis.call('EXISTS', ARGV[1] .. version) == 0 then
    return false
  end
end
local pointers = redis.call('HGETALL', ARGV[1] .. version)
local out = {version, digest(pointers, pinned), pinned and 1 or 0}
for i = 1, #pointers, 2 do
  out[#out + 1] = pointers[i]
  out[#out + 1] = pointers[i + 1]
  out[#out + 1] = redis.call('GET', blobkey(ARGV[2], pointers[i], pointers[i + 1]))
end
return out
"""
)

# KEYS: current, pin. ARGV: manifest key prefix. Returns false or {version, digest}
# of the version served.
_HEAD = (
    _DIGEST
    + """
local version, pinned = served(KEYS[1], KEYS[2])
if not version then
  return false
end
return {version, digest(redis.call('HGETALL', ARGV[1] .. version), pinned)}
"""
)

# Retained versions and their times, oldest first: the history, or for a model not
# published since the history existed, the run of manifests below the newest (time 0).
# KEYS: current, history. ARGV: manifest key prefix. Returns {version, time, ...}.
_RETAINED = """
local function retained()
  local found = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
  if #found > 0 then
    return found
  end
  local version = tonumber(redis.call('GET', KEYS[1]) or '0')
  local older = {}
  while version >= 1 and redis.call('EXISTS', ARGV[1] .. version) == 1 do
    table.insert(older, 1, '0')
    table.insert(older, 1, tostring(version))
    version = version - 1
  end
  return older
end
"""

_VERSIONS = _RETAINED + "\nreturn retained()\n"

# KEYS: current, history, pin. ARGV: manifest key prefix, blob key prefix.
# Returns {pinned version or "", {{version, time, {part, ref, ...}}, ...},
# {{blob key, bytes, header JSON}, ...}}, each blob once. A blob's header is read
# with GETRANGE (magic, u32 length, JSON: see contracts/params.py), not the blob.
_HISTORY = (
    _RETAINED
    + _BLOB_KEY
    + """
local function header(key)
  local head = redis.call('GETRANGE', key, 0, 4095)
  if #head < 12 then
    return ''
  end
  local a, b, c, d = string.byte(head, 9, 12)
  local size = a + 256 * (b + 256 * (c + 256 * d))
  if 12 + size > #head then
    head = redis.call('GETRANGE', key, 0, 11 + size)
  end
  return string.sub(head, 13, 12 + size)
end

local versions, blobs, seen = {}, {}, {}
local found = retained()
for i = 1, #found, 2 do
  local pointers = redis.call('HGETALL', ARGV[1] .. found[i])
  if #pointers > 0 then
    versions[#versions + 1] = {found[i], found[i + 1], pointers}
    for j = 1, #pointers, 2 do
      local key = blobkey(ARGV[2], pointers[j], pointers[j + 1])
      if not seen[key] then
        seen[key] = true
        blobs[#blobs + 1] = {key, redis.call('STRLEN', key), header(key)}
      end
    end
  end
end
return {redis.call('HGET', KEYS[3], 'version') or '', versions, blobs}
"""
)


class ParamStoreSettings(BaseSettings):
    """Which versions of each model the parameter store keeps (see the module docstring).

    Each publish applies these to the model it publishes, so every publisher of a
    model should run with the same values. The defaults keep every version of the
    last 5 s (the 20 versions at the services' 0.25 s publish interval that earlier
    releases kept), the newest of each second for an hour, the newest of each
    minute for a day, at most 10,000 versions and at most 256 MiB of blobs (each
    counted once); the newest version and a pinned one are always kept.
    """

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_PARAMS_", env_file=".env", extra="ignore"
    )

    keep_all_s: float = Field(5.0, ge=0)
    """``STREAMREC_PARAMS_KEEP_ALL_S``: every version younger than this is kept."""
    keep_recent_s: float = Field(3600.0, ge=0)
    """``STREAMREC_PARAMS_KEEP_RECENT_S``: up to this age, the newest version of each second."""
    keep_age_s: float = Field(86400.0, ge=0)
    """``STREAMREC_PARAMS_KEEP_AGE_S``: up to this age, the newest version of each minute;
    older versions are dropped."""
    keep_versions: int = Field(10_000, ge=1)
    """``STREAMREC_PARAMS_KEEP_VERSIONS``: at most this many versions per model (the oldest go)."""
    keep_bytes: int = Field(256 * 1024 * 1024, ge=1)
    """``STREAMREC_PARAMS_KEEP_BYTES``: bytes of blobs the kept versions may reference,
    per model, each blob counted once (the oldest versions go); the newest version
    and a pinned one are kept even if larger."""
    blob_ttl_s: float = Field(1.0, gt=0)
    """``STREAMREC_PARAMS_BLOB_TTL_S``: how long a blob that no kept version references
    stays readable, for readers that fetch a manifest and its blobs in separate commands."""


@dataclass(frozen=True)
class Pin:
    """A model's pin: the version its readers are served instead of the newest."""

    version: int
    reason: str
    by: str
    """Who pinned it: ``"operator"`` or ``"guard"``."""
    at: float
    """Unix seconds (Redis time) when it was pinned."""


@dataclass(frozen=True)
class VersionInfo:
    """One retained version of a model, as :meth:`ParamStore.history` lists it."""

    version: int
    published_at: float
    """Unix seconds, Redis server time of the publish (0 for a version published before
    the history existed)."""
    digests: dict[str, str]
    """Part name → sha256 of its blob."""
    size_bytes: int
    """The version's blobs, each counted once."""
    offsets: dict[str, int]
    """``"topic:partition"`` → next offset to consume, the union of the parts' offsets."""
    events: int | None
    """Events seen: the sum of the parts' ``meta["events"]`` when every part records it."""
    pinned: bool
    """Whether this version is the model's pin."""


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
        keep_all_s, keep_recent_s, keep_age_s, keep_versions, keep_bytes: the
            retention policy (see :class:`ParamStoreSettings` and the module docstring).
        clock: unix seconds to stamp publishes and pins with instead of Redis
            server time; for tests and benchmarks that simulate hours of
            publishes. Leave it out in production, so that every publisher of a
            model shares Redis's clock.
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
        keep_all_s: float | None = None,
        keep_recent_s: float | None = None,
        keep_age_s: float | None = None,
        keep_versions: int | None = None,
        keep_bytes: int | None = None,
        clock: Callable[[], float] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        defaults = (
            ParamStoreSettings()
            if None
            in (blob_ttl_s, keep_all_s, keep_recent_s, keep_age_s, keep_versions, keep_bytes)
            else None
        )
        ages = {
            "blob_ttl_s": blob_ttl_s,
            "keep_all_s": keep_all_s,
            "keep_recent_s": keep_recent_s,
            "keep_age_s": keep_age_s,
        }
        counts = {"keep_versions": keep_versions, "keep_bytes": keep_bytes}
        seconds: dict[str, float] = {}
        for name, value in ages.items():
            value = getattr(defaults, name) if value is None else value
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (np.isfinite(value) and value >= 0)
                or (name == "blob_ttl_s" and value == 0)
            ):
                kind = "positive" if name == "blob_ttl_s" else "non-negative"
                raise ValueError(f"{name} must be a {kind} number of seconds, got {value!r}")
            seconds[name] = float(value)
        limits: dict[str, int] = {}
        for name, count in counts.items():
            count = getattr(defaults, name) if count is None else count
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {count!r}")
            limits[name] = count
        if not seconds["keep_all_s"] <= seconds["keep_recent_s"] <= seconds["keep_age_s"]:
            raise ValueError(
                "retention ages must rise: keep_all_s <= keep_recent_s <= keep_age_s, got "
                f"{seconds['keep_all_s']}, {seconds['keep_recent_s']}, {seconds['keep_age_s']}"
            )
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError(
                "ParamStore needs a client with decode_responses=False (blobs are bytes)"
            )
        self._redis = client
        self.keys = keys if keys is not None else KeySpace()
        self.blob_ttl_s = seconds["blob_ttl_s"]
        self.keep_all_s = seconds["keep_all_s"]
        self.keep_recent_s = seconds["keep_recent_s"]
        self.keep_age_s = seconds["keep_age_s"]
        self.keep_versions = limits["keep_versions"]
        self.keep_bytes = limits["keep_bytes"]
        self._clock = clock
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metrics = param_metrics(self.registry)
        self._publish = client.register_script(_PUBLISH)
        self._pin = client.register_script(_PIN)
        self._unpin = client.register_script(_UNPIN)
        self._read = client.register_script(_READ)
        self._head = client.register_script(_HEAD)
        self._versions = client.register_script(_VERSIONS)
        self._history = client.register_script(_HISTORY)
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
        keys = self._retention_keys(model)
        args = [*self._retention_args(model), owner]
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

    def _retention_keys(self, model: str) -> list[str]:
        # The shared KEYS of the publish, pin and unpin scripts (see _RETAIN).
        return [
            self.keys.params_current(model),
            self.keys.params_parts(model),
            self.keys.params_fence(model),
            self.keys.params_history(model),
            self.keys.params_pin(model),
            self.keys.params_refs(model),
            self.keys.params_sizes(model),
            self.keys.params_retention(model),
        ]

    def _retention_args(self, model: str) -> list[str | bytes | int]:
        # The shared ARGV of the publish, pin and unpin scripts (see _RETAIN).
        return [
            self._manifest_prefix(model),
            self._blob_prefix(model),
            self.keys.params_channel(model),
            max(1, round(self.blob_ttl_s * 1000)),
            "" if self._clock is None else _micros(self._clock()),
            self.keep_versions,
            self.keep_bytes,
            _micros(self.keep_all_s),
            _micros(self.keep_recent_s),
            _micros(self.keep_age_s),
        ]

    # -- pins ----------------------------------------------------------------------

    def pin(self, model: str, version: int, *, reason: str, by: str = "operator") -> Pin:
        """Serve ``version`` of ``model`` to every reader until :meth:`unpin`.

        :meth:`head`, :meth:`latest_parts` and :meth:`latest` (and so every
        :class:`ParamWatcher`) serve the pinned version from their next read on;
        publishes go on making new versions, which :meth:`current_version` reports
        and serving picks up once unpinned. Retention never drops a pinned version.
        A pin replaces any earlier one. Raises :class:`ModelNotFound` if ``version``
        is not retained.
        """
        return self._set_pin(model, str(_check_version(version)), reason, by)

    def rollback(
        self,
        model: str,
        version: int | None = None,
        *,
        reason: str = "rollback",
        by: str = "operator",
    ) -> Pin:
        """Pin ``version``; by default the newest retained version older than the one served.

        Served means the pinned version if there is a pin, else the newest, so
        rolling back twice goes two versions back. Raises :class:`ModelNotFound`
        if there is no such version.
        """
        target = "" if version is None else str(_check_version(version))
        return self._set_pin(model, target, reason, by)

    def _set_pin(self, model: str, target: str, reason: str, by: str) -> Pin:
        _check_name("model", model)
        if not isinstance(reason, str) or not isinstance(by, str) or not by:
            raise ValueError(
                f"pin reason and by must be strings (by non-empty), got {reason!r}, {by!r}"
            )
        reply = self._pin(
            keys=self._retention_keys(model),
            args=[*self._retention_args(model), target, reason, by],
        )
        if int(reply[0]) == 0:
            detail = f"version {target} is not retained" if target else "no version is served"
            raise ModelNotFound(model, detail)
        if int(reply[0]) == -1:
            raise ModelNotFound(model, "no retained version is older than the one served")
        pin = Pin(int(reply[0]), reason, by, int(reply[1]) / 1e6)
        log.warning("%s: pinned v%d by %s (%s)", model, pin.version, by, reason)
        return pin

    def unpin(self, model: str) -> Pin | None:
        """Serve the newest version again; returns the pin removed, ``None`` if there was none.

        The version that was pinned is then kept or dropped by the retention policy
        like any other.
        """
        _check_name("model", model)
        reply = self._unpin(keys=self._retention_keys(model), args=self._retention_args(model))
        pin = _pin_from(_pairs(reply))
        if pin is not None:
            log.warning("%s: unpinned v%d", model, pin.version)
        return pin

    def pin_of(self, model: str) -> Pin | None:
        """The model's pin, ``None`` if it serves its newest version."""
        raw = cast(
            dict[bytes, bytes],
            self._redis.hgetall(self.keys.params_pin(_check_name("model", model))),
        )
        return _pin_from({k.decode(): v.decode() for k, v in raw.items()})

    # -- reading -----------------------------------------------------------------

    def history(self, model: str) -> list[VersionInfo]:
        """Every retained version of ``model``, oldest first, read in one script.

        Offsets and events come from the blobs' headers, which this reads without
        the arrays and without checking checksums (:meth:`version_parts` checks them).
        """
        _check_name("model", model)
        pinned, versions, blobs = self._history(
            keys=[
                self.keys.params_current(model),
                self.keys.params_history(model),
                self.keys.params_pin(model),
            ],
            args=[self._manifest_prefix(model), self._blob_prefix(model)],
        )
        found: dict[str, tuple[int, dict[str, Any]]] = {}
        for key, size, head in blobs:
            try:
                header = msgspec.json.decode(head) if head else {}
            except msgspec.DecodeError:
                header = {}
            found[key.decode()] = (int(size), header if isinstance(header, dict) else {})
        pin = int(pinned) if pinned else None
        out = []
        for raw_version, raw_time, pointers in versions:
            version = int(raw_version)
            refs = {
                part.decode(): ref.decode()
                for part, ref in zip(pointers[::2], pointers[1::2], strict=True)
            }
            keys = {self._blob_key(model, part, ref) for part, ref in refs.items()}
            headers = [found[key][1] for key in sorted(keys)]
            offsets: dict[str, int] = {}
            for header in headers:
                for topic, partitions in (header.get("offsets") or {}).items():
                    for partition, offset in partitions.items():
                        name = f"{topic}:{partition}"
                        offsets[name] = max(offsets.get(name, int(offset)), int(offset))
            counts = [(header.get("meta") or {}).get("events") for header in headers]
            whole = [c for c in counts if isinstance(c, int) and not isinstance(c, bool)]
            events = sum(whole) if whole and len(whole) == len(counts) else None
            out.append(
                VersionInfo(
                    version=version,
                    published_at=float(raw_time) / 1e6,
                    digests=dict(sorted(refs.items())),
                    size_bytes=sum(found[key][0] for key in keys),
                    offsets=dict(sorted(offsets.items())),
                    events=events,
                    pinned=version == pin,
                )
            )
        return out

    def version_parts(self, model: str, version: int) -> dict[str, ParamSet]:
        """Every part of a retained version, decoded and verified, in one round trip.

        Raises :class:`ModelNotFound` if the version is not retained and
        :class:`~contracts.params.ParamError` as :meth:`latest_parts` does.
        """
        _, _, _, parts = self._load(model, _check_version(version))
        return parts

    def current_version(self, model: str) -> int | None:
        """The newest version of ``model`` (one GET), or ``None`` if none was published."""
        raw = self._redis.get(self.keys.params_current(_check_name("model", model)))
        return None if raw is None else int(raw)

    def versions(self, model: str) -> list[int]:
        """Versions whose manifests are retained, oldest first (empty if none)."""
        _check_name("model", model)
        found = self._versions(
            keys=[self.keys.params_current(model), self.keys.params_history(model)],
            args=[self._manifest_prefix(model)],
        )
        return sorted(int(v) for v in found[::2])

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
        """``(version, digest)`` of the version served in one small script, or ``None``.

        The version served is the pinned one if the model is pinned, else the
        newest. The digest (sha1 of the version's part names and blob digests, and
        of whether it is served by a pin) names the version's content, so it tells
        two versions with one number apart (a Redis that lost its data counts again
        from 1) and changes when a pin is set or lifted. Readers that poll compare
        both; see :class:`ParamWatcher`.
        """
        _check_name("model", model)
        found = self._head(
            keys=[self.keys.params_current(model), self.keys.params_pin(model)],
            args=[self._manifest_prefix(model)],
        )
        return None if found is None else (int(found[0]), found[1].decode())

    def latest_parts(self, model: str) -> tuple[int, dict[str, ParamSet]]:
        """The version served (the pinned one, else the newest) and every part of it,
        decoded and verified, in one round trip.

        Raises :class:`ModelNotFound` when nothing was published and
        :class:`~contracts.params.ParamError` (naming model, part and version)
        when a blob is missing, fails its checksum or is not the one its manifest names.
        """
        version, _, _, parts = self._load(model)
        return version, parts

    def latest(
        self, model: str, *, combine: Combiner | None = None
    ) -> tuple[int, dict[str, Any], dict[str, np.ndarray]]:
        """The version served (pinned, else newest) as ``(version, header, arrays)``.

        See :func:`combine_parts` for the header and how several parts become one
        set of arrays; the header also carries the version's ``digest`` (see
        :meth:`head`) and ``pinned`` (whether it is served because of a pin).
        """
        version, digest, pinned, parts = self._load(model)
        header, arrays = combine_parts(model, version, parts, combine=combine)
        header["digest"] = digest
        header["pinned"] = pinned
        return version, header, arrays

    def _load(
        self, model: str, version: int | None = None
    ) -> tuple[int, str, bool, dict[str, ParamSet]]:
        _check_name("model", model)
        reply = self._read(
            keys=[self.keys.params_current(model), self.keys.params_pin(model)],
            args=[
                self._manifest_prefix(model),
                self._blob_prefix(model),
                "" if version is None else str(version),
            ],
        )
        if reply is None:
            raise ModelNotFound(
                model,
                "no version published" if version is None else f"version {version} is not retained",
            )
        version, digest, pinned = int(reply[0]), reply[1].decode(), bool(int(reply[2]))
        if len(reply) == 3:
            raise ParamError(f"model {model!r} v{version}: manifest is missing")
        parts: dict[str, ParamSet] = {}
        for raw_name, raw_ref, blob in zip(reply[3::3], reply[4::3], reply[5::3], strict=True):
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
        return version, digest, pinned, dict(sorted(parts.items()))

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


def _micros(seconds: float) -> int:
    return round(seconds * 1_000_000)


def _check_version(version: int) -> int:
    if isinstance(version, bool) or not isinstance(version, int | np.integer) or version < 1:
        raise ValueError(f"version must be an integer >= 1, got {version!r}")
    return int(version)


def _pairs(reply: Sequence[bytes]) -> dict[str, str]:
    return {
        key.decode(): value.decode() for key, value in zip(reply[::2], reply[1::2], strict=True)
    }


def _pin_from(fields: Mapping[str, str]) -> Pin | None:
    if "version" not in fields:
        return None
    return Pin(
        version=int(fields["version"]),
        reason=fields.get("reason", ""),
        by=fields.get("by", ""),
        at=int(fields.get("at", "0")) / 1e6,
    )


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
