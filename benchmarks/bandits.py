"""Bandit benchmark: learner throughput and regret on one shared synthetic stream.

    python benchmarks/bandits.py [--quick] [--repeats N] [--skip-learners]

Prints a table per section and writes ``benchmarks/results/bandits.json``. The
script is a list of sections (``SECTIONS``); each is a function from the parsed
arguments to a JSON-able dict, gets a ``--skip-<name>`` flag, and stores its
result under its name together with the machine it ran on. Sections that were
skipped keep their previous result in the JSON file.

The learners section runs every streamrec learner, river's ``LinUCBDisjoint``
and ``ThompsonSampling`` and mabwiser's LinUCB and Thompson sampling on the
same stream: K=50 arms, 16 context dimensions plus a bias column, click
probability ``sigmoid(c + bias_a + x·θ_a)`` with ``c`` set for a ~5% mean CTR
under a uniformly random policy; one arm has a clearly higher bias, so the
context-free learners have a best arm to find, while the contextual best arm
per event is worth several times the mean CTR.
Rewards use common random numbers (event t clicks iff ``u_t < p_t(arm)``), so
every policy faces the same luck. Regret is expected regret: the best arm's
click probability for that event minus the chosen arm's. Every timed run is
repeated (``--repeats``, default 3) and the run with the median rate is reported
beside all the rates: on a shared host the same code's speed drifts from run
to run. The policies are seeded, so repeats choose the same arms.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One BLAS thread: a consumer process serves its partitions on one core, and threaded
# BLAS on small matrices only adds contention on a shared machine. Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import describe_host  # noqa: E402

from services.bandits import LEARNERS, LinUCB, learner_class, top_k  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bandits.json"
N_ARMS = 50
CONTEXT_DIM = 16
TARGET_CTR = 0.05
BATCH = 1_000
SEED = 20260101
#: Width of the benchmark's feature rows: a bias column, then the context.
FEATURES = 1 + CONTEXT_DIM
#: Constructor arguments for each streamrec learner in this benchmark.
LEARNER_PARAMS: dict[str, dict[str, Any]] = {
    "linucb": {"dim": FEATURES, "alpha": 0.5},
    # The last 4 columns are shared.
    "hybrid_linucb": {"arm_dim": FEATURES - 4, "shared_dim": 4, "alpha": 0.5},
    "ts_linear": {"dim": FEATURES, "v": 0.25},
    "ts_beta": {},
    "egreedy": {"epsilon": 0.05},
}
#: LinUCB one-at-a-time and batched throughput targets (events/s).
TARGETS = {"target_online_events_per_s": 30_000, "target_batched_events_per_s": 150_000}


@dataclass(frozen=True)
class Stream:
    """Contexts, click probabilities and reward draws for every event."""

    X: np.ndarray  # (n, 1 + CONTEXT_DIM): bias column, then the context
    probs: np.ndarray  # (n, N_ARMS): click probability of each arm for each event
    uniforms: np.ndarray  # (n,): event t clicks iff uniforms[t] < probs[t, arm]

    @classmethod
    def synthetic(cls, n: int, seed: int = SEED) -> Stream:
        rng = np.random.default_rng(seed)
        theta = rng.normal(scale=1.0, size=(N_ARMS, CONTEXT_DIM))
        arm_bias = rng.normal(scale=0.5, size=N_ARMS)
        arm_bias[0] += 1.0  # one arm clearly best on average, for the context-free learners
        context = rng.normal(size=(n, CONTEXT_DIM)) / np.sqrt(CONTEXT_DIM)
        logits = arm_bias + context @ theta.T
        # Bisect the global offset so that a uniformly random policy sees TARGET_CTR.
        low, high = -20.0, 5.0
        for _ in range(60):
            mid = (low + high) / 2
            if _sigmoid(logits + mid).mean() > TARGET_CTR:
                high = mid
            else:
                low = mid
        X = np.column_stack([np.ones(n), context])
        return cls(X=X, probs=_sigmoid(logits + low), uniforms=rng.random(n))

    @property
    def best(self) -> np.ndarray:
        return self.probs.max(axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@dataclass
class Run:
    """One policy on the first ``events`` events of the stream."""

    learner: str
    library: str
    mode: str
    events: int
    seconds: float
    cpu_seconds: float
    regret: np.ndarray  # per-event expected regret
    repeat_rates: tuple[float, ...] = ()  # events/s of every repeat (see ``median_run``)

    def row(self, horizon: int) -> dict[str, Any]:
        cumulative = float(self.regret.sum())
        return {
            "learner": self.learner,
            "library": self.library,
            "mode": self.mode,
            "events": self.events,
            "seconds": round(self.seconds, 4),
            "events_per_s": round(self.events / self.seconds, 1),
            "cpu_seconds": round(self.cpu_seconds, 4),
            "events_per_cpu_s": round(self.events / self.cpu_seconds, 1),
            "cumulative_regret": round(cumulative, 3),
            "regret_per_event": round(cumulative / self.events, 6),
            f"regret_per_event_first_{horizon}": round(float(self.regret[:horizon].mean()), 6),
            "events_per_s_repeats": [round(rate, 1) for rate in self.repeat_rates],
        }


def median_run(measure: Callable[[], Run], repeats: int) -> Run:
    """Call ``measure`` ``repeats`` times; the run with the median rate, holding every rate."""
    runs = sorted((measure() for _ in range(repeats)), key=lambda run: run.seconds)
    rates = tuple(run.events / run.seconds for run in runs)
    return dataclasses.replace(runs[len(runs) // 2], repeat_rates=rates)


# -- streamrec learners -------------------------------------------------------------


def run_online(name: str, stream: Stream, n: int) -> Run:
    """Score all arms, select one, update with its reward: one event at a time."""
    learner = learner_class(name)(**LEARNER_PARAMS[name], seed=SEED)
    items = np.arange(N_ARMS, dtype=np.int64)
    chosen = np.empty(n, dtype=np.int64)
    # Every candidate shares the event's context. Like a serving loop, the harness
    # fills one buffer in place rather than allocating a matrix per event.
    X = np.empty((N_ARMS, stream.X.shape[1])) if learner.needs_features else None
    start, cpu_start = time.perf_counter(), time.process_time()
    for t in range(n):
        if X is not None:
            X[:] = stream.X[t]
        arm = int(learner.select(items, X, 1)[0])
        reward = 1.0 if stream.uniforms[t] < stream.probs[t, arm] else 0.0
        learner.update(
            items[arm : arm + 1], None if X is None else X[arm : arm + 1], np.array([reward])
        )
        chosen[t] = arm
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(name, "streamrec", "online", n, seconds, cpu, _regret(stream, chosen))


def run_batched(name: str, stream: Stream, n: int, batch: int = BATCH) -> Run:
    """Score a whole batch of events in one call, select per event, one update per batch."""
    learner = learner_class(name)(**LEARNER_PARAMS[name], seed=SEED)
    items = np.arange(N_ARMS, dtype=np.int64)
    chosen = np.empty(n, dtype=np.int64)
    start, cpu_start = time.perf_counter(), time.process_time()
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        contexts = stream.X[lo:hi]
        X = np.repeat(contexts, N_ARMS, axis=0) if learner.needs_features else None
        scores = learner.score(np.tile(items, hi - lo), X).reshape(hi - lo, N_ARMS)
        arms = top_k(scores, 1, learner.rng)[:, 0]
        rows = np.arange(lo, hi)
        rewards = (stream.uniforms[lo:hi] < stream.probs[rows, arms]).astype(np.float64)
        learner.update(items[arms], contexts if learner.needs_features else None, rewards)
        chosen[lo:hi] = arms
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(name, "streamrec", f"batched x{batch}", n, seconds, cpu, _regret(stream, chosen))


def _regret(stream: Stream, chosen: np.ndarray) -> np.ndarray:
    n = len(chosen)
    return stream.best[:n] - stream.probs[np.arange(n), chosen]


# -- other libraries ----------------------------------------------------------------


def run_river(kind: str, stream: Stream, n: int) -> Run:
    """river 0.26: ``pull(arm_ids, context=dict)`` then ``update(arm, context, reward)``."""
    from river import bandit, proba

    arms = list(range(N_ARMS))
    chosen = np.empty(n, dtype=np.int64)
    if kind == "LinUCBDisjoint":
        policy: Any = bandit.LinUCBDisjoint(seed=SEED)
        names = [f"x{i}" for i in range(stream.X.shape[1])]
        start, cpu_start = time.perf_counter(), time.process_time()
        for t in range(n):
            context = dict(zip(names, stream.X[t].tolist(), strict=True))
            arm = policy.pull(arms, context=context)
            policy.update(arm, context, float(stream.uniforms[t] < stream.probs[t, arm]))
            chosen[t] = arm
    else:
        policy = bandit.ThompsonSampling(reward_obj=proba.Beta(), seed=SEED)
        start, cpu_start = time.perf_counter(), time.process_time()
        for t in range(n):
            arm = policy.pull(arms)
            policy.update(arm, float(stream.uniforms[t] < stream.probs[t, arm]))
            chosen[t] = arm
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return Run(kind, "river", "online", n, seconds, cpu, _regret(stream, chosen))


def run_mabwiser(kind: str, stream: Stream, n: int, batch: int) -> Run:
    """mabwiser: ``predict`` then ``partial_fit``, per event (batch=1) or per batch."""
    from mabwiser.mab import MAB, LearningPolicy

    policy = (
        LearningPolicy.LinUCB(alpha=LEARNER_PARAMS["linucb"]["alpha"], l2_lambda=1.0)
        if kind == "LinUCB"
        else LearningPolicy.ThompsonSampling()
    )
    mab = MAB(arms=list(range(N_ARMS)), learning_policy=policy, seed=SEED)
    contextual = kind == "LinUCB"
    # mabwiser cannot predict before its first fit: the first event (or batch) is
    # chosen uniformly at random, and its regret counts.
    warm_up = np.random.default_rng(SEED)
    fitted = False
    chosen = np.empty(n, dtype=np.int64)
    start, cpu_start = time.perf_counter(), time.process_time()
    for lo in range(0, n, batch):
        hi = min(lo + batch, n)
        contexts = stream.X[lo:hi]
        if not fitted:
            arms = warm_up.integers(0, N_ARMS, size=hi - lo)
        elif contextual or hi - lo > 1:
            arms = np.asarray(mab.predict(contexts), dtype=np.int64).reshape(-1)
        else:
            arms = np.array([mab.predict()], dtype=np.int64)
        rows = np.arange(lo, hi)
        rewards = (stream.uniforms[lo:hi] < stream.probs[rows, arms]).astype(np.float64)
        learn = mab.partial_fit if fitted else mab.fit
        learn(arms, rewards, contexts if contextual else None)
        fitted = True
        chosen[lo:hi] = arms
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    mode = "online" if batch == 1 else f"batched x{batch}"
    return Run(kind, "mabwiser", mode, n, seconds, cpu, _regret(stream, chosen))


# -- the section --------------------------------------------------------------------


def learners_section(args: argparse.Namespace) -> dict[str, Any]:
    """Throughput and regret of every learner, streamrec's beside river's and mabwiser's."""
    n = 10_000 if args.quick else 100_000
    n_river = 1_000 if args.quick else 5_000
    n_mab_online = 300 if args.quick else 2_000
    n_mab_batched = 5_000 if args.quick else 20_000
    stream = Stream.synthetic(n)

    runs: list[Run] = []
    for name in LEARNERS:
        # Untimed warm-up: the first passes pay for imports and first-touch page faults.
        run_online(name, stream, 500)
        run_batched(name, stream, 3 * BATCH)
        runs.append(median_run(functools.partial(run_online, name, stream, n), args.repeats))
        runs.append(median_run(functools.partial(run_batched, name, stream, n), args.repeats))
        _progress(runs[-2:])
    for kind in ("LinUCBDisjoint", "ThompsonSampling"):
        run_river(kind, stream, 100)
        runs.append(median_run(functools.partial(run_river, kind, stream, n_river), args.repeats))
        _progress(runs[-1:])
    for kind in ("LinUCB", "ThompsonSampling"):
        try:
            for events, batch in ((n_mab_online, 1), (n_mab_batched, BATCH)):
                measure = functools.partial(run_mabwiser, kind, stream, events, batch)
                runs.append(median_run(measure, args.repeats))
            _progress(runs[-2:])
        except Exception as exc:  # a broken optional library is reported, not fatal
            print(f"mabwiser {kind} failed: {exc!r}", file=sys.stderr)

    rows = [run.row(n_river) for run in runs]
    by_key = {(r["learner"], r["library"], r["mode"]): r for r in rows}
    batched = f"batched x{BATCH}"
    comparisons = {}
    for ours, theirs in (("linucb", "LinUCBDisjoint"), ("ts_beta", "ThompsonSampling")):
        river = by_key[(theirs, "river", "online")]
        regret_key = f"regret_per_event_first_{n_river}"
        comparisons[f"{ours}_vs_river_{theirs}"] = {
            "online_speedup": round(
                by_key[(ours, "streamrec", "online")]["events_per_s"] / river["events_per_s"], 1
            ),
            "batched_speedup": round(
                by_key[(ours, "streamrec", batched)]["events_per_s"] / river["events_per_s"], 1
            ),
            "regret_per_event_first_n": {
                "n": n_river,
                "streamrec_online": by_key[(ours, "streamrec", "online")][regret_key],
                "streamrec_batched": by_key[(ours, "streamrec", batched)][regret_key],
                "river": river[regret_key],
            },
        }
    online = by_key[("linucb", "streamrec", "online")]
    in_batches = by_key[("linucb", "streamrec", batched)]
    targets = {
        **TARGETS,
        "linucb_online_events_per_s": online["events_per_s"],
        "linucb_online_events_per_cpu_s": online["events_per_cpu_s"],
        "linucb_batched_events_per_s": in_batches["events_per_s"],
        "linucb_batched_events_per_cpu_s": in_batches["events_per_cpu_s"],
    }
    return {
        "config": {
            "arms": N_ARMS,
            "context_dim": CONTEXT_DIM,
            "feature_columns": stream.X.shape[1],
            "mean_ctr_uniform_policy": round(float(stream.probs.mean()), 4),
            "mean_ctr_best_arm": round(float(stream.best.mean()), 4),
            "events": n,
            "river_events": n_river,
            "mabwiser_events": {"online": n_mab_online, "batched": n_mab_batched},
            "batch": BATCH,
            "seed": SEED,
            "repeats": args.repeats,
            "learner_params": LEARNER_PARAMS,
        },
        "rows": rows,
        "comparisons": comparisons,
        "targets": targets,
    }


