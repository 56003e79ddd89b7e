"""Ingest benchmark: the consumer runtime vs raw kafka-python, the gateway, and latency.

Run: python benchmarks/ingest.py [--events N]; prints a table and writes
benchmarks/results/ingest.json. Everything runs on this machine against the
embedded Apache Kafka and redis-server, like the tests.

1. raw: kafka-python fetching and ``json.loads``-ing every record (the ceiling);
2. runtime: ``ConsumerRuntime`` doing decode + validate (msgspec contracts) + a
   trivial apply + a Redis checkpoint every 1 s, in one process;
3. latency: produce -> apply at a steady rate while the runtime runs (p50/p99);
4. gateway: batched HTTP posts through ``streamrec run gateway`` (events/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contracts.events import Click, decode_click, encode  # noqa: E402
from services.common import (  # noqa: E402
    Checkpoint,
    ConsumerRuntime,
    Context,
    KafkaSettings,
    Processor,
    Record,
    RedisSettings,
    Rejection,
    RuntimeSettings,
    TopicSettings,
)
from services.common.topics import ensure_topics  # noqa: E402
from services.stack.kafka import start_broker  # noqa: E402
from services.stack.servers import free_port, start_redis  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "ingest.json"
PARTITIONS = 4


class CountingProcessor(Processor):
    """The trivial apply: count records per partition; optionally record latency."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.latencies: list[float] = []
        self.measure = False

    def apply(self, records: list[Record], ctx: Context) -> list[Rejection]:
        for record in records:
            self.counts[record.partition] += 1
        if self.measure:
            now = time.time()
            self.latencies.extend(now - r.value.ts for r in records)
        return []

    def snapshot(self, partition: int) -> bytes:
        return struct.pack("<q", self.counts[partition])

    def restore(self, partition: int, checkpoint: Checkpoint | None) -> None:
        self.counts[partition] = struct.unpack("<q", checkpoint.state)[0] if checkpoint else 0
        return None

    def revoke(self, partition: int) -> None:
        del self.counts[partition]


def click(i: int, ts: float) -> bytes:
    return encode(
        Click(
            event_id=f"e{i}",
            user_id=f"u{i % 10007}",
            item_id=f"i{i % 500}",
            ts=ts,
            request_id=f"r{i}",
            position=i % 10,
        )
    )


def produce(bootstrap: str, topic: str, n: int, start: int = 0) -> float:
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=20, batch_size=256 * 1024)
    started = time.perf_counter()
    now = time.time()
    for i in range(start, start + n):
        producer.send(topic, key=f"u{i % 10007}".encode(), value=click(i, now))
    producer.flush()
    producer.close()
    return n / (time.perf_counter() - started)


def raw_fetch(bootstrap: str, topic: str, n: int) -> float:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, fetch_max_wait_ms=10, max_partition_fetch_bytes=4 * 1024 * 1024
    )
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(tps)
    consumer.seek_to_beginning(*tps)
    seen = 0
    started = None
    while seen < n:
        for records in consumer.poll(timeout_ms=500, max_records=5000).values():
            if started is None:
                started = time.perf_counter()
            for record in records:
                json.loads(record.value)
            seen += len(records)
    elapsed = time.perf_counter() - started
    consumer.close()
    return n / elapsed


def runtime_for(
    bootstrap: str, redis_url: str, topic: str, group: str, processor: CountingProcessor
) -> ConsumerRuntime:
    return ConsumerRuntime(
        service="bench",
        group=group,
        inputs={topic: decode_click},
        processor=processor,
        kafka=KafkaSettings(bootstrap_servers=bootstrap),
        redis_settings=RedisSettings(url=redis_url, namespace="bench"),
        topics=TopicSettings(dead_letter=f"{topic}-dlq"),
        settings=RuntimeSettings(checkpoint_interval_s=1.0, max_batch=5000),
    )


def runtime_throughput(bootstrap: str, redis_url: str, topic: str, n: int) -> dict:
    processor = CountingProcessor()
    runtime = runtime_for(bootstrap, redis_url, topic, "bench-throughput", processor)
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    while not processor.counts:
        time.sleep(0.001)
    started = time.perf_counter()
    first = sum(processor.counts.values())
    while sum(processor.counts.values()) < n:
        time.sleep(0.002)
    elapsed = time.perf_counter() - started
    runtime.stop()
    thread.join()
    return {"events_per_s": (n - first) / elapsed, "events": n - first}


