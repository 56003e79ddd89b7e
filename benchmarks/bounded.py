"""Issue 11 benchmark: checkpoints and throughput under a flood of distinct ids, at the defaults.

    python benchmarks/bounded.py [--ids N]

Drives the bandits and embeddings processors directly (no broker, no Redis)
with feedback / clicks each for an item id never seen before (default 600,000
for the bandits, 300,000 for the embeddings), at the default caps
(``STREAMREC_BANDITS_MAX_ARMS`` 100k per learner, ``STREAMREC_EMBEDDINGS_MAX_ITEMS``
200k). The bandits flood is spread over the four default policies, so each
learner receives a quarter of the ids. Reports the checkpoint of one partition
(bytes, and time to encode it) as the flood passes the cap, and the records per
second applied before the cap and after it (eviction included). The embeddings
also run with no effective cap over the same clicks, so the records per second
past the cap compare with the same work minus eviction (a skip-gram batch costs
more as users' click windows fill, so the two phases do not compare with each
other). Writes ``benchmarks/results/bounded.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# One BLAS thread, as a consumer process has (see benchmarks/bandits.py).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from host import describe_host  # noqa: E402
from prometheus_client import CollectorRegistry  # noqa: E402

from contracts.events import Click, Feedback  # noqa: E402
from services.bandits.service import BanditsProcessor  # noqa: E402
from services.bandits.settings import BanditsSettings  # noqa: E402
from services.common import Record  # noqa: E402
from services.embeddings.service import EmbeddingsProcessor, EmbeddingsSettings  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bounded.json"
BATCH = 5000
POLICIES = ("linucb", "ts", "ts_beta", "egreedy")
REDIS_MAX_BULK_BYTES = 512 * 2**20


class _Ctx:
    """The one Context call the embeddings processor makes."""

    def request_checkpoint(self) -> None:
        """Checkpoints are taken by this script, not requested."""


def _feedback(lo: int, hi: int) -> list[Record]:
    return [
        Record(
            "feedback",
            0,
            n,
            None,
            Feedback(
                feedback_id=f"r{n}/spam-{n}",
                request_id=f"r{n}",
                user_id=f"u{n % 1000}",
                item_id=f"spam-{n}",
                ts=1.7e9 + n,
                reward=n % 10 == 0,
                position=0,
                propensity=0.5,
                policy=POLICIES[n % 4],
                context=[0.1 * (n % 7), 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0],
            ),
            0,
        )
        for n in range(lo, hi)
    ]


def _clicks(lo: int, hi: int) -> list[Record]:
    return [
        Record(
            "clicks",
            0,
            n,
            None,
            Click(event_id=f"e{n}", user_id=f"u{n % 20_000}", item_id=f"spam-{n}", ts=1.7e9 + n),
            0,
        )
        for n in range(lo, hi)
    ]


def _flood(processor: Any, make: Any, ids: int, full_after: int) -> dict[str, Any]:
    """Apply ``ids`` records in batches; time them before and after record ``full_after``."""
    timed = {"filling": [0, 0.0], "full": [0, 0.0]}
    checkpoints = []
    ctx = _Ctx()
    for lo in range(0, ids, BATCH):
        records = make(lo, min(lo + BATCH, ids))
        phase = "full" if lo >= full_after else "filling"
        started = time.perf_counter()
        processor.apply(records, ctx)
        timed[phase][0] += len(records)
        timed[phase][1] += time.perf_counter() - started
        if (lo // BATCH) % 10 == 9 or lo + BATCH >= ids:
            started = time.perf_counter()
            size = len(processor.snapshot(0))
            checkpoints.append(
                {
                    "ids": lo + len(records),
                    "bytes": size,
                    "encode_s": round(time.perf_counter() - started, 3),
                }
            )
    return {
        "ids": ids,
        "records_per_s": {
            phase: round(n / seconds) if seconds else None for phase, (n, seconds) in timed.items()
        },
        "checkpoints": checkpoints,
        "largest_checkpoint_mib": round(max(c["bytes"] for c in checkpoints) / 2**20, 1),
        "share_of_redis_value_limit": round(
            max(c["bytes"] for c in checkpoints) / REDIS_MAX_BULK_BYTES, 3
        ),
    }


def bandits(ids: int) -> dict[str, Any]:
    settings = BanditsSettings()
    processor = BanditsProcessor(settings, None, CollectorRegistry())
    processor.restore(0, None)
    learners = processor.learners[0]
    result = _flood(processor, _feedback, ids, len(POLICIES) * settings.max_arms)
    arms = {policy: learner.n_arms for policy, learner in learners.items()}
    return {"max_arms": settings.max_arms, "arms": arms} | result


def embeddings(ids: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    cap = EmbeddingsSettings().max_items
    out: dict[str, Any] = {}
    for run, max_items in (("capped", cap), ("uncapped", 10**9)):
        processor = EmbeddingsProcessor(
            EmbeddingsSettings(max_items=max_items), None, CollectorRegistry()
        )
        processor.restore(0, None)
        result = _flood(processor, _clicks, ids, cap)
        out[run] = {"max_items": max_items, "items": len(processor.model)} | result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ids", type=int, default=None, help="records per flood")
    args = parser.parse_args()
    results = {
        "bandits": bandits(args.ids or 600_000),
        "embeddings": embeddings(args.ids or 300_000),
        "host": describe_host("torch"),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    runs = {
        "bandits": results["bandits"],
        "embeddings": results["embeddings"]["capped"],
        "embeddings, no cap": results["embeddings"]["uncapped"],
    }
    for name, r in runs.items():
        print(
            f"{name}: {r['ids']} distinct ids, largest checkpoint {r['largest_checkpoint_mib']} MiB"
            f" ({r['share_of_redis_value_limit']:.0%} of 512 MiB), records/s {r['records_per_s']}"
        )


if __name__ == "__main__":
    main()
