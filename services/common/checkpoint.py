"""Checkpoints: a service's per-partition state and consumed offsets, atomically in Redis.

One checkpoint per (consumer group, partition number) is a Redis hash. All of a
group's checkpoints share a hash tag, so one script writes every owned partition
at once, also on Redis Cluster. Restart restores the state and seeks to the
offsets stored with it, so each event is applied exactly once.

**Fencing.** Each partition has an ownership epoch (in one hash per group, next
to the checkpoints and in their slot, kept when checkpoints are deleted for a
rebuild). Taking a partition over (:meth:`CheckpointStore.claim`) increments it
and reads the checkpoint in one script; a write (:meth:`CheckpointStore.save`) only lands if
every partition's stored epoch is still the writer's. A process that froze
(GC pause, SIGSTOP, a slow disk) past its session timeout and wakes up after
another process claimed its partitions gets :class:`Fenced` instead of
overwriting the new owner's progress. The epoch also serves as the fencing
token of whatever the owner publishes (see ``ParamStore.publish``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import redis
from redis.cluster import RedisCluster

from contracts.errors import StreamrecError
from contracts.keys import KeySpace

_json = msgspec.json.Encoder()

# KEYS: the group's epochs hash, then checkpoint hashes. ARGV: their partition
# numbers. Increments each partition's epoch; returns {epochs, then per checkpoint
# its fields as HGETALL lists them}.
_CLAIM = """
local epochs, out = {}, {}
for i = 2, #KEYS do
  epochs[i - 1] = redis.call('HINCRBY', KEYS[1], ARGV[i - 1], 1)
  out[i] = redis.call('HGETALL', KEYS[i])
end
out[1] = epochs
return out
"""

# KEYS: the group's epochs hash, then checkpoint hashes. ARGV: written_at, then per
# checkpoint: partition, epoch, offsets, state, dedupe, emit_seq. Writes all of
# them, or none if any partition's stored epoch differs from the writer's (none
# stored, e.g. after Redis lost its data, is no claim by anyone else); returns the
# indexes (1-based) of the checkpoints that were fenced.
_SAVE = """
local fenced = {}
for i = 2, #KEYS do
  local a = 2 + 6 * (i - 2)
  local epoch = redis.call('HGET', KEYS[1], ARGV[a])
  if epoch and epoch ~= ARGV[a + 1] then
    fenced[#fenced + 1] = i - 1
  end
end
if #fenced > 0 then
  return fenced
end
for i = 2, #KEYS do
  local a = 2 + 6 * (i - 2)
  redis.call('HSET', KEYS[i], 'epoch', ARGV[a + 1], 'offsets', ARGV[a + 2], 'state', ARGV[a + 3],
    'dedupe', ARGV[a + 4], 'emit_seq', ARGV[a + 5], 'written_at', ARGV[1])
end
return fenced
"""


class Fenced(StreamrecError, RuntimeError):
    """Another process claimed these partitions since this one did; nothing was written."""

    def __init__(self, partitions: list[int]) -> None:
        super().__init__(f"partitions {partitions} were claimed by another process")
        self.partitions = partitions


@dataclass(slots=True)
class Checkpoint:
    """What is stored for one partition number of one consumer group."""

    #: topic -> next offset to consume.
    offsets: dict[str, int] = field(default_factory=dict)
    #: The service's own state for this partition (its encoding is the service's).
    state: bytes = b""
    #: "topic|partition|source" -> last sequence number applied from that producer source.
    dedupe: dict[str, int] = field(default_factory=dict)
    #: "topic|partition" -> next sequence number this partition emits there.
    emit_seq: dict[str, int] = field(default_factory=dict)
    written_at: float = 0.0
    #: Ownership epoch: how many times the partition has been claimed (0: never).
    epoch: int = 0


class CheckpointStore:
    """Reads, claims and writes one consumer group's checkpoints."""

    def __init__(self, client: redis.Redis | RedisCluster, keys: KeySpace, group: str) -> None:
        self._redis = client
        self._keys = keys
        self.group = group
        self._claim = client.register_script(_CLAIM)
        self._save = client.register_script(_SAVE)

    def load(self, partitions: Iterable[int]) -> dict[int, Checkpoint]:
        """Checkpoints of the given partition numbers (read only); absent ones are omitted."""
        partitions = list(partitions)
        pipe = self._redis.pipeline(transaction=False)
        for partition in partitions:
            pipe.hgetall(self._keys.checkpoint(self.group, partition))
        return _parse(partitions, pipe.execute())

    def claim(self, partitions: Iterable[int]) -> tuple[dict[int, Checkpoint], dict[int, int]]:
        """Take ownership: bump each partition's epoch and read its checkpoint, atomically.

        Returns the checkpoints found (absent ones omitted) and every partition's
        new epoch, which later :meth:`save` calls must carry.
        """
        partitions = list(partitions)
        if not partitions:
            return {}, {}
        keys = [self._keys.checkpoint_epochs(self.group)]
        keys += [self._keys.checkpoint(self.group, p) for p in partitions]
        epochs, *found = self._claim(keys=keys, args=partitions)
        raw = [dict(zip(fields[::2], fields[1::2], strict=True)) for fields in found]
        return _parse(partitions, raw), dict(zip(partitions, map(int, epochs), strict=True))

    def save(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        """Write all given checkpoints atomically: all or nothing.

        Raises :class:`Fenced` (writing nothing) if another process has claimed
        any of these partitions since their epochs were.
        """
        now = time.time()
        partitions = list(checkpoints)
        args: list[bytes | str | int] = [repr(now)]
        for partition, ckpt in checkpoints.items():
            args += [
                partition,
                ckpt.epoch,
                _json.encode(ckpt.offsets),
                ckpt.state,
                _json.encode(ckpt.dedupe),
                _json.encode(ckpt.emit_seq),
            ]
        keys = [self._keys.checkpoint_epochs(self.group)]
        keys += [self._keys.checkpoint(self.group, p) for p in partitions]
        fenced = self._save(keys=keys, args=args)
        if fenced:
            raise Fenced([partitions[int(i) - 1] for i in fenced])
        for ckpt in checkpoints.values():
            ckpt.written_at = now

    def clear(self) -> int:
        """Delete every checkpoint of the group (to rebuild from the start of the log).

        The ownership epochs stay, so fencing tokens keep rising across the rebuild."""
        doomed = list(self._redis.scan_iter(self._keys.checkpoint_pattern(self.group)))
        return int(self._redis.delete(*doomed)) if doomed else 0


def _parse(partitions: list[int], raw: list[dict[bytes, bytes]]) -> dict[int, Checkpoint]:
    found = {}
    for partition, fields in zip(partitions, raw, strict=True):
        if fields:
            found[partition] = Checkpoint(
                offsets=msgspec.json.decode(fields[b"offsets"]),
                state=fields.get(b"state", b""),
                dedupe=msgspec.json.decode(fields.get(b"dedupe", b"{}")),
                emit_seq=msgspec.json.decode(fields.get(b"emit_seq", b"{}")),
                written_at=float(fields.get(b"written_at", 0.0)),
                epoch=int(fields.get(b"epoch", 0)),
            )
    return found
