"""Soak: a steady load through the whole loop for minutes; lag, RSS and freshness over time.

Run: python benchmarks/soak.py [--seconds 600] [--rate 5000] [--kafka HOST:PORT]
[--redis URL]; writes benchmarks/results/soak.json. The joiner, bandits and
sequences services run as ``streamrec run`` processes on this machine, against
the embedded broker (Tansu) and redis-server unless ``--kafka``/``--redis`` name
dedicated servers (the embedded broker cannot sustain a long soak:
docs/decisions.md §11). A load process produces impressions (slates of
``--slate`` items) and clicks on some shown items straight into Kafka at
``--rate`` events/s (impressions + clicks); the joiner turns them into feedback,
the bandits learn from it and publish LinUCB parameters, the sequences service
keeps per-user click sequences.

Every ``--sample-s`` seconds it records, per service, the consumer lag summed
over partitions (``streamrec_consumer_lag_records`` from its /metrics), and the
RSS and CPU use of every process (services, broker, Redis, the load process).
The embedded Tansu keeps the whole log in memory, so its RSS grows with the
events produced by design; it is no leak of the services. Freshness is
probed every second: the feedback topic's end offsets are read (as the high
watermarks of a consumer tailing it), and the probe
resolves when the first published params version's offsets cover them, so it
is the time from feedback being in Kafka to a params version that includes it.

The summary gives the achieved rate, the lag bound (max and last), the RSS
slope per process in MB/min (least squares over the samples after a warm-up),
and the freshness p50/p99 overall and per minute.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import redis
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host import describe_host  # noqa: E402
from contracts.events import Click, Impression, SlateItem, encode  # noqa: E402
from contracts.keys import KeySpace  # noqa: E402
from services.paramstore import ModelNotFound, ParamStore  # noqa: E402
from services.stack.servers import ensure_topics, free_port, start_broker, start_redis  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "soak.json"
PARTITIONS = 4
DIM = 8
ITEMS = 300
USERS = 20_000
POLICY = "linucb"
SERVICES = ("joiner", "bandits", "sequences")


def produce_load(
    bootstrap: str, rate: float, seconds: float, slate: int, click_p: float, sent: Any
) -> None:
    """The load process: impressions and clicks at ``rate`` events/s, paced every 10 ms."""
    rng = np.random.default_rng(7)
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, batch_size=256 * 1024)
    started = time.monotonic()
    produced = 0
    request = 0
    while (elapsed := time.monotonic() - started) < seconds:
        due = int(rate * elapsed)
        while produced < due:
            now = time.time()
            user = f"u{int(rng.integers(USERS))}"
            items = rng.choice(ITEMS, size=slate, replace=False)
            request_id = f"r{request}"
            request += 1
            impression = Impression(
                request_id=request_id,
                user_id=user,
                ts=now,
                policy=POLICY,
                context=[*rng.normal(size=DIM - 1).round(4).tolist(), 1.0],
                slate=[
                    SlateItem(item_id=f"i{k}", position=p, propensity=1.0 / slate)
                    for p, k in enumerate(items)
                ],
            )
            producer.send("impressions", key=user.encode(), value=encode(impression))
            produced += 1
            for position in np.flatnonzero(rng.random(slate) < click_p):
                click = Click(
                    event_id=f"c{request_id}-{position}",
                    user_id=user,
                    item_id=f"i{items[position]}",
                    request_id=request_id,
                    position=int(position),
                    ts=now + 0.05,
                )
                producer.send("clicks", key=user.encode(), value=encode(click))
                produced += 1
            sent.value = produced
        time.sleep(0.01)
    producer.flush()
    producer.close()
    sent.value = produced


def lag_by_service(port: int) -> float | None:
    """Sum of ``streamrec_consumer_lag_records`` over a service's partitions."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    total = 0.0
    for line in text.splitlines():
        if line.startswith("streamrec_consumer_lag_records{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


class Freshness:
    """Probes feedback end offsets each second; resolves each probe on the covering params.

    The end offsets are the high watermarks of a consumer that tails ``feedback``:
    every fetch response carries them, so probing sends the broker no request of
    its own (Tansu answers a ListOffsets request in time proportional to the log).
    """

    def __init__(self, bootstrap: str, store: ParamStore) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=10)
        self.tps = [TopicPartition("feedback", p) for p in range(PARTITIONS)]
        self.consumer.assign(self.tps)
        self.store = store
        self.pending: list[tuple[float, dict[int, int]]] = []
        self.resolved: list[tuple[float, float]] = []  # (probe time, seconds to params)
        self.stop = threading.Event()

    def run(self) -> None:
        last_probe = 0.0
        while not self.stop.is_set():
            self.consumer.poll(timeout_ms=0, max_records=100_000)  # stay at the tail
            now = time.time()
            ends = {tp.partition: self.consumer.highwater(tp) for tp in self.tps}
            if now - last_probe >= 1.0 and None not in ends.values():
                self.pending.append((now, ends))
                last_probe = now
            try:
                _, header, _ = self.store.latest(POLICY)
            except ModelNotFound:
                time.sleep(0.05)
                continue
            seen = time.time()
            covered = {int(p): o for p, o in header["offsets"].get("feedback", {}).items()}
            still = []
            for probed_at, ends in self.pending:
                if all(covered.get(p, 0) >= end for p, end in ends.items()):
                    self.resolved.append((probed_at, seen - probed_at))
                else:
                    still.append((probed_at, ends))
            self.pending = still
            time.sleep(0.05)
        self.consumer.close()


