"""Clicks per second one process applies to Redis through the sequences store.

Measures :meth:`SequenceStore.append` (grouping, packed Lua calls, one pipeline
per batch) with the service's default batch of 5,000 records, for two user
mixes: ``sparse`` (about one click per user per batch, the worst case) and
``dense`` (about ten). Each run applies half the clicks to new users (cold), the
other half to the same users (warm, the steady state), then all of them again
(a redelivery after a crash). Kafka is not involved: this is the write path's
ceiling. Uses an embedded redis-server (``--cluster``: an embedded 3-master Redis
Cluster), or ``REDIS_URL`` if set (a ``redis+cluster://`` URL for a cluster).

Run: ``python -m benchmarks.sequences [--clicks N] [--repeats R] [--cluster]``. Prints
JSON lines and writes ``benchmarks/results/sequences.json`` (``sequences-cluster.json``
with ``--cluster``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import redis
from redis.cluster import RedisCluster

from contracts.events import Click
from contracts.keys import KeySpace
from services.common.clients import redis_from_url
from services.common.runtime import Record
from services.sequences.store import SequenceStore
from services.stack.redis_cluster import EmbeddedRedisCluster, start_redis_cluster
from services.stack.servers import EmbeddedRedis, start_redis

RESULTS = Path(__file__).resolve().parent / "results" / "sequences.json"
BATCH = 5_000
MIXES = {"sparse": 20_000, "dense": 500}


def make_records(n: int, users: int, partitions: int, seed: int) -> list[Record]:
    """Clicks keyed and partitioned by user, a few seconds out of order at times."""
    rng = random.Random(seed)
    offsets = [0] * partitions
    out = []
    for i in range(n):
        user = f"u{rng.randrange(users)}"
        partition = zlib.crc32(user.encode()) % partitions
        click = Click(
            event_id=f"e{i}",
            user_id=user,
            item_id=f"i{rng.randrange(10_000)}",
            ts=1.7e9 + i * 0.01 + rng.uniform(-5, 0),
        )
        out.append(Record("clicks", partition, offsets[partition], user.encode(), click, 0))
        offsets[partition] += 1
    return out


def _rate(store: SequenceStore, records: list[Record]) -> float:
    started = time.perf_counter()
    for start in range(0, len(records), BATCH):
        store.append(records[start : start + BATCH])
    return len(records) / (time.perf_counter() - started)


def run_once(client: redis.Redis | RedisCluster, clicks: int, users: int) -> dict[str, float]:
    """Clicks/s for new users (cold), existing ones (warm), and a redelivery."""
    keys = KeySpace(f"bench{uuid.uuid4().hex[:8]}")
    store = SequenceStore(client, keys=keys)
    records = make_records(clicks, users, partitions=8, seed=0)
    half = len(records) // 2
    try:
        return {
            "cold": _rate(store, records[:half]),
            "warm": _rate(store, records[half:]),
            "redelivered": _rate(store, records),
        }
    finally:
        doomed = list(client.scan_iter(f"{keys.namespace}:*", count=1_000))
        for start in range(0, len(doomed), 1_000):
            client.delete(*doomed[start : start + 1_000])


def run(url: str, clicks: int, repeats: int) -> list[dict[str, object]]:
    client = redis_from_url(url)
    results: list[dict[str, object]] = []
    try:
        for mix, users in MIXES.items():
            runs = [run_once(client, clicks, users) for _ in range(repeats)]
            result: dict[str, object] = {
                "mix": mix,
                "clicks": clicks,
                "users": users,
                "batch": BATCH,
                "repeats": repeats,
            }
            for phase in ("cold", "warm", "redelivered"):
                rates = sorted(r[phase] for r in runs)
                result[f"{phase}_clicks_per_s_median"] = round(statistics.median(rates))
                result[f"{phase}_clicks_per_s_best"] = round(rates[-1])
            results.append(result)
    finally:
        client.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clicks", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cluster", action="store_true", help="embedded 3-master Redis Cluster instead"
    )
    args = parser.parse_args()
    if url := os.environ.get("REDIS_URL"):
        results = run(url, args.clicks, args.repeats)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            server: EmbeddedRedis | EmbeddedRedisCluster = (
                start_redis_cluster(Path(tmp)) if args.cluster else start_redis(Path(tmp))
            )
            try:
                results = run(server.url, args.clicks, args.repeats)
            finally:
                server.stop()
    for result in results:
        print(json.dumps(result))
    path = RESULTS.with_name("sequences-cluster.json") if args.cluster else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
