"""Soak: the whole system under a steady load for minutes, on the embedded Apache Kafka.

Run: python benchmarks/soak.py [--seconds 600] [--rate 5000 | --rate 0]
[--capacity 5000,4000,3000 --capacity-seconds 300]; writes benchmarks/results/soak.json.

Every service runs as its own supervised ``streamrec run`` process (gateway,
joiner, bandits, drn, sequences, embeddings, serving) against the embedded
single-node Apache Kafka and redis-server, as ``streamrec up`` runs them. A load
process posts impressions (slates of ``--slate`` items, half for the ``linucb``
bandit policy and half for ``drn``, with feature vectors of the sizes each
learner expects) and clicks on some shown items, each click when its event time
comes, to the gateway over HTTP at ``--rate`` events/s in all. A probe asks
serving for a slate 20 times a second (serving logs each as an impression too).

Every ``--sample-s`` seconds it records each consumer's lag (summed over
partitions, from its /metrics), the RSS and CPU of every process (services,
broker, Redis, load), and the serving probe's latency. Freshness is probed every
second: the feedback topic's high watermarks, resolved when the first published
LinUCB version's offsets cover them (feedback produced → version readable).

After the load it lets the loop drain and reconciles from the Kafka log: the
LinUCB state must hold one update per (linucb impression, shown item) in the
log and one reward per click on a shown item of a linucb impression (0 lost,
0 doubled). ``--capacity`` runs first: the stack afresh at each rate for
``--capacity-seconds``, reporting the highest at which the gateway took the
whole rate and every consumer's lag stayed bounded (below ``--bound-s`` seconds
of input) throughout; a trial stops as soon as a lag passes the bound. The soak
then runs at ``--rate``, or with ``--rate 0`` at the capacity found.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import numpy as np
import psutil
from kafka import KafkaConsumer, TopicPartition

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host import describe_host  # noqa: E402
from contracts.events import Click, Impression, SlateItem, decode_click, decode_impression  # noqa: E402
from services.bandits import LinUCB  # noqa: E402
from services.catalog import publish_catalog  # noqa: E402
from services.common import clients  # noqa: E402
from services.common.runtime import CONTROL_HEADER  # noqa: E402
from services.common.settings import KafkaSettings, RedisSettings, TopicSettings  # noqa: E402
from services.common.topics import create_topics  # noqa: E402
from services.drn.settings import DRNSettings  # noqa: E402
from services.paramstore import ModelNotFound, ParamStore  # noqa: E402
from services.stack.kafka import start_broker  # noqa: E402
from services.stack.servers import free_port, start_redis  # noqa: E402
from services.stack.supervisor import Supervisor  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "soak.json"
PARTITIONS = 4
CONTEXT_DIM = 9
ITEMS = 500
USERS = 50_000
SERVICES = ("gateway", "joiner", "bandits", "drn", "sequences", "embeddings", "serving")
CONSUMERS = ("joiner", "bandits", "drn", "sequences", "embeddings")
POLICIES = ("linucb", "drn")
TOKEN = "soak-token"  # noqa: S105 - a benchmark's own gateway and serving token
WINDOW_S, LATENESS_S = 10, 2
SERVING_PROBE_PER_S = 20
#: Events per gateway request (a load that falls behind sends several).
POST_BATCH = 1000


# -- the load ---------------------------------------------------------------------------


def _impression(rng, request: int, policy: str, slate: int, drn_dims: tuple[int, int]):
    user = f"u{int(rng.integers(USERS))}"
    items = rng.choice(ITEMS, size=slate, replace=False)
    if policy == "drn":
        state_dim, action_dim = drn_dims
        context = rng.normal(size=state_dim).round(4).tolist()
        teams = ("exploit", "explore")
        shown = [
            SlateItem(
                item_id=f"i{k}",
                position=p,
                propensity=0.5,
                team=teams[p % 2],
                features=rng.normal(size=action_dim).round(4).tolist(),
            )
            for p, k in enumerate(items)
        ]
    else:
        context = [*rng.normal(size=CONTEXT_DIM - 1).round(4).tolist(), 1.0]
        shown = [
            SlateItem(item_id=f"i{k}", position=p, propensity=1.0 / slate)
            for p, k in enumerate(items)
        ]
    return Impression(
        request_id=f"r{request}",
        user_id=user,
        ts=time.time(),
        policy=policy,
        context=context,
        slate=shown,
    )


def produce_load(
    gateway: str, rate: float, seconds: float, slate: int, click_p: float, counters: Any
) -> None:
    """The load process: impressions now, clicks when their event time comes, every 50 ms.

    ``counters`` (shared): events accepted (202), events refused (4xx), retried posts (503).
    """
    rng = np.random.default_rng(7)
    drn = DRNSettings().layout()
    dims = (drn.state_dim, drn.action_dim)
    encoder = msgspec.json.Encoder()
    per_impression = 1 + slate * click_p
    http = httpx.Client(base_url=gateway, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60)
    due: deque[Click] = deque()
    started = time.monotonic()
    impressions = 0

    def post(kind: str, events: list) -> None:
        for start in range(0, len(events), POST_BATCH):
            chunk = events[start : start + POST_BATCH]
            body = encoder.encode(chunk)
            while (answer := http.post(f"/v1/{kind}", content=body)).status_code == 503:
                counters[2] += 1
                time.sleep(0.1)
            counters[0 if answer.status_code == 202 else 1] += len(chunk)

    while (elapsed := time.monotonic() - started) < seconds:
        wanted = int(rate * elapsed / per_impression)
        batch = []
        while impressions < wanted:
            policy = POLICIES[impressions % len(POLICIES)]
            event = _impression(rng, impressions, policy, slate, dims)
            batch.append(event)
            impressions += 1
            for item in event.slate:
                if rng.random() < click_p:
                    due.append(
                        Click(
                            event_id=f"c{event.request_id}-{item.position}",
                            user_id=event.user_id,
                            item_id=item.item_id,
                            request_id=event.request_id,
                            position=item.position,
                            ts=event.ts + float(rng.uniform(0.2, 1.0)),
                        )
                    )
        if batch:
            post("impressions", batch)
        now = time.time()
        clicks = []
        while due and due[0].ts <= now:
            clicks.append(due.popleft())
        if clicks:
            post("clicks", clicks)
        time.sleep(max(0.0, 0.05 - (time.monotonic() - started - elapsed)))
    if due:
        post("clicks", list(due))
    http.close()


# -- probes -----------------------------------------------------------------------------


def scrape(port: int, name: str) -> dict[str, float]:
    """Series of one /metrics endpoint named ``name``, summed by label set → total."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            series, value = line.rsplit(" ", 1)
            found[series] = float(value)
    return found