def _progress(runs: list[Run]) -> None:
    for run in runs:
        rates = ", ".join(f"{rate:,.0f}" for rate in run.repeat_rates)
        print(
            f"  {run.library}/{run.learner} {run.mode}: {run.events / run.seconds:,.0f} events/s "
            f"(median of {rates})",
            file=sys.stderr,
        )


def print_learners(result: dict[str, Any]) -> None:
    rows = result["rows"]
    horizon = result["config"]["river_events"]
    first = f"regret_per_event_first_{horizon}"
    header = (
        f"{'learner':<18}{'library':<11}{'mode':<15}{'events':>8}{'events/s':>12}{'ev/cpu-s':>12}"
        f"{'cum regret':>12}{'regret/ev':>11}{f'r/ev@{horizon}':>12}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['learner']:<18}{r['library']:<11}{r['mode']:<15}{r['events']:>8,}"
            f"{r['events_per_s']:>12,.0f}{r['events_per_cpu_s']:>12,.0f}"
            f"{r['cumulative_regret']:>12.1f}"
            f"{r['regret_per_event']:>11.4f}{r[first]:>12.4f}"
        )
    for name, comparison in result["comparisons"].items():
        print(
            f"{name}: {comparison['online_speedup']}x online, "
            f"{comparison['batched_speedup']}x batched; regret/event over the first "
            f"{comparison['regret_per_event_first_n']['n']}: "
            f"{comparison['regret_per_event_first_n']}"
        )
    print(f"targets: {result['targets']}")


