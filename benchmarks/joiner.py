"""Joiner benchmark: the pure PartitionJoin on a hot user and on a normal mix.

    python benchmarks/joiner.py [--repeats N] [--baseline REV | --no-baseline]

Prints a table and writes ``benchmarks/results/joiner.json`` with the machine it
ran on. No Kafka: this is the join's own ceiling, one partition on one core.

* ``hot_user``: one user with 5,000 open impressions (slates of 10 out of 200
  items), read well ahead of the clicks, then 20,000 clicks without request id,
  half on items the user was shown and half on items no open impression showed
  (the case the review timed: 2,000 such clicks took 55 s). Run with the
  per-user bound raised above 5,000 (every impression stays open, as in the
  review) and with the default bound (1,000: the oldest are closed early).
* ``normal_mix``: 50,000 impressions of 5,000 users (slates of 5 out of 2,000
  items, 500 impressions/s of event time, so 100 s), about 0.5 clicks per
  impression (70% with request id), each topic up to 1 s out of order, in
  arrival order, and 3% of events delivered a second time 5 to 60 s later (a
  client retry): ``feedback_repeated`` counts feedback ids emitted twice.

Clicks/s and impressions/s are per type: the time spent in ``click`` (resp.
``impression``) calls, closes they trigger included; ``close_s`` is the final
watermark that closes what is left; ``feedback`` counts every feedback emitted,
``clicks_matched`` the (impression, item) pairs a click rewarded first. Each case
runs ``--repeats`` times (default 3); the run with the median click rate is
reported, with all rates.

``--baseline REV`` (default: the commit before the hot-user fix) also runs the
join as it was at REV, loaded from git history (``git show``), on the same
events: its hot-user run is cut to 2,000 clicks, which take minutes there.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import describe_host  # noqa: E402

from contracts.events import Click, Impression, SlateItem  # noqa: E402
from services.joiner import join as current  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "joiner.json"
#: The last commit with the scanning join (a click without request id walked the user's
#: open impressions; a close did list.remove on them).
BASELINE_REV = "d07a954"
T0 = 1_700_000_000.0
WINDOW_S, LATENESS_S = 30.0, 5.0
REVIEW_BEFORE = {
    "clicks": 2_000,
    "open_impressions_of_one_user": 5_000,
    "seconds": 55.0,
    "clicks_per_s": round(2_000 / 55.0, 1),
    "source": "the review (issue 'Nothing lost, nothing doubled, nothing unbounded', item 12)",
}

Events = list[tuple[str, Impression | Click, float]]


def _slate(items: list[str]) -> list[SlateItem]:
    return [SlateItem(item_id=i, position=p, propensity=0.1) for p, i in enumerate(items)]


def hot_user_events(clicks: int, seed: int = 1) -> tuple[list[Impression], list[Click]]:
    rng = random.Random(seed)
    catalogue = [f"i{j}" for j in range(200)]
    imps = [
        Impression(
            request_id=f"r{k}",
            user_id="hot",
            ts=T0 + k * 0.004,
            policy="linucb",
            slate=_slate(rng.sample(catalogue, 10)),
        )
        for k in range(5_000)
    ]
    out = [
        Click(
            event_id=f"c{n}",
            user_id="hot",
            item_id=rng.choice(catalogue) if n % 2 else f"unseen{n}",
            ts=T0 + 20 + n * 0.0001,
        )
        for n in range(clicks)
    ]
    return imps, out


def normal_mix_events(seed: int = 2) -> Events:
    """(kind, event, arrival) in arrival order; each topic up to 1 s out of order."""
    rng = random.Random(seed)
    catalogue = [f"i{j}" for j in range(2_000)]
    events: Events = []
    for k in range(50_000):
        ts = T0 + k / 500
        user = f"u{rng.randrange(5_000)}"
        items = rng.sample(catalogue, 5)
        imp = Impression(
            request_id=f"r{k}", user_id=user, ts=ts, policy="linucb", slate=_slate(items)
        )
        events.append(("i", imp, ts + rng.uniform(0, 1)))
        for n in range(3 if rng.random() < 0.1 else int(rng.random() < 0.2)):
            at = ts + rng.uniform(0.5, 20)
            rid = imp.request_id if rng.random() < 0.7 else None
            c = Click(
                event_id=f"c{k}-{n}", user_id=user, item_id=rng.choice(items), ts=at, request_id=rid
            )
            events.append(("c", c, at + rng.uniform(0, 1)))
    events += [(kind, e, at + rng.uniform(5, 60)) for kind, e, at in events if rng.random() < 0.03]
    events.sort(key=lambda entry: entry[2])
    return events


def load_baseline(rev: str) -> types.ModuleType:
    """services/joiner/join.py as it was at ``rev``, from git history."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:services/joiner/join.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    module = types.ModuleType(f"join_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{rev}:services/joiner/join.py", "exec"), module.__dict__)  # noqa: S102
    return module


