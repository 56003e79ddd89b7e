"""Checkpoints: a service's per-partition state and consumed offsets, atomically in Redis.

One checkpoint per (consumer group, partition number) is a Redis hash. All of a
group's checkpoints share a hash tag, so one MULTI/EXEC writes every owned
partition at once, also on Redis Cluster. Restart restores the state and seeks
to the offsets stored with it, so each event is applied exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import msgspec
import redis

from contracts.keys import KeySpace

_json = msgspec.json.Encoder()


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


class CheckpointStore:
    """Reads and writes one consumer group's checkpoints."""

    def __init__(self, client: redis.Redis, keys: KeySpace, group: str) -> None:
        self._redis = client
        self._keys = keys
        self.group = group

    def load(self, partitions: Iterable[int]) -> dict[int, Checkpoint]:
        """Checkpoints of the given partition numbers; absent ones are omitted."""
        partitions = list(partitions)
        pipe = self._redis.pipeline(transaction=False)
        for partition in partitions:
            pipe.hgetall(self._keys.checkpoint(self.group, partition))
        found = {}
        for partition, raw in zip(partitions, pipe.execute(), strict=True):
            if raw:
                found[partition] = Checkpoint(
                    offsets=msgspec.json.decode(raw[b"offsets"]),
                    state=raw.get(b"state", b""),
                    dedupe=msgspec.json.decode(raw.get(b"dedupe", b"{}")),
                    emit_seq=msgspec.json.decode(raw.get(b"emit_seq", b"{}")),
                    written_at=float(raw.get(b"written_at", 0.0)),
                )
        return found

    def save(self, checkpoints: Mapping[int, Checkpoint]) -> None:
        """Write all given checkpoints in one MULTI/EXEC: all or nothing."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)
        for partition, ckpt in checkpoints.items():
            ckpt.written_at = now
            pipe.hset(
                self._keys.checkpoint(self.group, partition),
                mapping={
                    "offsets": _json.encode(ckpt.offsets),
                    "state": ckpt.state,
                    "dedupe": _json.encode(ckpt.dedupe),
                    "emit_seq": _json.encode(ckpt.emit_seq),
                    "written_at": repr(now),
                },
            )
        pipe.execute()

    def clear(self) -> int:
        """Delete every checkpoint of the group (to rebuild from the start of the log)."""
        doomed = list(self._redis.scan_iter(self._keys.checkpoint_pattern(self.group)))
        return int(self._redis.delete(*doomed)) if doomed else 0
