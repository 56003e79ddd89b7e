"""``streamrec simulate``: drive a running stack with simulated users."""

from __future__ import annotations

import argparse
import json
import sys
import threading

from services.bandits.service import BanditsSettings
from services.common.settings import KafkaSettings, RedisSettings, TopicSettings
from services.paramstore import ParamStore
from services.simulator.driver import GatewaySink, KafkaSink, LocalPolicies, Simulation
from services.simulator.world import World, WorldConfig

#: The world `make demo` and `streamrec simulate` use by default: small enough that
#: learning shows within a minute, with the context/item widths the bandits expect.
DEMO_WORLD = WorldConfig(n_users=2000, n_items=100, n_candidates=30, slate_size=5, drift=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", help="gateway base URL (default: produce to Kafka)")
    parser.add_argument("--token", help="gateway bearer token")
    parser.add_argument("--rate", type=float, default=300.0, help="requests per second")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--epsilon",
        type=float,
        default=0.05,
        help="share of uniformly random slates, for unbiased offline evaluation",
    )


def make_simulation(
    *, sink, seed: int, rate: float, epsilon: float = 0.05, store: ParamStore | None = None
) -> tuple[Simulation, LocalPolicies]:
    world = World(DEMO_WORLD, seed=seed)
    policies = LocalPolicies.from_store(
        store, BanditsSettings(), slate_size=DEMO_WORLD.slate_size, epsilon=epsilon, seed=seed
    )
    return Simulation(world, policies, sink, rate=rate, seed=seed), policies


def run(args: argparse.Namespace) -> int:
    """Drive the configured Kafka/Redis (or gateway) with simulated users."""
    from services.common import logs
    from services.gateway.sdk import EventProducer

    logs.configure("simulator")
    if args.gateway:
        sink = GatewaySink(args.gateway, args.token)
    else:
        sink = KafkaSink(EventProducer(KafkaSettings(), TopicSettings()))
    store = ParamStore.from_settings(RedisSettings())
    simulation, policies = make_simulation(
        sink=sink, seed=args.seed, rate=args.rate, epsilon=args.epsilon, store=store
    )
    thread = threading.Thread(target=simulation.run, args=(args.duration,), daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        simulation.stop()
        thread.join()
    finally:
        policies.close()
        sink.close()
    json.dump(simulation.summary(), sys.stdout, indent=2)
    print()
    return 1 if simulation.errors else 0
