"""The Redis writes of the sequences service: capped, time-ordered, exactly-once.

Layout per user (both keys carry the user's hash tag, so one script call touches
one Redis Cluster slot):

* ``KeySpace.sequence(user)``: a sorted set scored by event time in integer
  microseconds (integer scores keep Redis's compact small-set encoding fast:
  fractional ones are kept as text and re-parsed on every insert). A member is
  ``"<len(item_id)>:<item_id><event_id>"``, so a click sent twice (same event
  and item, e.g. a producer's retry) is one member, and clicks that arrive out
  of order still read back in time order (ties broken by member bytes). Only
  the ``max_len`` latest clicks are kept.
* ``KeySpace.user_features(user)``: a hash with ``n``, the clicks added since
  the user's keys were created, and one applied-offset mark per input partition,
  field ``o:<topic>:<partition>``. (A resent click whose original has already
  been dropped by the cap cannot be recognised, and counts again.)

Exactly-once: for each (user, input partition) of a polled batch the append
script skips every record whose offset is at or below the mark, adds the rest,
trims to ``max_len``, advances the mark and refreshes the TTL of both keys, all
atomically. A batch that is redelivered after a crash (offsets not yet
checkpointed) is therefore a no-op and ``n`` counts every click once. (The
sequence alone would survive redelivery anyway, being a capped set; the marks
make the counter exact and redelivery cheap.) Marks are per partition, so a user
whose clicks come from two partitions (a mis-keyed producer, a repartition) is
still exact; a topic deleted and recreated under the same name needs its users'
marks cleared, as its consumer checkpoints do.

Batching: one script call carries many users (up to ``records_per_call``
records), and a batch's calls go out in one non-transactional pipeline (one
call per user adds a command and a reply per user on both sides, and about
halved throughput here). On Redis Cluster a call may only name keys of one
slot, so there the users are grouped by slot (see :class:`SequenceStore`); on a
single node one call takes any users. Each user's update is atomic either way,
and a pipeline cut short by an error is simply retried.

>>> score_of(1_700_000_000.25), ts_of(1_700_000_000_250_000)
(1700000000250000, 1700000000.25)
>>> member("i9", "c1")
'2:i9c1'
>>> item_of(b"2:i9c1")
'i9'
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from contracts.events import Click
from contracts.keys import KeySpace
from services.common.runtime import Record

DEFAULT_MAX_LEN = 200
DEFAULT_TTL_S = 7 * 86_400
#: The user-hash field counting clicks added (the script writes it as 'n' too).
TOTAL_FIELD = "n"
#: One record for the script: offset, event time (s), member length; then the member.
_RECORD = struct.Struct("<ddH")

# KEYS: (sequence zset, user hash) per group. ARGV: max_len, ttl_s, then per group
# its mark field and its records packed as _RECORD + member bytes, in ascending
# offset order (one packed argument per group is far cheaper to send than three
# per record). Returns {applied, added} summed over the groups.
_APPEND_LUA = """
local max_len, ttl, a = tonumber(ARGV[1]), ARGV[2], 3
local applied, added = 0, 0
for k = 1, #KEYS, 2 do
  local seq, user, field, packed = KEYS[k], KEYS[k + 1], ARGV[a], ARGV[a + 1]
  a = a + 2
  local state = redis.call('HMGET', user, field, 'n')
  local mark = tonumber(state[1] or '-1')
  local pairs_, n, pos = {}, 0, 1
  while pos <= #packed do
    local offset, ts, member
    offset, ts, member, pos = struct.unpack('<ddHc0', packed, pos)
    if offset > mark then
      pairs_[#pairs_ + 1] = math.floor(ts * 1000000 + 0.5)
      pairs_[#pairs_ + 1] = member
      n, mark = n + 1, offset
    end
  end
  if n > 0 then
    local new = 0
    -- unpack() is bounded by Lua's C stack: add 500 (score, member) pairs at a time.
    for i = 1, #pairs_, 1000 do
      new = new + redis.call('ZADD', seq, 'NX', unpack(pairs_, i, math.min(i + 999, #pairs_)))
    end
    redis.call('ZREMRANGEBYRANK', seq, 0, -max_len - 1)
    redis.call('HSET', user, field, mark, 'n', tonumber(state[2] or '0') + new)
    redis.call('EXPIRE', seq, ttl)
    redis.call('EXPIRE', user, ttl)
    applied, added = applied + n, added + new
  end
end
return {applied, added}
"""
_APPEND_SHA = hashlib.sha1(_APPEND_LUA.encode(), usedforsecurity=False).hexdigest()


def score_of(ts: float) -> int:
    """The sorted-set score of an event time: integer microseconds, as the script rounds."""
    return math.floor(ts * 1_000_000 + 0.5)


def ts_of(score: float) -> float:
    """The event time of a sorted-set score, in seconds."""
    return score / 1_000_000


def member(item_id: str, event_id: str) -> str:
    """The sorted-set member of one click: unambiguous for any ids, item first."""
    return f"{len(item_id)}:{item_id}{event_id}"


def item_of(raw: bytes | str) -> str:
    """The item id inside a sorted-set member."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    colon = text.index(":")
    return text[colon + 1 : colon + 1 + int(text[:colon])]


def mark_field(topic: str, partition: int) -> str:
    """The user-hash field holding the last applied offset of one input partition."""
    return f"o:{topic}:{partition}"


@dataclass(frozen=True, slots=True)
class AppendStats:
    """What one :meth:`SequenceStore.append` did.

    ``applied`` records were new (beyond their user's offset mark); of those,
    ``added`` became new sequence members and the rest were duplicate events.
    ``redelivered`` records had been applied before and were skipped.
    """

    applied: int = 0
    added: int = 0
    redelivered: int = 0

    @property
    def duplicates(self) -> int:
        return self.applied - self.added


@dataclass(slots=True)
class _ScriptCall:
    """One EVALSHA of the append script: some users' keys and packed records."""

    keys: list[str]
    args: list[bytes | str | int]
    records: int = 0


class SequenceStore:
    """Appends batches of click records to per-user sequences in Redis.

    ``records_per_call`` bounds one script call, so that a batch never blocks
    Redis (and the readers behind it) for more than a few milliseconds.
    """

    def __init__(
        self,
        client: redis.Redis | RedisCluster,
        *,
        keys: KeySpace,
        max_len: int = DEFAULT_MAX_LEN,
        ttl_s: int = DEFAULT_TTL_S,
        records_per_call: int = 500,
    ) -> None:
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        if ttl_s < 1:
            raise ValueError(f"ttl_s must be >= 1 second, got {ttl_s}")
        if records_per_call < 1:
            raise ValueError(f"records_per_call must be >= 1, got {records_per_call}")
        self._redis = client
        self.keys = keys
        self.max_len = max_len
        self.ttl_s = ttl_s
        self.records_per_call = records_per_call
        # On a cluster a script call may only name keys of one slot (else CROSSSLOT).
        self._by_slot = isinstance(client, RedisCluster)

    def append(self, records: Iterable[Record]) -> AppendStats:
        """Apply click records (``value`` a :class:`Click`) once each, in one pipeline.

        Records of one partition must come in offset order, as Kafka delivers
        them. Safe to call again with the same records (after a Redis error, or
        on redelivery): what was applied is skipped.
        """
        groups: dict[tuple[str, str, int], list[bytes]] = {}
        pack = _RECORD.pack
        total = 0
        for record in records:
            click: Click = record.value
            group = (click.user_id, record.topic, record.partition)
            parts = groups.get(group)
            if parts is None:
                parts = groups[group] = []
            encoded = member(click.item_id, click.event_id).encode()
            parts += (pack(record.offset, click.ts, len(encoded)), encoded)
            total += 1
        if not groups:
            return AppendStats()
        results = self._run(self._calls(groups))
        applied = sum(int(result[0]) for result in results)
        added = sum(int(result[1]) for result in results)
        return AppendStats(applied=applied, added=added, redelivered=total - applied)

    def _calls(self, groups: dict[tuple[str, str, int], list[bytes]]) -> list[_ScriptCall]:
        """Pack the groups into script calls of about ``records_per_call`` records each."""
        filling: dict[int, _ScriptCall] = {}
        calls = []
        for (user_id, topic, partition), parts in groups.items():
            seq = self.keys.sequence(user_id)
            slot = key_slot(seq.encode()) if self._by_slot else 0
            call = filling.get(slot)
            if call is None:
                call = filling[slot] = _ScriptCall([], [self.max_len, self.ttl_s])
            call.keys += (seq, self.keys.user_features(user_id))
            call.args += (mark_field(topic, partition), b"".join(parts))
            call.records += len(parts) // 2
            if call.records >= self.records_per_call:
                calls.append(filling.pop(slot))
        calls.extend(filling.values())
        return calls

    def _run(self, calls: list[_ScriptCall]) -> list[list[int]]:
        try:
            return self._execute(calls)
        except NoScriptError:
            # Redis restarted or its scripts were flushed: load the script and
            # re-run the whole pipeline, which is harmless since it is idempotent.
            self._redis.script_load(_APPEND_LUA)
            return self._execute(calls)

    def _execute(self, calls: list[_ScriptCall]) -> list[list[int]]:
        pipe = self._redis.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(_APPEND_SHA, len(call.keys), *call.keys, *call.args)
        return pipe.execute()