def lag_of(port: int) -> float | None:
    series = scrape(port, "streamrec_consumer_lag_records")
    return sum(series.values()) if series else None


class Freshness:
    """Probes the feedback topic's high watermarks each second; each probe resolves on the
    first published LinUCB version whose offsets cover them."""

    def __init__(self, bootstrap: str, store: ParamStore) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap)
        self.tps = [TopicPartition("feedback", p) for p in range(PARTITIONS)]
        self.consumer.assign(self.tps)
        self.store = store
        self.pending: list[tuple[float, dict[int, int]]] = []
        self.resolved: list[tuple[float, float]] = []  # (probe time, seconds to params)
        self.stop = threading.Event()

    def run(self) -> None:
        last_probe = 0.0
        while not self.stop.is_set():
            self.consumer.poll(timeout_ms=20, max_records=100_000)  # stay at the tail
            now = time.time()
            ends = {tp.partition: self.consumer.highwater(tp) for tp in self.tps}
            if now - last_probe >= 1.0 and None not in ends.values():
                self.pending.append((now, ends))
                last_probe = now
            try:
                _, header, _ = self.store.latest("linucb", combine=LinUCB.merge)
            except ModelNotFound:
                time.sleep(0.05)
                continue
            seen = time.time()
            covered = {int(p): o for p, o in header["offsets"].get("feedback", {}).items()}
            still = []
            for probed_at, probe in self.pending:
                if all(covered.get(p, 0) >= end for p, end in probe.items()):
                    self.resolved.append((probed_at, seen - probed_at))
                else:
                    still.append((probed_at, probe))
            self.pending = still
            time.sleep(0.05)
        self.consumer.close()