# -- end-to-end freshness ---------------------------------------------------------------


def freshness_section(args: argparse.Namespace) -> dict[str, Any]:
    """Feedback produced to Kafka -> a LinUCB version readable in Redis that reflects it.

    Runs ``streamrec run bandits`` as its own process against the embedded broker and
    Redis, produces feedback at a steady rate, and watches the parameter store: a
    record is fresh once a published version's offsets cover it.
    """
    import subprocess
    import tempfile
    import threading

    from kafka import KafkaProducer

    from contracts.events import Feedback, encode, feedback_id
    from services.common.topics import ensure_topics
    from services.paramstore import ModelNotFound, ParamStore
    from services.stack.kafka import start_broker
    from services.stack.servers import start_redis

    rate, seconds = 5000.0, (5.0 if args.quick else 20.0)
    with tempfile.TemporaryDirectory() as tmp:
        broker = start_broker(Path(tmp))
        redis_server = start_redis(Path(tmp) / "redis")
        ensure_topics({"bootstrap_servers": broker.bootstrap}, {"fb": 4, "dlq": 1})
        env = os.environ | {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap,
            "REDIS_URL": redis_server.url,
            "STREAMREC_TOPIC_FEEDBACK": "fb",
            "STREAMREC_TOPIC_DEAD_LETTER": "dlq",
            "STREAMREC_BANDITS_POLICIES": '{"linucb": {"learner": "linucb"}}',
            "STREAMREC_BANDITS_CONTEXT_DIM": str(CONTEXT_DIM),
            "KAFKA_MAX_POLL_INTERVAL_MS": "3000",
            "KAFKA_SESSION_TIMEOUT_MS": "3000",
        }
        service = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "run", "bandits"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        store = ParamStore.from_url(redis_server.url)
        rng = np.random.default_rng(0)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=1)
        sent: list[tuple[Any, float]] = []
        seen: list[tuple[float, dict[int, int]]] = []
        done = threading.Event()

        def watch() -> None:
            last = None
            while not done.is_set():
                try:
                    head = store.head("linucb")
                    if head is not None and head != last:
                        last = head
                        _, header, _ = store.latest("linucb", combine=LinUCB.merge)
                        seen.append((time.time(), header["offsets"].get("fb", {})))
                except ModelNotFound:
                    pass
                time.sleep(0.005)

        def event(i: int) -> bytes:
            context = [*rng.normal(size=CONTEXT_DIM).round(4).tolist()]
            return encode(
                Feedback(
                    feedback_id=feedback_id(f"r{i}", f"i{i % N_ARMS}"),
                    request_id=f"r{i}",
                    user_id=f"u{i % 997}",
                    item_id=f"i{i % N_ARMS}",
                    ts=time.time(),
                    reward=int(rng.random() < 0.05),
                    position=0,
                    propensity=1.0,
                    policy="linucb",
                    context=context,
                )
            )

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            producer.send("fb", key=b"warmup", value=event(-1)).get(30)
            deadline = time.monotonic() + 60
            while not seen and time.monotonic() < deadline:
                time.sleep(0.05)
            started = time.monotonic()
            i = 0
            while time.monotonic() - started < seconds:
                due = int((time.monotonic() - started) * rate) - i
                for _ in range(max(due, 0)):
                    sent.append(
                        (
                            producer.send("fb", key=f"u{i % 997}".encode(), value=event(i)),
                            time.time(),
                        )
                    )
                    i += 1
                time.sleep(0.001)
            producer.flush()
            time.sleep(3.0)
        finally:
            done.set()
            watcher.join()
            service.terminate()
            service.wait(30)
            producer.close()
            store.close()
            broker.stop()
            redis_server.stop()
    fresh = []
    for future, produced_at in sent:
        meta = future.get(0)
        for observed_at, offsets in seen:
            if int(offsets.get(meta.partition, offsets.get(str(meta.partition), 0))) > meta.offset:
                fresh.append(observed_at - produced_at)
                break
    ms = np.array(fresh) * 1000
    return {
        "rate_per_s": rate,
        "seconds": seconds,
        "events": len(sent),
        "fresh_events": int(ms.size),
        "versions_observed": len(seen),
        "freshness_p50_ms": float(np.percentile(ms, 50)),
        "freshness_p99_ms": float(np.percentile(ms, 99)),
        "target_p99_ms": 1000.0,
    }


