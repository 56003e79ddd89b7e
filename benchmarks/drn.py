"""DRN benchmark: serving latency, update throughput, publishing, freshness; and the evaluation.

    python benchmarks/drn.py [--quick] [--skip-<section> ...]
    python benchmarks/drn.py --compare [--steps 20000] [--seeds 3]

The first form writes ``benchmarks/results/drn.json`` with one entry per section
(sections that are skipped keep their previous result):

- ``scoring``: :meth:`DRNPolicy.rank` latency (features, Q under W and W̃,
  probabilistic interleaving) for 50 and 200 candidates, p50/p99, with the
  service's default layout and network; plus the two Q passes alone;
- ``minor``: feedback records/s through the service's apply path
  (:meth:`DRNProcessor.apply`: slate assembly, DBGD verdicts, replay), on
  pre-decoded records, scheduled major updates off;
- ``major``: double-DQN samples/s of the major update and the pause one
  default major update causes;
- ``publish``: size and time of one W + W̃ publish (encode + ParamStore), and
  of the checkpoint snapshot with a full replay buffer;
- ``freshness``: the DRN service as a subprocess against the embedded broker
  and Redis, fed 2,000 feedback records/s; for every published version, the
  time from producing the newest record it reflects to the version being
  readable in Redis.

``--compare`` runs :func:`services.evaluation.drn.compare` (DRN + DBGD vs
LinUCB, nonlinear drifting and linear worlds, several seeds) plus an ablation
without DBGD exploration (α = 0) on the nonlinear world, and writes
``benchmarks/results/drn_vs_linucb.json`` and the ``drn_*.png`` plots.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import describe_host  # noqa: E402

from contracts.events import decode_feedback, encode  # noqa: E402
from contracts.keys import KeySpace  # noqa: E402
from contracts.params import encode_params  # noqa: E402
from services.common import Record  # noqa: E402
from services.drn.publish import published_arrays, published_meta  # noqa: E402
from services.drn.service import DRNProcessor  # noqa: E402
from services.drn.settings import DRNSettings  # noqa: E402
from services.evaluation.drn import compare, plot_comparison, served_feedback  # noqa: E402
from services.paramstore import ParamStore  # noqa: E402
from services.serving.drn_policy import DRNModel, DRNPolicy  # noqa: E402
from services.serving.policies import RankRequest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
SEED = 20260101
#: Freshness ignores versions reflecting records produced in the first seconds of the load.
WARMUP_S = 3.0


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds) * 1e3
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "n": len(ms),
    }


def _trained_model(settings: DRNSettings) -> DRNModel:
    learner = settings.learner()
    return DRNModel.from_weights(
        learner.weights(), learner.explore_weights(), learner.state_dim, explore_version=1
    )


def scoring_section(args: argparse.Namespace) -> dict[str, Any]:
    settings = DRNSettings()
    layout = settings.layout()

    class Source:
        version = 1
        model = _trained_model(settings)

        def current(self) -> tuple[int, DRNModel]:
            return 1, self.model

    policy = DRNPolicy(Source(), layout, interest_columns=settings.interest_columns)
    rng = np.random.default_rng(SEED)
    repeats = 300 if args.quick else 3_000
    out: dict[str, Any] = {"layout": layout.to_meta(), "hidden": list(settings.hidden), "k": 10}
    for n in (50, 200):
        requests = [
            RankRequest(
                user_id="u1",
                context=rng.normal(size=layout.n_context),
                candidates=[f"i{j}" for j in range(n)],
                candidate_labels=np.arange(n, dtype=np.int64),
                item_features=rng.normal(size=(n, layout.embedding_dim)),
                k=10,
                ts=1.7e9,
                extras={"popularity": rng.poisson(3.0, size=(n, 3)).astype(float)},
            )
            for _ in range(32)
        ]
        rank, score = [], []
        for i in range(repeats):
            request = requests[i % len(requests)]
            started = time.perf_counter()
            policy.rank(request, rng)
            rank.append(time.perf_counter() - started)
            state, actions = policy.features(request)
            started = time.perf_counter()
            Source.model.online.score(state, actions)
            Source.model.explore.score(state, actions)
            score.append(time.perf_counter() - started)
        out[f"candidates_{n}"] = {
            "rank": _percentiles(rank),
            "q_w_and_w_tilde": _percentiles(score),
        }
    return out


def print_scoring(result: dict[str, Any]) -> None:
    for n in (50, 200):
        r = result[f"candidates_{n}"]
        print(
            f"{n:>4} candidates: rank p50 {r['rank']['p50_ms']:.3f} ms, p99 "
            f"{r['rank']['p99_ms']:.3f} ms; Q(W)+Q(W~) p50 {r['q_w_and_w_tilde']['p50_ms']:.3f} ms"
        )


def _records(settings: DRNSettings, n_slates: int) -> list[Record]:
    stream = served_feedback(settings, n_slates, seed=SEED, k=5)
    return [
        Record("feedback", 0, offset, None, decode_feedback(raw), 0, raw)
        for offset, raw in enumerate(encode(fb) for fb in stream)
    ]


def minor_section(args: argparse.Namespace) -> dict[str, Any]:
    settings = DRNSettings(major_interval_s=0, drift_detection=False)
    records = _records(settings, 1_000 if args.quick else 6_000)
    raw = [r.raw for r in records]
    processor = DRNProcessor(settings, None)
    processor.restore(0, None)
    batch = 500
    started = time.perf_counter()
    for start in range(0, len(records), batch):
        processor.apply(records[start : start + batch], None)  # type: ignore[arg-type]
    apply_s = time.perf_counter() - started
    started = time.perf_counter()
    for blob in raw:
        decode_feedback(blob)
    decode_s = time.perf_counter() - started
    counters = processor.trainer.counters
    return {
        "records": len(records),
        "slate_size": 5,
        "apply_events_per_s": len(records) / apply_s,
        "decode_and_apply_events_per_s": len(records) / (apply_s + decode_s),
        "minor_updates": counters["minor_updates"],
        "credited_slates": counters["credited"],
        "verdict_window": settings.verdict_window,
    }


def print_minor(result: dict[str, Any]) -> None:
    print(
        f"apply {result['apply_events_per_s']:,.0f} feedback/s "
        f"(decode + apply {result['decode_and_apply_events_per_s']:,.0f}/s), "
        f"{result['minor_updates']} DBGD verdicts"
    )


def _filled_processor(settings: DRNSettings, n_slates: int) -> DRNProcessor:
    processor = DRNProcessor(settings, None)
    processor.restore(0, None)
    records = _records(settings, n_slates)
    for start in range(0, len(records), 1_000):
        processor.apply(records[start : start + 1_000], None)  # type: ignore[arg-type]
    return processor


def major_section(args: argparse.Namespace) -> dict[str, Any]:
    settings = DRNSettings(major_interval_s=0, drift_detection=False)
    processor = _filled_processor(settings, 800 if args.quick else 4_000)
    trainer = processor.trainer
    trainer.major_update()  # warm-up (allocations, Adam state)
    rounds = 2 if args.quick else 5
    durations = []
    for _ in range(rounds):
        started = time.perf_counter()
        trainer.major_update()
        durations.append(time.perf_counter() - started)
    seconds = float(np.median(durations))
    return {
        "buffer_transitions": len(trainer.learner.buffer),
        "returns_linked": trainer.counters["returns"],
        "batch_size": settings.batch_size,
        "major_steps": settings.major_steps,
        "gamma": settings.gamma,
        "torch_threads": torch.get_num_threads(),
        "pause_s": seconds,
        "samples_per_s": settings.major_steps * settings.batch_size / seconds,
    }


def print_major(result: dict[str, Any]) -> None:
    print(
        f"major update: {result['samples_per_s']:,.0f} samples/s; one default update "
        f"({result['major_steps']} steps) pauses consumption {result['pause_s'] * 1e3:.0f} ms"
    )


def _with_redis(run: Callable[[str], dict[str, Any]]) -> dict[str, Any]:
    from services.stack.servers import start_redis

    with tempfile.TemporaryDirectory() as tmp:
        server = start_redis(Path(tmp))
        try:
            return run(server.url)
        finally:
            server.stop()


def publish_section(args: argparse.Namespace) -> dict[str, Any]:
    settings = DRNSettings(major_interval_s=0, drift_detection=False)
    processor = _filled_processor(settings, 1_000 if args.quick else 5_000)
    learner = processor.trainer.learner

    def run(url: str) -> dict[str, Any]:
        store = ParamStore.from_url(url, keys=KeySpace(f"bench{uuid.uuid4().hex[:8]}"))
        times, size = [], 0
        for i in range(10 if args.quick else 50):
            started = time.perf_counter()
            blob = encode_params(
                "drn",
                0,
                published_arrays(learner.weights(), learner.explore_weights()),
                offsets={"feedback": {0: i}},
                meta=published_meta(learner.explore_version, settings.layout()),
            )
            store.publish("drn", {"main": blob})
            times.append(time.perf_counter() - started)
            size = len(blob)
        store.close()
        return {"publish_bytes": size, "publish": _percentiles(times)}

    result = _with_redis(run)
    snapshots = []
    for _ in range(3):
        started = time.perf_counter()
        state = processor.snapshot(0)
        snapshots.append(time.perf_counter() - started)
    result |= {
        "checkpoint_state_bytes": len(state),
        "checkpoint_snapshot_s": float(np.median(snapshots)),
        "buffer_transitions": len(learner.buffer),
        "buffer_capacity": settings.buffer_capacity,
    }
    return result


def print_publish(result: dict[str, Any]) -> None:
    print(
        f"publish W+W~: {result['publish_bytes'] / 1024:.1f} KiB, p50 "
        f"{result['publish']['p50_ms']:.2f} ms; checkpoint state "
        f"{result['checkpoint_state_bytes'] / 2**20:.1f} MiB "
        f"({result['buffer_transitions']} transitions), snapshot "
        f"{result['checkpoint_snapshot_s'] * 1e3:.0f} ms"
    )


def freshness_section(args: argparse.Namespace) -> dict[str, Any]:
    from kafka import KafkaProducer

    from services.common.topics import ensure_topics
    from services.stack.kafka import start_broker
    from services.stack.servers import start_redis

    rate = 2_000
    seconds = 10 if args.quick else 30
    settings = DRNSettings(major_interval_s=0, drift_detection=False)
    stream = [encode(fb) for fb in served_feedback(settings, rate * seconds // 5, seed=SEED, k=5)]
    keys = KeySpace(f"bench{uuid.uuid4().hex[:8]}")
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp) / "broker")
        redis_server = start_redis(Path(tmp) / "redis")
        topic = f"feedback-{uuid.uuid4().hex[:8]}"
        ensure_topics({"bootstrap_servers": broker.bootstrap}, {topic: 1, f"{topic}-dlq": 1})
        env = os.environ | {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "REDIS_URL": redis_server.url,
            "REDIS_NAMESPACE": keys.namespace,
            "STREAMREC_TOPIC_FEEDBACK": topic,
            "STREAMREC_TOPIC_DEAD_LETTER": f"{topic}-dlq",
            "STREAMREC_DRN_MAJOR_INTERVAL_S": "0",
            "STREAMREC_DRN_DRIFT_DETECTION": "false",
        }
        log = open(Path(tmp) / "drn.log", "wb")  # noqa: SIM115 - closed below
        service = subprocess.Popen(
            [sys.executable, "-m", "services.drn.service"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        store = ParamStore.from_url(redis_server.url, keys=keys)
        produced_at: dict[int, float] = {}
        seen: list[tuple[int, float]] = []
        stop = threading.Event()

        def watch() -> None:
            last = None
            while not stop.is_set():
                head = store.head("drn")
                if head is not None and head != last:
                    readable = time.time()
                    _, header, _ = store.latest("drn")
                    seen.append((int(header["offsets"][topic][0]), readable))
                    last = head
                time.sleep(0.005)

        try:
            time.sleep(10.0)  # the service imports torch and joins its group meanwhile
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=2)
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            started = time.monotonic()
            for i, raw in enumerate(stream):
                due = started + i / rate
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                produced_at[i] = time.time()
                producer.send(topic, key=b"k", value=raw)
            producer.flush()
            achieved = len(stream) / (time.monotonic() - started)
            time.sleep(3.0)
            stop.set()
            watcher.join(5)
            producer.close()
        finally:
            service.send_signal(signal.SIGTERM)
            service.wait(30)
            log.close()
            store.close()
            redis_server.stop()
            broker.stop()
    # The first seconds measure the consumer catching up after its start, not steady state.
    warm = produced_at[0] + WARMUP_S
    newest_age = [
        readable - produced_at[offset - 1]
        for offset, readable in seen
        if offset > 0 and produced_at[offset - 1] >= warm
    ]
    waits = []
    previous = 0
    for offset, readable in seen:
        waits += [
            readable - produced_at[i] for i in range(previous, offset) if produced_at[i] >= warm
        ]
        previous = max(previous, offset)
    return {
        "target_events_per_s": rate,
        "achieved_events_per_s": achieved,
        "records": len(stream),
        "versions_published": len(newest_age),
        "publish_interval_s": settings.publish_interval_s,
        "warmup_s": WARMUP_S,
        "freshness": _percentiles(waits) if waits else None,
        "freshness_definition": (
            "per feedback record: produce time to the first published W/W~ version whose "
            "offsets include it being readable in Redis"
        ),
        "newest_record_age": _percentiles(newest_age) if newest_age else None,
        "newest_record_age_definition": (
            "per published version: readable time minus the produce time of the newest "
            "record it reflects"
        ),
    }


def print_freshness(result: dict[str, Any]) -> None:
    fresh = result["freshness"] or {}
    print(
        f"freshness at {result['achieved_events_per_s']:,.0f} events/s: p50 "
        f"{fresh.get('p50_ms', float('nan')):.0f} ms, p99 {fresh.get('p99_ms', float('nan')):.0f}"
        f" ms over {result['versions_published']} versions"
    )


#: (name, run, print) for every section, in order; each gets a --skip-<name> flag.
SECTIONS: list[
    tuple[str, Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]
] = [
    ("scoring", scoring_section, print_scoring),
    ("minor", minor_section, print_minor),
    ("major", major_section, print_major),
    ("publish", publish_section, print_publish),
    ("freshness", freshness_section, print_freshness),
]


def run_comparison(args: argparse.Namespace) -> None:
    seeds = list(range(args.seeds))
    started = time.monotonic()
    report = compare(
        policies=("drn", "linucb"),
        scenarios=("nonlinear", "linear"),
        seeds=seeds,
        steps=args.steps,
        progress=True,
    )
    ablation = compare(
        policies=("drn",),
        scenarios=("nonlinear",),
        seeds=seeds,
        steps=args.steps,
        drn_params={"alpha": 0.0},
        progress=True,
    )
    report["ablation_no_dbgd_nonlinear"] = {
        "drn_params": {"alpha": 0.0},
        "summary": ablation["scenarios"]["nonlinear"]["summary"],
        "per_seed": [
            {k: v for k, v in s.items() if k != "dbgd"}
            for s in ablation["scenarios"]["nonlinear"]["per_seed"]
        ],
    }
    report["seconds"] = time.monotonic() - started
    report["machine"] = describe_host("torch", torch_threads=torch.get_num_threads())
    report["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "drn_vs_linucb.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    for path in plot_comparison(report, RESULTS):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS / "drn.json", help="JSON file")
    parser.add_argument("--compare", action="store_true", help="run the evaluation instead")
    parser.add_argument("--steps", type=int, default=20_000, help="--compare: requests per run")
    parser.add_argument("--seeds", type=int, default=3, help="--compare: number of seeds")
    for name, _, _ in SECTIONS:
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"skip the {name} section")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.compare:
        run_comparison(args)
        return
    results: dict[str, Any] = {}
    if args.output.exists():
        results = json.loads(args.output.read_text())
    for name, run, show in SECTIONS:
        if getattr(args, f"skip_{name}"):
            continue
        print(f"== {name} ==", file=sys.stderr)
        result = run(args)
        result["machine"] = describe_host("torch", torch_threads=torch.get_num_threads())
        result["quick"] = args.quick
        result["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results[name] = result
        show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