def latency(bootstrap: str, redis_url: str, topic: str, rate: float, seconds: float) -> dict:
    processor = CountingProcessor()
    runtime = runtime_for(bootstrap, redis_url, topic, "bench-latency", processor)
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    while not processor.counts:
        time.sleep(0.01)
    time.sleep(1.0)
    processor.measure = True
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=1)
    started = time.monotonic()
    sent = 0
    while time.monotonic() - started < seconds:
        due = int((time.monotonic() - started) * rate) - sent
        for i in range(due):
            producer.send(topic, key=b"k%d" % (i % 64), value=click(sent + i, time.time()))
        sent += max(due, 0)
        time.sleep(0.001)
    producer.flush()
    time.sleep(1.0)
    runtime.stop()
    thread.join()
    producer.close()
    ms = np.array(processor.latencies) * 1000
    return {
        "rate_per_s": rate,
        "events": int(ms.size),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "max_ms": float(ms.max()),
    }


def gateway(bootstrap: str, topic: str, seconds: float, batch: int, clients: int) -> dict:
    port = free_port()
    env = os.environ | {
        "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
        "STREAMREC_TOPIC_CLICKS": topic,
        "STREAMREC_GATEWAY_PORT": str(port),
        "STREAMREC_GATEWAY_TOKEN": "bench-token",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "run", "gateway"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        now = time.time()
        body = b"[" + b",".join(click(i, now) for i in range(batch)) + b"]"
        accepted = [0] * clients
        request_ms: list[float] = []

        def post(slot: int) -> None:
            auth = {"Authorization": "Bearer bench-token"}
            with httpx.Client(base_url=base, headers=auth, timeout=30) as client:
                end = time.monotonic() + seconds
                while time.monotonic() < end:
                    started = time.perf_counter()
                    response = client.post(
                        "/v1/clicks", content=body, headers={"content-type": "application/json"}
                    )
                    request_ms.append((time.perf_counter() - started) * 1000)
                    if response.status_code == 202:
                        accepted[slot] += response.json()["accepted"]

        threads = [threading.Thread(target=post, args=(k,)) for k in range(clients)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(30)
    ms = np.array(request_ms)
    return {
        "events_per_s": sum(accepted) / elapsed,
        "batch": batch,
        "clients": clients,
        "request_p50_ms": float(np.percentile(ms, 50)),
        "request_p99_ms": float(np.percentile(ms, 99)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--latency-rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp))
        redis_server = start_redis(Path(tmp) / "redis")
        try:
            bootstrap = broker.bootstrap
            topics = {
                "bench-clicks": PARTITIONS,
                "bench-latency": PARTITIONS,
                "bench-gateway": PARTITIONS,
                "bench-clicks-dlq": 1,
                "bench-latency-dlq": 1,
            }
            ensure_topics({"bootstrap_servers": bootstrap}, topics)
            produce_rate = produce(bootstrap, "bench-clicks", args.events)
            raw = raw_fetch(bootstrap, "bench-clicks", args.events)
            runtime = runtime_throughput(bootstrap, redis_server.url, "bench-clicks", args.events)
            lat = latency(
                bootstrap, redis_server.url, "bench-latency", args.latency_rate, args.seconds
            )
            gw = gateway(bootstrap, "bench-gateway", args.seconds, batch=500, clients=2)
        finally:
            broker.stop()
            redis_server.stop()
    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg": os.getloadavg(),
        },
        "events": args.events,
        "produce_events_per_s": produce_rate,
        "raw_kafka_python_json_events_per_s": raw,
        "runtime": runtime
        | {"ratio_to_raw": runtime["events_per_s"] / raw, "target_events_per_s": 50_000},
        "produce_to_apply_latency": lat,
        "gateway_batched": gw,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"produce               {produce_rate:10.0f} events/s")
    print(f"raw fetch + json      {raw:10.0f} events/s")
    print(
        f"runtime (decode+validate+apply+checkpoint/1s) {runtime['events_per_s']:10.0f} events/s"
        f"  ({runtime['events_per_s'] / raw:.0%} of raw; target 50,000)"
    )
    print(
        f"produce->apply at {lat['rate_per_s']:.0f}/s: p50 {lat['p50_ms']:.1f} ms, "
        f"p99 {lat['p99_ms']:.1f} ms"
    )
    print(
        f"gateway batched posts {gw['events_per_s']:10.0f} events/s "
        f"(batch {gw['batch']}, {gw['clients']} clients, p99 {gw['request_p99_ms']:.1f} ms)"
    )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
