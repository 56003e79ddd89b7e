"""``streamrec up``, ``down`` and ``status``: the whole system on one machine.

``up`` starts Apache Kafka (one KRaft node, its log in ``RUN_DIR/kafka``, fresh
for every run) and redis-server on free loopback ports (or uses
``--kafka``/``--redis``), creates the topics, starts every service as its own
supervised process, optionally drives it with the simulator while showing live
progress, and on Ctrl-C/SIGTERM stops everything. Its state (pids, ports, URLs)
is in ``RUN_DIR/stack.json`` for ``status`` and ``down``; a Prometheus config
that scrapes every process is in ``RUN_DIR/prometheus/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import httpx

from services.apps import available_services
from services.common import logs
from services.common.settings import KafkaSettings, TopicSettings
from services.common.topics import create_topics
from services.stack.demo import Demo
from services.stack.kafka import start_broker
from services.stack.servers import ManagedProcess, free_port, start_redis
from services.stack.supervisor import SupervisedService, Supervisor

log = logging.getLogger(__name__)

DEFAULT_RUN_DIR = Path(".streamrec")
#: Services `up` starts, in order, when they are installed in this build.
STACK_SERVICES = (
    "gateway",
    "joiner",
    "bandits",
    "sequences",
    "embeddings",
    "drn",
    "guard",
    "serving",
)


def add_run_dir_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run-dir",
        type=Path,
        default=DEFAULT_RUN_DIR,
        help="where stack.json and logs live (default: .streamrec)",
    )


def add_up_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_dir_argument(parser)
    parser.add_argument(
        "--kafka", help="use this Kafka (host:port) instead of starting an embedded one"
    )
    parser.add_argument("--redis", help="use this Redis URL instead of starting redis-server")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument(
        "--services",
        default=",".join(STACK_SERVICES),
        help="comma-separated services to start (default: all installed)",
    )
    parser.add_argument("--gateway-port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--console",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="serve the live console (a web page of the running system; default: on)",
    )
    parser.add_argument(
        "--simulate",
        action="store_true",
        help="drive the stack with the simulator and show live progress",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="with --simulate: stop everything after this many seconds",
    )
    parser.add_argument(
        "--rate", type=float, default=300.0, help="with --simulate: requests per second"
    )
    parser.add_argument("--seed", type=int, default=7, help="simulator seed")


TOKEN_FILE = "gateway-token"  # noqa: S105 - a file name
SERVING_TOKEN_FILE = "serving-token"  # noqa: S105 - a file name
CONSOLE_TOKEN_FILE = "console-token"  # noqa: S105 - a file name
#: Services whose /metrics is on their HTTP port; the others' (serving's HTTP
#: /metrics needs its token) is on their runtime metrics port.
METRICS_ON_HTTP_PORT = frozenset({"gateway", "console"})


def gateway_token(run_dir: Path) -> str:
    """The gateway's bearer token: ``STREAMREC_GATEWAY_TOKEN`` if set, else one
    generated for this run directory and kept in ``RUN_DIR/gateway-token`` (mode 0600)."""
    return _token(run_dir, "STREAMREC_GATEWAY_TOKEN", TOKEN_FILE)


def serving_token(run_dir: Path) -> str:
    """Serving's bearer token: ``STREAMREC_SERVING_TOKEN`` if set, else one generated
    for this run directory and kept in ``RUN_DIR/serving-token`` (mode 0600)."""
    return _token(run_dir, "STREAMREC_SERVING_TOKEN", SERVING_TOKEN_FILE)


def console_token(run_dir: Path) -> str:
    """The console's bearer token: ``STREAMREC_CONSOLE_TOKEN`` if set, else one generated
    for this run directory and kept in ``RUN_DIR/console-token`` (mode 0600)."""
    return _token(run_dir, "STREAMREC_CONSOLE_TOKEN", CONSOLE_TOKEN_FILE)


def _token(run_dir: Path, variable: str, file_name: str) -> str:
    if token := os.environ.get(variable):
        return token
    path = run_dir / file_name
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def _write_state(run_dir: Path, state: dict) -> None:
    tmp = run_dir / "stack.json.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, run_dir / "stack.json")


def write_prometheus_config(run_dir: Path, services: dict[str, dict]) -> Path:
    """Write ``RUN_DIR/prometheus/``: file_sd ``targets.json`` and a ``prometheus.yml``.

    ``services`` is ``stack.json``'s: HTTP services are scraped on their HTTP port
    (``/metrics`` there), consumers on their metrics port. Each target carries a
    ``component`` label (not ``service``, which the runtime's series already carry).
    ``prometheus --config.file RUN_DIR/prometheus/prometheus.yml`` then scrapes the
    whole embedded stack from any working directory (the paths in it are absolute).
    """
    directory = run_dir.resolve() / "prometheus"
    directory.mkdir(parents=True, exist_ok=True)
    targets = [
        {"targets": [f"127.0.0.1:{metrics_port(name, info)}"], "labels": {"component": name}}
        for name, info in services.items()
    ]
    (directory / "targets.json").write_text(json.dumps(targets, indent=2))
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "scrape_configs": [
            {
                "job_name": "streamrec",
                "file_sd_configs": [{"files": [str(directory / "targets.json")]}],
            }
        ],
    }
    # JSON is YAML, so Prometheus reads this as it is.
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config, indent=2))
    return path


def metrics_port(name: str, info: dict) -> int:
    """The port where service ``name`` (``stack.json``'s ``info``) serves /metrics openly."""
    if name in METRICS_ON_HTTP_PORT and info["http_port"]:
        return int(info["http_port"])
    return int(info["metrics_port"])


def _ports(service: SupervisedService) -> dict:
    return {"http_port": service.http_port, "metrics_port": service.metrics_port}


def _read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "stack.json").read_text())
    except FileNotFoundError:
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie (exited, not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def up(args: argparse.Namespace) -> int:
    """Start the embedded stack (broker, Redis, every service) and supervise it."""
    logs.configure("stack")
    run_dir: Path = args.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_state(run_dir)
    if previous and _alive(previous["pid"]):
        print(
            f"a stack is already running (pid {previous['pid']}); `streamrec down` first",
            file=sys.stderr,
        )
        return 1

    stopping = False

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    servers: list[ManagedProcess] = []
    supervisor: Supervisor | None = None
    try:
        if args.kafka:
            bootstrap = args.kafka
        else:
            # The embedded stack is ephemeral, like its Redis: every run starts a fresh log.
            shutil.rmtree(run_dir / "kafka", ignore_errors=True)
            broker = start_broker(run_dir / "kafka")
            servers.extend(broker.processes)
            bootstrap = broker.bootstrap
        if args.redis:
            redis_url = args.redis
        else:
            redis_server = start_redis(run_dir / "redis")
            servers.append(redis_server.process)
            redis_url = redis_server.url
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "REDIS_URL": redis_url,
            "STREAMREC_TOPIC_PARTITIONS": str(args.partitions),
            "STREAMREC_SNAPSHOT_DIR": str(run_dir / "snapshots"),
        }
        if not args.kafka:
            # One embedded broker: a topic can have only one replica.
            env |= {
                "STREAMREC_TOPIC_REPLICATION_FACTOR": "1",
                "STREAMREC_TOPIC_MIN_INSYNC_REPLICAS": "1",
            }
        os.environ.update(env)
        create_topics(KafkaSettings(), TopicSettings())

        supervisor = Supervisor(run_dir, env)
        wanted = [s for s in args.services.split(",") if s]
        installed = set(available_services())
        gateway_port = args.gateway_port or free_port()
        serving_port = free_port()
        console_port = free_port()
        # The simulator's own series (regret) are served by the demo, for the console.
        simulator_port = free_port() if args.simulate else None
        for name in wanted:
            if name not in installed:
                continue
            if name == "gateway":
                gateway_env = {
                    "STREAMREC_GATEWAY_PORT": str(gateway_port),
                    "STREAMREC_GATEWAY_TOKEN": gateway_token(run_dir),
                }
                supervisor.add(name, gateway_env, gateway_port)
            elif name == "serving":
                serving_env = {
                    "STREAMREC_SERVING_PORT": str(serving_port),
                    "STREAMREC_SERVING_TOKEN": serving_token(run_dir),
                }
                supervisor.add(name, serving_env, serving_port)
            else:
                supervisor.add(name)

        if args.console and "console" in installed:
            targets = [
                f"{n}=http://127.0.0.1:{metrics_port(n, _ports(s))}/metrics"
                for n, s in supervisor.services.items()
            ]
            if simulator_port is not None:
                targets.append(f"simulator=http://127.0.0.1:{simulator_port}/metrics")
            console_env = {
                "STREAMREC_CONSOLE_PORT": str(console_port),
                "STREAMREC_CONSOLE_TOKEN": console_token(run_dir),
                "STREAMREC_CONSOLE_TARGETS": ",".join(targets),
            }
            supervisor.add("console", console_env, console_port)

        def write_state() -> dict:
            state = {
                "pid": os.getpid(),
                "kafka": bootstrap,
                "redis": redis_url,
                "servers": {p.name: p.pid for p in servers},
                "services": {
                    name: {
                        "pid": s.process.pid,
                        "metrics_port": s.metrics_port,
                        "http_port": s.http_port,
                        "log": str(s.process.log_path),
                        "restarts": s.restarts,
                    }
                    for name, s in supervisor.services.items()
                },
            }
            _write_state(run_dir, state)
            return state

        # Ports survive restarts (each service keeps its env), so the targets are written once.
        write_prometheus_config(run_dir, write_state()["services"])
        print(
            f"streamrec up: kafka {bootstrap}, redis {redis_url}, "
            f"services {', '.join(supervisor.services)}; logs in {run_dir / 'logs'}"
        )
        if "gateway" in supervisor.services:
            print(
                f"gateway: http://127.0.0.1:{gateway_port}/v1/clicks "
                f"(bearer token in {run_dir / TOKEN_FILE})"
            )
        if "serving" in supervisor.services:
            print(
                f"serving: http://127.0.0.1:{serving_port}/v1/rank "
                f"(bearer token in {run_dir / SERVING_TOKEN_FILE})"
            )

        if "console" in supervisor.services:
            print(
                f"console: http://127.0.0.1:{console_port}/#token={console_token(run_dir)} "
                f"(bearer token in {run_dir / CONSOLE_TOKEN_FILE})",
                flush=True,
            )

        demo = None
        if args.simulate:
            demo = Demo(
                supervisor,
                env,
                seed=args.seed,
                rate=args.rate,
                gateway_port=gateway_port if "gateway" in supervisor.services else None,
                gateway_token=gateway_token(run_dir),
                serving_token=serving_token(run_dir),
                run_dir=run_dir,
                metrics_port=simulator_port,
            )
            demo.start()
        deadline = time.monotonic() + args.duration if args.duration else None
        while not stopping and (deadline is None or time.monotonic() < deadline):
            events = supervisor.check()
            for event in events:
                log.warning(event)
            if events:
                write_state()
            if demo is not None:
                demo.show()
            time.sleep(1.0)
        if demo is not None:
            demo.stop()
            demo.summary()
        return 0
    finally:
        if supervisor is not None:
            supervisor.stop()
        for process in reversed(servers):
            process.stop()
        (run_dir / "stack.json").unlink(missing_ok=True)
        print("streamrec stopped: all processes ended")