def rss_mb(process: psutil.Process) -> float | None:
    """Resident set size in MB; ``None`` once the process has exited."""
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return round(process.memory_info().rss / 2**20, 1)
    except psutil.NoSuchProcess:
        return None


def cpu_percent(process: psutil.Process) -> float | None:
    """CPU use (100 = one core) since the previous call; ``None`` once the process has exited."""
    try:
        return round(process.cpu_percent(None), 1)
    except psutil.NoSuchProcess:
        return None


def slope_mb_per_min(samples: list[dict[str, Any]], name: str) -> float | None:
    """Least-squares slope of one process's RSS over the samples, in MB/min."""
    points = [(s["t_s"], s["rss_mb"][name]) for s in samples if s["rss_mb"][name] is not None]
    if len(points) < 3:
        return None
    times, rss = np.array(points).T
    return round(float(np.polyfit(times, rss, 1)[0] * 60), 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="events/s offered")
    parser.add_argument("--slate", type=int, default=2)
    parser.add_argument("--click-p", type=float, default=0.15, help="click chance per item")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of RSS slopes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--kafka",
        metavar="HOST:PORT",
        help="a dedicated Kafka cluster instead of the embedded broker",
    )
    parser.add_argument(
        "--redis", metavar="URL", help="a dedicated Redis instead of the embedded one"
    )
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="streamrec-soak-"))
    broker = None if args.kafka else start_broker(work / "broker")
    server = None if args.redis else start_redis(work / "redis")
    bootstrap = broker.bootstrap if broker else args.kafka
    redis_url = server.url if server else args.redis
    keys = KeySpace("soak")
    ensure_topics(
        {"bootstrap_servers": bootstrap},
        {"impressions": PARTITIONS, "clicks": PARTITIONS, "feedback": PARTITIONS},
    )
    ensure_topics({"bootstrap_servers": bootstrap}, {"dead-letter": 1})
    base_env = os.environ | {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "REDIS_URL": redis_url,
        "REDIS_NAMESPACE": keys.namespace,
        "STREAMREC_BANDITS_POLICIES": json.dumps({POLICY: {"learner": "linucb"}}),
        "STREAMREC_JOINER_WINDOW_S": "10",
        "STREAMREC_JOINER_LATENESS_S": "2",
        "STREAMREC_RUNTIME_LAG_INTERVAL_S": "2",
    }
    ports = {name: free_port() for name in SERVICES}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    for name in SERVICES:
        with open(work / f"{name}.log", "ab") as log:
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", name],
                cwd=ROOT,
                env=base_env | {"STREAMREC_RUNTIME_METRICS_PORT": str(ports[name])},
                stdout=log,
                stderr=subprocess.STDOUT,
            )
    time.sleep(8.0)  # group joins on Tansu take a few seconds

    client = redis.Redis.from_url(redis_url)
    freshness = Freshness(bootstrap, ParamStore(client, keys=keys))
    sent = multiprocessing.Value("q", 0)
    load = multiprocessing.Process(
        target=produce_load,
        args=(bootstrap, args.rate, args.seconds, args.slate, args.click_p, sent),
    )
    load.start()
    threading.Thread(target=freshness.run, daemon=True).start()
    pids = {name: p.pid for name, p in processes.items()} | {"load": load.pid}
    if broker is not None:
        pids["broker"] = broker.process.pid
    if server is not None:
        pids["redis"] = server.process.pid
    handles = {name: psutil.Process(pid) for name, pid in pids.items()}
    for handle in handles.values():
        cpu_percent(handle)  # the first call starts the measurement
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    last_sent = 0
    try:
        while load.is_alive():
            time.sleep(args.sample_s - (time.monotonic() - started) % args.sample_s)
            t = time.monotonic() - started
            produced = sent.value
            window = [s for p, s in freshness.resolved if p >= time.time() - args.sample_s - 5]
            samples.append(
                {
                    "t_s": round(t, 1),
                    "produced": produced,
                    "rate": round((produced - last_sent) / args.sample_s, 1),
                    "lag": {name: lag_by_service(port) for name, port in ports.items()},
                    "rss_mb": {name: rss_mb(h) for name, h in handles.items()},
                    "cpu_percent": {name: cpu_percent(h) for name, h in handles.items()},
                    "freshness_p99_s": round(float(np.percentile(window, 99)), 3)
                    if window
                    else None,
                    "load_average_1m": round(os.getloadavg()[0], 2),
                    "alive": {name: p.poll() is None for name, p in processes.items()},
                }
            )
            last_sent = produced
            print(json.dumps(samples[-1]), flush=True)
        load.join()
        time.sleep(10.0)  # let the loop drain; the last sample shows whether it caught up
        final_lag = {name: lag_by_service(port) for name, port in ports.items()}
    finally:
        freshness.stop.set()
        for process in processes.values():
            process.terminate()
        codes = {name: process.wait(30) for name, process in processes.items()}
        client.close()
        if server is not None:
            server.stop()
        if broker is not None:
            broker.stop()

    steady = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    delays = np.array([d for _, d in freshness.resolved])
    by_minute: dict[int, list[float]] = {}
    for probed_at, delay in freshness.resolved:
        by_minute.setdefault(int((probed_at - freshness.resolved[0][0]) // 60), []).append(delay)
    result = {
        "benchmark": "soak",
        "host": describe_host("kafka-python", "redis", "msgspec"),
        "config": {
            "seconds": args.seconds,
            "rate_offered": args.rate,
            "slate": args.slate,
            "click_p": args.click_p,
            "partitions": PARTITIONS,
            "sample_s": args.sample_s,
            "warmup_s": args.warmup_s,
            "joiner_window_s": 10,
            "services": list(SERVICES),
        },
        "summary": {
            "events_produced": samples[-1]["produced"] if samples else 0,
            "rate_achieved": round(samples[-1]["produced"] / args.seconds, 1) if samples else 0,
            "lag_max": {n: max((s["lag"][n] or 0) for s in samples) for n in SERVICES},
            "lag_last_sample": samples[-1]["lag"] if samples else {},
            "lag_after_drain": final_lag,
            "rss_slope_mb_per_min": {name: slope_mb_per_min(steady, name) for name in handles},
            "rss_mb_first_last": {
                name: [steady[0]["rss_mb"][name], steady[-1]["rss_mb"][name]] for name in handles
            },
            "freshness_definition": "feedback in Kafka -> first params version covering it; "
            "excludes the attribution window and any joiner lag",
            "cpu_percent_mean": {
                name: round(float(np.mean([s["cpu_percent"][name] or 0 for s in steady])), 1)
                for name in handles
            },
            "freshness_probes": int(delays.size),
            "freshness_unresolved": len(freshness.pending),
            "freshness_p50_s": round(float(np.percentile(delays, 50)), 3) if delays.size else None,
            "freshness_p99_s": round(float(np.percentile(delays, 99)), 3) if delays.size else None,
            "freshness_p99_by_minute_s": [
                round(float(np.percentile(v, 99)), 3) for _, v in sorted(by_minute.items())
            ],
            "load_average_1m_min_max": [
                min(s["load_average_1m"] for s in samples),
                max(s["load_average_1m"] for s in samples),
            ]
            if samples
            else None,
            "exit_codes": codes,
            "services_alive_throughout": all(all(s["alive"].values()) for s in samples),
        },
        "samples": samples,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