def print_freshness(result: dict[str, Any]) -> None:
    print(
        f"freshness at {result['rate_per_s']:.0f} feedback/s: p50 "
        f"{result['freshness_p50_ms']:.0f} ms, p99 {result['freshness_p99_ms']:.0f} ms "
        f"(target p99 <= 1000 ms; {result['fresh_events']}/{result['events']} events seen "
        f"in {result['versions_observed']} versions)"
    )


# -- the script ---------------------------------------------------------------------

#: (name, run, print) for every section, in order; each gets a --skip-<name> flag.
SECTIONS: list[
    tuple[str, Callable[[argparse.Namespace], dict[str, Any]], Callable[[dict[str, Any]], None]]
] = [
    ("learners", learners_section, print_learners),
    ("freshness", freshness_section, print_freshness),
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small event counts (smoke run)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per policy; the median is reported"
    )
    for name, _, _ in SECTIONS:
        parser.add_argument(f"--skip-{name}", action="store_true", help=f"skip the {name} section")
    args = parser.parse_args(argv)

    results: dict[str, Any] = {}
    if args.output.exists():
        results = json.loads(args.output.read_text())
    for name, run, show in SECTIONS:
        if getattr(args, f"skip_{name.replace('-', '_')}"):
            continue
        print(f"== {name} ==", file=sys.stderr)
        result = run(args)
        result["machine"] = describe_host(
            "river", "mabwiser", openblas_num_threads=os.environ.get("OPENBLAS_NUM_THREADS")
        )
        result["quick"] = args.quick
        result["generated_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        results[name] = result
        show(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
