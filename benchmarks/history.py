"""Retained model history: Redis memory for an hour of a 10k-arm LinUCB learner.

    python benchmarks/history.py [--seconds 3600] [--arms 10000]

One learner, ``linucb`` (dim 9: per arm a 9×9 Gram matrix, a 9-vector and a
count; 7.3 MB encoded at 10k arms), trained once on every arm, then publishes
one part at 4 per second (the services' 0.25 s interval) for ``--seconds`` of
*simulated* time under realistic feedback: each publish applies a batch of
``--batch`` feedback rows whose arms follow a Zipf law (a few popular arms take
most updates), so a few arms change per publish. The clock is faked with the
store's injectable time source (``ParamStore(clock=...)``): publishes are
stamped with the simulated time instead of Redis TIME, so an hour runs in
minutes, and retention applies the default policy (``ParamStoreSettings``:
every version of the last 5 s, the newest of each second for an hour, of each
minute for a day, at most 10,000 versions and 256 MiB of blobs).

To fit in a few minutes, the publishes that the one-per-second tier would drop
anyway (all but the last of each second, except within ``keep_all_s`` of the
end) are folded into the next one: their feedback is applied, their encode and
publish skipped. The versions retained at the end are the same as with every
publish made; the retired blobs the skipped publishes would have left expire
after ``blob_ttl_s`` (1 s) and are not counted either way.

Reported side by side:

- ``measured_bytes``: Redis ``MEMORY USAGE`` summed over every key of the model
  (blobs, manifests, history, counters) after the run, and ``retained_versions``
  with the simulated seconds of history they cover;
- ``naive_bytes``: the same versions, each stored as a full copy of the model
  (versions × model size), i.e. without content addressing;
- ``policy_versions`` / ``policy_naive_bytes``: how many versions the age tiers
  alone would keep (no byte budget) and what full copies of them would cost;
- ``chunked_estimate``: what storing blobs as fixed-size content-addressed
  chunks would cost for those policy versions, per chunk size: the distinct
  chunks of the arrays (counted from the encoded blobs: a chunk is new when it
  differs from the same chunk of the previous version), plus per version its
  header and a 32-byte digest per chunk (the chunk list), and ~120 bytes of
  Redis overhead per chunk key.
  This is an estimate; the store does not chunk blobs (docs/decisions.md §17).

Writes ``benchmarks/results/history.json``. :func:`measure` returns the same
dict (the guard's benchmark puts it in its results under ``retained_history``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# One BLAS thread, as in a consumer process. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import redis  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from contracts.keys import KeySpace  # noqa: E402
from contracts.params import encode_params  # noqa: E402
from services.bandits import LinUCB  # noqa: E402
from services.paramstore import ParamStore  # noqa: E402
from services.stack.servers import start_redis  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "history.json"
MODEL = "linucb"
DIM = 9
INTERVAL_S = 0.25
START = 1_700_000_000.0
CHUNK_SIZES = (4096, 16384, 65536)
KEY_OVERHEAD = 120
MB = 1_000_000


class Chunks:
    """Counts the distinct fixed-size chunks a sequence of blobs would store, per chunk size."""

    def __init__(self, sizes: tuple[int, ...]) -> None:
        self.sizes = sizes
        self.previous: np.ndarray | None = None
        self.new_chunks = dict.fromkeys(sizes, 0)
        self.list_bytes = dict.fromkeys(sizes, 0)

    def add(self, blob: bytes) -> None:
        # The header (magic, length, JSON) changes every version and its length
        # varies, so it is stored whole with the chunk list; the arrays are chunked.
        start = 12 + int.from_bytes(blob[8:12], "little")
        data = np.frombuffer(blob, dtype=np.uint8, offset=start)
        changed = None
        if self.previous is not None and len(self.previous) == len(data):
            changed = self.previous != data
        self.previous = data
        for size in self.sizes:
            count = -(-len(data) // size)
            self.list_bytes[size] += start + 32 * count
            if changed is None:
                self.new_chunks[size] += count
            else:
                mask = np.zeros(count * size, dtype=bool)
                mask[: len(changed)] = changed
                self.new_chunks[size] += int(mask.reshape(count, size).any(axis=1).sum())

    def result(self) -> list[dict[str, Any]]:
        out = []
        for size in self.sizes:
            stored = self.new_chunks[size] * (size + KEY_OVERHEAD) + self.list_bytes[size]
            out.append(
                {
                    "chunk_bytes": size,
                    "distinct_chunks": self.new_chunks[size],
                    "bytes": stored,
                    "mb": round(stored / MB, 1),
                }
            )
        return out


def _model_memory(client: redis.Redis, keys: KeySpace) -> tuple[int, int]:
    total = count = 0
    for key in client.scan_iter(f"{keys.namespace}:params:{{{MODEL}}}:*", count=1000):
        total += int(client.memory_usage(key, samples=0) or 0)
        count += 1
    return total, count


def measure(seconds: float = 3600, arms: int = 10_000, batch: int = 8, seed: int = 0) -> dict:
    """Run the simulated hour on a fresh redis-server and return the figures (see the module)."""
    rng = np.random.default_rng(seed)
    learner = LinUCB(dim=DIM, alpha=1.0, seed=seed)
    items = np.arange(arms)
    learner.update(items, rng.normal(size=(arms, DIM)), (rng.random(arms) < 0.05) * 1.0)
    offset = arms
    clock = [START]
    publishes = round(seconds / INTERVAL_S)
    popularity = 1.0 / np.arange(1, arms + 1) ** 1.1
    popularity /= popularity.sum()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp))
        client = redis.Redis.from_url(server.url)
        try:
            keys = KeySpace("history")
            store = ParamStore(
                client, keys=keys, registry=CollectorRegistry(), clock=lambda: clock[0]
            )
            baseline = int(client.info("memory")["used_memory"])
            chunks = Chunks(CHUNK_SIZES)
            made: dict[int, float] = {}
            size = 0
            publish_s: list[float] = []
            started = time.perf_counter()
            for step in range(publishes):
                clock[0] = START + step * INTERVAL_S
                arm = rng.choice(arms, size=batch, p=popularity)
                learner.update(arm, rng.normal(size=(batch, DIM)), (rng.random(batch) < 0.05) * 1.0)
                offset += batch
                next_second = int(clock[0] + INTERVAL_S) != int(clock[0])
                near_end = (publishes - step) * INTERVAL_S <= store.keep_all_s + 1
                if not (next_second or near_end or step == 0):
                    continue  # the one-per-second tier would drop this version: folded
                blob = encode_params(
                    MODEL,
                    0,
                    learner.state(),
                    offsets={"feedback": {0: offset}},
                    meta={"learner": "linucb", "events": offset},
                    created_at=clock[0],
                )
                size = len(blob)
                chunks.add(blob)
                t0 = time.perf_counter()
                version = store.publish(MODEL, {"main": blob})
                publish_s.append(time.perf_counter() - t0)
                made[version] = clock[0]
            elapsed = time.perf_counter() - started
            time.sleep(store.blob_ttl_s + 0.5)  # retired blobs expire
            measured, key_count = _model_memory(client, keys)
            used = int(client.info("memory")["used_memory"]) - baseline
            history = store.history(MODEL)
        finally:
            client.close()
            server.stop()
    retained = len(history)
    covered = history[-1].published_at - history[0].published_at if history else 0.0
    return {
        "simulated_seconds": seconds,
        "arms": arms,
        "publish_interval_s": INTERVAL_S,
        "publishes_simulated": publishes,
        "publishes_made": len(made),
        "feedback_rows_per_publish": batch,
        "clock": "simulated: ParamStore(clock=...) stamps publishes with the simulated time",
        "policy": {
            "keep_all_s": store.keep_all_s,
            "keep_recent_s": store.keep_recent_s,
            "keep_age_s": store.keep_age_s,
            "keep_versions": store.keep_versions,
            "keep_bytes": store.keep_bytes,
        },
        "model_bytes": size,
        "retained_versions": retained,
        "retained_history_seconds": round(covered, 2),
        "measured_bytes": measured,
        "measured_mb": round(measured / MB, 1),
        "redis_keys": key_count,
        "used_memory_delta_bytes": used,
        "naive_bytes": retained * size,
        "naive_mb": round(retained * size / MB, 1),
        "policy_versions": len(made),
        "policy_naive_bytes": len(made) * size,
        "policy_naive_mb": round(len(made) * size / MB, 1),
        "chunked_estimate": chunks.result(),
        "publish_p50_ms": round(float(np.percentile(publish_s, 50)) * 1000, 2),
        "publish_p99_ms": round(float(np.percentile(publish_s, 99)) * 1000, 2),
        "run_seconds": round(elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3600)
    parser.add_argument("--arms", type=int, default=10_000)
    args = parser.parse_args()
    result = measure(args.seconds, args.arms)
    print(json.dumps(result, indent=2))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
