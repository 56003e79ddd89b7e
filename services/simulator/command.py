"""``streamrec simulate``: drive a running stack with simulated users."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading

from services.bandits.settings import BanditsSettings
from services.common import clients, logs
from services.common.settings import KafkaSettings, RedisSettings, TopicSettings
from services.gateway.sdk import EventProducer
from services.paramstore import ParamStore
from services.simulator.driver import (
    EventSink,
    GatewaySink,
    KafkaSink,
    LocalPolicies,
    ServingSource,
    Simulation,
    SlateSource,
    publish_world_catalog,
)
from services.simulator.world import World, WorldConfig

#: The world `make demo` and `streamrec simulate` use by default: small enough that
#: learning shows within a minute, with the context/item widths the bandits expect.
DEMO_WORLD = WorldConfig(n_users=2000, n_items=100, n_candidates=30, slate_size=5, drift=0.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--gateway", help="gateway base URL (default: produce to Kafka)")
    parser.add_argument(
        "--token",
        default=os.environ.get("STREAMREC_GATEWAY_TOKEN"),
        help="gateway bearer token (default: $STREAMREC_GATEWAY_TOKEN)",
    )
    parser.add_argument(
        "--serving-token",
        default=os.environ.get("STREAMREC_SERVING_TOKEN"),
        help="serving bearer token (default: $STREAMREC_SERVING_TOKEN)",
    )
    parser.add_argument(
        "--serving",
        help="serving API base URL: ask it for every slate (it logs the impressions); "
        "default: rank in-process with the parameter store's policies",
    )
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
    *,
    sink: EventSink,
    seed: int,
    rate: float,
    epsilon: float = 0.05,
    store: ParamStore | None = None,
    serving_url: str | None = None,
    serving_token: str | None = None,
    redis_settings: RedisSettings | None = None,
) -> tuple[Simulation, SlateSource]:
    """The demo world driven through serving (``serving_url``) or local policies.

    With serving, the world's catalog (items and features) is first published to
    Redis, where serving reads its candidates' features.
    """
    world = World(DEMO_WORLD, seed=seed)
    source: SlateSource
    if serving_url:
        redis_settings = redis_settings or RedisSettings()
        client = clients.redis_client(redis_settings)
        try:
            publish_world_catalog(world, client, redis_settings.keys())
        finally:
            client.close()
        source = ServingSource.from_url(
            serving_url, slate_size=DEMO_WORLD.slate_size, token=serving_token
        )
    else:
        source = LocalPolicies.from_store(
            store, BanditsSettings(), slate_size=DEMO_WORLD.slate_size, epsilon=epsilon, seed=seed
        )
    return Simulation(world, source, sink, rate=rate, seed=seed), source


def run(args: argparse.Namespace) -> int:
    """Drive the configured Kafka/Redis (or gateway) with simulated users."""
    logs.configure("simulator")
    # httpx logs every request at INFO: hundreds of lines a second at simulator rates.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if args.gateway:
        sink = GatewaySink(args.gateway, args.token)
    else:
        sink = KafkaSink(EventProducer(KafkaSettings(), TopicSettings()))
    store = ParamStore.from_settings(RedisSettings())
    simulation, source = make_simulation(
        sink=sink,
        seed=args.seed,
        rate=args.rate,
        epsilon=args.epsilon,
        store=store,
        serving_url=args.serving,
        serving_token=args.serving_token,
    )
    thread = threading.Thread(target=simulation.run, args=(args.duration,), daemon=True)
    thread.start()
    try:
        thread.join()
    except KeyboardInterrupt:
        simulation.stop()
        thread.join()
    finally:
        source.close()
        sink.close()
        store.close()
    json.dump(simulation.summary(), sys.stdout, indent=2)
    print()
    return 1 if simulation.errors else 0