def down(args: argparse.Namespace) -> int:
    """Stop a running stack (its supervisor stops every process it started)."""
    state = _read_state(args.run_dir)
    if state is None:
        print("no stack running here")
        return 0
    pid = state["pid"]
    if _alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
    leftovers = [
        p
        for p in (*state["servers"].values(), *(s["pid"] for s in state["services"].values()))
        if _alive(p)
    ]
    for leftover in leftovers:
        os.kill(leftover, signal.SIGKILL)
    (args.run_dir / "stack.json").unlink(missing_ok=True)
    print(f"stopped stack {pid}" + (f" (killed {len(leftovers)} leftovers)" if leftovers else ""))
    return 0


def status(args: argparse.Namespace) -> int:
    """Show what a running stack consists of and whether each part answers."""
    state = _read_state(args.run_dir)
    if state is None or not _alive(state["pid"]):
        print("no stack running here")
        return 1
    print(f"stack pid {state['pid']}  kafka {state['kafka']}  redis {state['redis']}")
    for name, info in state["services"].items():
        port = metrics_port(name, info)
        try:
            httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).raise_for_status()
            health = "up"
        except httpx.HTTPError:
            health = "not answering"
        print(
            f"  {name:<11} pid {info['pid']:<7} metrics :{port:<6} restarts "
            f"{info['restarts']:<3} {health}"
        )
    return 0