def run_hot_user(make: Callable[[], Any], clicks: int) -> dict[str, float]:
    imps, cs = hot_user_events(clicks)
    join = make()
    feedback = 0
    started = time.perf_counter()
    for k, imp in enumerate(imps):
        feedback += len(join.impression(imp, k))
    imp_s = time.perf_counter() - started
    feedback += len(join.advance(T0 + 27, clicks=False))  # impressions read well ahead
    started = time.perf_counter()
    for n, c in enumerate(cs):
        feedback += len(join.click(c, n))
    click_s = time.perf_counter() - started
    started = time.perf_counter()
    feedback += len(join.advance(T0 + 1_000))
    close_s = time.perf_counter() - started
    return {
        "impressions": len(imps),
        "clicks": len(cs),
        "impressions_per_s": len(imps) / imp_s,
        "clicks_per_s": len(cs) / click_s,
        "close_s": close_s,
        "feedback": feedback,
        "clicks_matched": join.stats["clicks_matched"],
    }


def run_mix(make: Callable[[], Any], events: Events, with_timestamps: bool) -> dict[str, float]:
    join = make()
    spent = {"i": 0.0, "c": 0.0}
    count = {"i": 0, "c": 0}
    offsets = {"i": 0, "c": 0}
    emitted: list[str] = []
    for kind, event, arrived in events:
        call = join.impression if kind == "i" else join.click
        args = (event, offsets[kind], arrived) if with_timestamps else (event, offsets[kind])
        started = time.perf_counter()
        closed = call(*args)
        spent[kind] += time.perf_counter() - started
        emitted += [fb.feedback_id for fb in closed]
        count[kind] += 1
        offsets[kind] += 1
    started = time.perf_counter()
    closed = join.advance(T0 + 1e6)
    close_s = time.perf_counter() - started
    emitted += [fb.feedback_id for fb in closed]
    return {
        "impressions": count["i"],
        "clicks": count["c"],
        "impressions_per_s": count["i"] / spent["i"],
        "clicks_per_s": count["c"] / spent["c"],
        "close_s": close_s,
        "feedback": len(emitted),
        "feedback_repeated": len(emitted) - len(set(emitted)),
        "clicks_matched": join.stats["clicks_matched"],
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, Any]:
    ordered = sorted(runs, key=lambda r: r["clicks_per_s"])
    chosen = dict(ordered[len(ordered) // 2])
    chosen["clicks_per_s_all"] = [round(r["clicks_per_s"]) for r in runs]
    chosen["impressions_per_s_all"] = [round(r["impressions_per_s"]) for r in runs]
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in chosen.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision of the old join")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    def new(**extra: Any) -> Callable[[], Any]:
        return lambda: current.PartitionJoin(window_s=WINDOW_S, lateness_s=LATENESS_S, **extra)

    mix = normal_mix_events()
    rows: list[dict[str, Any]] = []
    cases: list[tuple[str, str, Callable[[], dict[str, float]]]] = [
        ("hot_user", "bound 10,000", lambda: run_hot_user(new(max_open_per_user=10_000), 20_000)),
        ("hot_user", "default bound 1,000", lambda: run_hot_user(new(), 20_000)),
        ("normal_mix", "defaults", lambda: run_mix(new(), mix, with_timestamps=True)),
    ]
    if not args.no_baseline:
        old = load_baseline(args.baseline)

        def before() -> Any:
            return old.PartitionJoin(window_s=WINDOW_S, lateness_s=LATENESS_S)

        cases += [
            ("hot_user", f"before ({args.baseline})", lambda: run_hot_user(before, 2_000)),
            ("normal_mix", f"before ({args.baseline})", lambda: run_mix(before, mix, False)),
        ]
    for case, variant, run in cases:
        result = median_run([run() for _ in range(args.repeats)])
        rows.append({"case": case, "variant": variant, **result})
        print(
            f"{case:<11} {variant:<22} impressions {result['impressions']:>6} "
            f"{result['impressions_per_s']:>10,.0f}/s   clicks {result['clicks']:>6} "
            f"{result['clicks_per_s']:>10,.0f}/s   final close {result['close_s']:.3f} s   "
            f"feedback {result['feedback']:>7} ({result.get('feedback_repeated', 0)} repeated)",
            flush=True,
        )
    output = {
        "benchmark": "joiner",
        "host": describe_host("msgspec"),
        "config": {
            "window_s": WINDOW_S,
            "lateness_s": LATENESS_S,
            "repeats": args.repeats,
            "baseline_rev": None if args.no_baseline else args.baseline,
            "target": "hot_user clicks_per_s >= 10,000",
        },
        "review_before": REVIEW_BEFORE,
        "results": rows,
    }
    args.output.write_text(json.dumps(output, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