class ServingProbe:
    """Asks serving for a slate ``SERVING_PROBE_PER_S`` times a second; keeps latencies."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.latencies: list[tuple[float, float]] = []  # (time, seconds) of 200s
        self.failures = 0
        self.stop = threading.Event()

    def run(self) -> None:
        rng = np.random.default_rng(3)
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with httpx.Client(base_url=self.url, timeout=10, headers=headers) as http:
            while not self.stop.is_set():
                started = time.perf_counter()
                try:
                    answer = http.get(
                        "/v1/recommendations", params={"user_id": f"u{rng.integers(USERS)}", "k": 4}
                    )
                    ok = answer.status_code == 200
                except httpx.HTTPError:
                    ok = False
                took = time.perf_counter() - started
                if ok:
                    self.latencies.append((time.time(), took))
                else:
                    self.failures += 1
                self.stop.wait(max(0.0, 1.0 / SERVING_PROBE_PER_S - took))


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
    points = [(s["t_s"], s["rss_mb"][name]) for s in samples if s["rss_mb"].get(name) is not None]
    if len(points) < 3:
        return None
    times, rss = np.array(points).T
    return round(float(np.polyfit(times, rss, 1)[0] * 60), 3)


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


# -- the stack --------------------------------------------------------------------------


@contextmanager
def stack(work: Path):
    """Kafka, Redis, topics, a catalog and every service, supervised; stopped on exit."""
    broker = start_broker(work / "kafka")
    server = start_redis(work / "redis")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
        "REDIS_URL": server.url,
        "STREAMREC_TOPIC_PARTITIONS": str(PARTITIONS),
        "STREAMREC_TOPIC_REPLICATION_FACTOR": "1",
        "STREAMREC_TOPIC_MIN_INSYNC_REPLICAS": "1",
        "STREAMREC_SNAPSHOT_DIR": str(work / "snapshots"),
        "STREAMREC_BANDITS_POLICIES": json.dumps({"linucb": {"learner": "linucb"}}),
        "STREAMREC_JOINER_WINDOW_S": str(WINDOW_S),
        "STREAMREC_JOINER_LATENESS_S": str(LATENESS_S),
        "STREAMREC_RUNTIME_LAG_INTERVAL_S": "2",
        "STREAMREC_GATEWAY_TOKEN": TOKEN,
        "STREAMREC_SERVING_TOKEN": TOKEN,
    }
    os.environ.update(env)
    create_topics(KafkaSettings(), TopicSettings())
    redis_settings = RedisSettings(url=server.url)
    client = clients.redis_client(redis_settings)
    features = np.random.default_rng(1).normal(size=(ITEMS, 8)).astype(np.float32)
    publish_catalog(client, redis_settings.keys(), [f"i{k}" for k in range(ITEMS)], features)
    supervisor = Supervisor(work, env)
    ports = {"gateway": free_port(), "serving": free_port()}
    try:
        for name in SERVICES:
            port = ports.get(name)
            extra = {f"STREAMREC_{name.upper()}_PORT": str(port)} if port else {}
            supervisor.add(name, extra, port)
        wait_http(f"http://127.0.0.1:{ports['gateway']}/healthz", 90)
        # Serving's open /metrics is on its runtime metrics port (the HTTP one needs the token).
        wait_http(f"http://127.0.0.1:{supervisor.services['serving'].metrics_port}/metrics", 90)
        for name in CONSUMERS:
            wait_http(f"http://127.0.0.1:{supervisor.services[name].metrics_port}/metrics", 90)
        yield broker, server, supervisor, client, redis_settings.keys()
    finally:
        supervisor.stop()
        client.close()
        server.stop()
        broker.stop()


def wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


# -- one run ----------------------------------------------------------------------------


def run(args: argparse.Namespace, rate: float, seconds: float, reconcile: bool) -> dict[str, Any]:
    """One soak at ``rate`` for ``seconds`` on a fresh stack; the result as a dict."""
    work = Path(tempfile.mkdtemp(prefix="streamrec-soak-"))
    print(f"run directory (logs): {work}", flush=True)
    with stack(work) as running:
        result = _measure(args, rate, seconds, reconcile, *running)
    shutil.rmtree(work / "kafka", ignore_errors=True)  # the log is large; the logs stay
    return result


def _measure(args, rate, seconds, reconcile, broker, server, supervisor, client, keys):
    store = ParamStore(client, keys=keys)
    gateway = f"http://127.0.0.1:{supervisor.services['gateway'].http_port}"
    serving = f"http://127.0.0.1:{supervisor.services['serving'].http_port}"
    metrics_ports = {name: supervisor.services[name].metrics_port for name in CONSUMERS}
    freshness = Freshness(broker.bootstrap, store)
    probe = ServingProbe(serving)
    counters = multiprocessing.Array("q", 3)
    load = multiprocessing.Process(
        target=produce_load, args=(gateway, rate, seconds, args.slate, args.click_p, counters)
    )
    load.start()
    threads = [threading.Thread(target=t.run, daemon=True) for t in (freshness, probe)]
    for thread in threads:
        thread.start()
    pids = {name: s.process.pid for name, s in supervisor.services.items()}
    pids |= {"load": load.pid, "broker": broker.processes[0].pid, "redis": server.process.pid}
    handles = {name: psutil.Process(pid) for name, pid in pids.items()}
    for handle in handles.values():
        cpu_percent(handle)  # the first call starts the measurement
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    last = 0
    while load.is_alive():
        time.sleep(args.sample_s - (time.monotonic() - started) % args.sample_s)
        now = time.time()
        accepted = counters[0]
        recent = [d for p, d in freshness.resolved if p >= now - args.sample_s - 5]
        served = [d for t, d in probe.latencies if t >= now - args.sample_s]
        samples.append(
            {
                "t_s": round(time.monotonic() - started, 1),
                "accepted": accepted,
                "rate": round((accepted - last) / args.sample_s, 1),
                "lag": {name: lag_of(port) for name, port in metrics_ports.items()},
                "rss_mb": {name: rss_mb(h) for name, h in handles.items()},
                "cpu_percent": {name: cpu_percent(h) for name, h in handles.items()},
                "freshness_p99_s": percentile(recent, 99),
                "serving_p99_s": percentile(served, 99),
                "load_average_1m": round(os.getloadavg()[0], 2),
                "restarts": {name: s.restarts for name, s in supervisor.services.items()},
            }
        )
        last = accepted
        print(json.dumps(samples[-1]), flush=True)
        supervisor.check()
        if not reconcile and not lag_within(samples[1:], rate * args.bound_s):
            load.terminate()  # a capacity trial has failed once a lag passes the bound
    load.join()
    seconds = min(seconds, time.monotonic() - started)
    probe.stop.set()  # its impressions would keep the model changing while it drains
    drained = drain(metrics_ports, store, timeout=WINDOW_S + LATENESS_S + 120)
    freshness.stop.set()
    for thread in threads:
        thread.join(10)
    result = summarize(args, rate, seconds, samples, freshness, probe, counters, drained)
    if reconcile:
        result["reconciliation"] = reconcile_linucb(broker.bootstrap, store)
    return result


def drain(ports: dict[str, int], store: ParamStore, timeout: float) -> dict[str, Any]:
    """Wait until every consumer's lag is 0 and the LinUCB state has stopped changing for
    the attribution window plus lateness (the last windows close on idle markers)."""
    started = time.monotonic()
    stable_since, last = time.monotonic(), None
    while time.monotonic() - started < timeout:
        lags = {name: lag_of(port) for name, port in ports.items()}
        try:
            applied = int(store.latest("linucb", combine=LinUCB.merge)[2]["counts"].sum())
        except ModelNotFound:
            applied = 0
        if applied != last or any(v for v in lags.values()):
            stable_since, last = time.monotonic(), applied
        elif time.monotonic() - stable_since > WINDOW_S + LATENESS_S + 5:
            return {"seconds": round(time.monotonic() - started, 1), "lag": lags}
        time.sleep(1.0)
    return {"seconds": None, "lag": lags, "timed_out": True}


def reconcile_linucb(bootstrap: str, store: ParamStore) -> dict[str, Any]:
    """The LinUCB state against the log: updates = shown items of linucb impressions,
    rewards = clicks on them (each click attributed once)."""
    shown: dict[str, set[str]] = {}
    for value in read_topic(bootstrap, "impressions"):
        impression = decode_impression(value)
        if impression.policy == "linucb":
            shown[impression.request_id] = {item.item_id for item in impression.slate}
    clicked: set[tuple[str, str]] = set()
    clicks_in_log = 0
    for value in read_topic(bootstrap, "clicks"):
        click = decode_click(value)
        clicks_in_log += 1
        if click.request_id in shown and click.item_id in shown[click.request_id]:
            clicked.add((click.request_id, click.item_id))
    _, header, arrays = store.latest("linucb", combine=LinUCB.merge)
    updates = int(round(arrays["counts"].sum()))
    rewards = int(round(arrays["b"][:, CONTEXT_DIM - 1].sum()))  # the context's constant 1.0
    expected_updates = sum(len(items) for items in shown.values())
    return {
        "linucb_impressions_in_log": len(shown),
        "clicks_in_log": clicks_in_log,
        "clicks_on_linucb_slates": len(clicked),
        "rewards_applied": rewards,
        "updates_expected": expected_updates,
        "updates_applied": updates,
        "lost": max(0, len(clicked) - rewards) + max(0, expected_updates - updates),
        "doubled": max(0, rewards - len(clicked)) + max(0, updates - expected_updates),
        "equal": rewards == len(clicked) and updates == expected_updates,
        "params_version": header["version"],
    }


def read_topic(bootstrap: str, topic: str) -> list[bytes]:
    """Every record value of ``topic`` but control records (the joiner's idle markers)."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=5000)
    parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    values = [r.value for r in consumer if not any(k == CONTROL_HEADER for k, _ in r.headers or ())]
    consumer.close()
    return values


def lag_within(samples: list[dict[str, Any]], bound: float) -> bool:
    """Whether every consumer's lag stayed at or below ``bound`` records in ``samples``
    (a consumer without a lag owns no partition: it is not keeping up either)."""
    return all(s["lag"][n] is not None and s["lag"][n] <= bound for s in samples for n in CONSUMERS)


def summarize(args, rate, seconds, samples, freshness, probe, counters, drained):
    steady = [s for s in samples if s["t_s"] >= args.warmup_s] or samples
    by_minute: dict[int, dict[str, float]] = {}
    for sample in samples:
        minute = by_minute.setdefault(int(sample["t_s"] // 60.0001), {})
        for name, lag in sample["lag"].items():
            minute[name] = max(minute.get(name, 0.0), lag or 0.0)
    bound = rate * args.bound_s
    delays = [d for _, d in freshness.resolved]
    names = list(samples[0]["rss_mb"]) if samples else []
    return {
        "rate_offered": rate,
        "seconds": seconds,
        "events_accepted": counters[0],
        "events_refused": counters[1],
        "posts_retried_after_503": counters[2],
        "rate_achieved": round(counters[0] / seconds, 1),
        "lag_max_by_minute": [by_minute[m] for m in sorted(by_minute)],
        "lag_bound_records": bound,
        "lag_bounded": lag_within(samples[1:], bound),
        "drain": drained,
        "rss_slope_mb_per_min": {name: slope_mb_per_min(steady, name) for name in names},
        "rss_mb_first_last": {
            name: [steady[0]["rss_mb"][name], steady[-1]["rss_mb"][name]] for name in names
        },
        "cpu_percent_mean": {
            name: round(float(np.mean([s["cpu_percent"][name] or 0 for s in steady])), 1)
            for name in names
        },
        "broker": {
            "rss_mb_first_last": [steady[0]["rss_mb"]["broker"], steady[-1]["rss_mb"]["broker"]],
            "cpu_percent_mean": round(
                float(np.mean([s["cpu_percent"]["broker"] or 0 for s in steady])), 1
            ),
        }
        if steady
        else None,
        "freshness_definition": "feedback in Kafka -> first LinUCB version covering it; "
        "excludes the attribution window and any joiner lag",
        "freshness_probes": len(delays),
        "freshness_unresolved": len(freshness.pending),
        "freshness_p50_s": percentile(delays, 50),
        "freshness_p99_s": percentile(delays, 99),
        "serving_probe": {
            "answered": len(probe.latencies),
            "failed": probe.failures,
            "p50_s": percentile([d for _, d in probe.latencies], 50),
            "p99_s": percentile([d for _, d in probe.latencies], 99),
        },
        "restarts": samples[-1]["restarts"] if samples else {},
        "samples": samples,
    }


def held(trial: dict[str, Any]) -> bool:
    """A trial held if the gateway took the whole offered rate and every lag stayed bounded."""
    return trial["lag_bounded"] and trial["rate_achieved"] >= 0.98 * trial["rate_offered"]


def capacity(args: argparse.Namespace, rates: list[float]) -> dict[str, Any]:
    """Run the stack afresh at each rate; rising rates stop at the first that does not
    hold, falling ones at the first that does (a failing trial stops at the bound)."""
    trials = []
    rising = rates == sorted(rates)
    for rate in rates:
        trial = run(args, rate, args.capacity_seconds, reconcile=False)
        trials.append({k: v for k, v in trial.items() if k != "samples"})
        print(json.dumps(trials[-1]), flush=True)
        if held(trial) != rising:
            break
    passed = [t["rate_offered"] for t in trials if held(t)]
    return {
        "definition": f"highest offered rate that the gateway took in full and at which "
        f"every consumer's lag stayed below {args.bound_s:g} s of input for "
        f"{args.capacity_seconds:g} s",
        "events_per_s": max(passed) if passed else None,
        "trials": trials,
    }


def main() -> None:
    # SIGTERM unwinds like Ctrl-C, so the stack (broker, Redis, services) is stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument(
        "--rate", type=float, default=5000.0, help="events/s offered (0: the capacity found)"
    )
    parser.add_argument("--slate", type=int, default=2)
    parser.add_argument("--click-p", type=float, default=0.15, help="click chance per item")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="left out of RSS slopes")
    parser.add_argument("--bound-s", type=float, default=10.0, help="lag bound, in s of input")
    parser.add_argument("--capacity", default="", help="rates to try, e.g. 5000,7500,10000")
    parser.add_argument("--capacity-seconds", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    result: dict[str, Any] = {
        "benchmark": "soak",
        "host": describe_host("kafka-python", "redis", "msgspec", kafka="Apache Kafka 4.4.0"),
        "config": {
            "services": list(SERVICES),
            "partitions": PARTITIONS,
            "slate": args.slate,
            "click_p": args.click_p,
            "policies": list(POLICIES),
            "joiner_window_s": WINDOW_S,
            "serving_probe_per_s": SERVING_PROBE_PER_S,
            "sample_s": args.sample_s,
            "warmup_s": args.warmup_s,
            "lag_bound_s": args.bound_s,
        },
    }
    rates = [float(r) for r in args.capacity.split(",") if r]
    if rates:
        result["capacity"] = capacity(args, rates)
    rate = args.rate if args.rate > 0 else result.get("capacity", {}).get("events_per_s")
    if args.seconds > 0 and rate:
        result["soak"] = run(args, rate, args.seconds, reconcile=True)
        print(json.dumps({k: v for k, v in result["soak"].items() if k != "samples"}, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
