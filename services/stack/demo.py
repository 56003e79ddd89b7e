"""The live view of ``streamrec up --simulate`` (what ``make demo`` shows).

The simulator runs in a thread of the ``up`` process. When the stack runs the
serving service, the loop is closed: the simulator asks serving for every slate
(serving logs the impression to Kafka) and posts only the clicks to the
gateway; without serving it ranks in-process (:class:`LocalPolicies`) and posts
impressions and clicks. Every few seconds a progress line shows request and
event rates (scraped from the services' /metrics), total consumer lag, the
index version serving follows, each policy's recent CTR and the model version
it is serving (the console, :mod:`services.console`, shows the same live as
charts). The summary compares each policy's CTR early and late in the run and
gives the verdict of :mod:`services.evaluation.verdict` on the last fifth (a
policy beats random only when its 95% Wilson interval lies above random's), and
writes ``RUN_DIR/ctr.png``: CTR per policy over time with its bands, above
the model and index versions served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from wsgiref.simple_server import WSGIServer

import httpx
import numpy as np
from prometheus_client import CollectorRegistry, Metric
from prometheus_client.core import CounterMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from services.common import clients
from services.common.clients import REDIS_ERRORS
from services.common.metrics import serve_metrics
from services.common.settings import RedisSettings
from services.evaluation.plots import plot_rates
from services.evaluation.verdict import BASELINE
from services.evaluation.verdict import report as verdict_report
from services.index import SnapshotError, read_pointer
from services.paramstore import ParamStore
from services.simulator.command import make_simulation
from services.simulator.driver import GatewaySink, ServingSource, Simulation
from services.stack.supervisor import Supervisor

SHOW_EVERY_S = 5.0
RANDOM_POLICY = BASELINE
#: The PNG's CTR windows: the run cut in this many, each at least MIN_WINDOW_S long.
PLOT_WINDOWS = 30
MIN_WINDOW_S = 5.0


def scrape(port: int) -> dict[str, float]:
    """Totals of the runtime's series from one /metrics endpoint (empty if it is down)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return {}
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "streamrec_consumer_events_total":
                key = f"events_{sample.labels['outcome']}"
            elif sample.name == "streamrec_consumer_lag_records":
                key = "lag"
            else:
                continue
            totals[key] = totals.get(key, 0.0) + sample.value
    return totals


class SimulatorCollector(Collector):
    """What only the simulator knows, as Prometheus series: each policy's requests and
    cumulative expected regret (against :attr:`Simulation.regret_basis`)."""

    def __init__(self, simulation: Simulation) -> None:
        self.simulation = simulation

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "streamrec_simulator_requests",
            "Requests the simulator made, by policy.",
            labels=["policy"],
        )
        regret = CounterMetricFamily(
            "streamrec_simulator_regret",
            "Cumulative expected regret (clicks) of the slates served, by policy.",
            labels=["policy"],
        )
        for policy, stats in list(self.simulation.stats.items()):
            requests.add_metric([policy], stats.requests)
            regret.add_metric([policy], max(0.0, stats.regret))
        yield requests
        yield regret


class Demo:
    """Runs the simulator against a supervised stack and reports progress."""

    def __init__(
        self,
        supervisor: Supervisor,
        env: Mapping[str, str],
        *,
        seed: int,
        rate: float,
        gateway_port: int | None,
        gateway_token: str | None = None,
        serving_token: str | None = None,
        run_dir: Path | None = None,
        metrics_port: int | None = None,
    ) -> None:
        if gateway_port is None:
            raise ValueError("the demo drives the stack through the gateway; start it too")
        self.supervisor = supervisor
        self.run_dir = run_dir
        #: (elapsed s, index version, {policy: model version}) at every progress line.
        self.versions: list[tuple[float, int, dict[str, int]]] = []
        # httpx logs every request at INFO: hundreds of lines a second at demo rates.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        redis_settings = RedisSettings(url=env["REDIS_URL"])
        self.redis = clients.redis_client(redis_settings)
        self.index_key = redis_settings.keys().index_current("items")
        self.store = ParamStore.from_settings(redis_settings)
        self.sink = GatewaySink(f"http://127.0.0.1:{gateway_port}", gateway_token)
        serving = supervisor.services.get("serving")
        serving_url = f"http://127.0.0.1:{serving.http_port}" if serving is not None else None
        self.simulation, self.policies = make_simulation(
            sink=self.sink,
            seed=seed,
            rate=rate,
            store=self.store,
            serving_url=serving_url,
            serving_token=serving_token,
            redis_settings=redis_settings,
        )
        mode = "serving (closed loop)" if serving_url else "in-process policies (no serving)"
        print(f"simulator: slates from {mode}", flush=True)
        self.thread = threading.Thread(target=self._run, name="simulator", daemon=True)
        self.metrics_server: WSGIServer | None = None
        if metrics_port is not None:
            registry = CollectorRegistry()
            registry.register(SimulatorCollector(self.simulation))
            self.metrics_server, _ = serve_metrics(registry, metrics_port)
        self._last_show = 0.0
        self._last_applied = 0.0
        self._last_requests = 0

    def _run(self) -> None:
        try:
            self._wait_for("gateway", self._gateway_ready)
            if isinstance(self.policies, ServingSource):
                self._wait_for("serving", self.policies.ready)
        except RuntimeError as exc:
            self.simulation.errors.append(str(exc))
            raise
        self.simulation.run()

    def _gateway_ready(self) -> bool:
        try:
            return self.sink.client.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False

    @staticmethod
    def _wait_for(name: str, ready: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not become healthy within {timeout:.0f} s")

    def index_version(self) -> int | None:
        """The index version the Redis pointer names (None before the first publish)."""
        try:
            pointer = read_pointer(self.redis, self.index_key)
        except (*REDIS_ERRORS, SnapshotError):
            return None
        return None if pointer is None else pointer.version

    def start(self) -> None:
        self.thread.start()

    def show(self) -> None:
        now = time.monotonic()
        if now - self._last_show < SHOW_EVERY_S or not self.simulation.started:
            return
        interval = now - self._last_show if self._last_show else SHOW_EVERY_S
        self._last_show = now
        totals: dict[str, float] = {}
        for service in self.supervisor.services.values():
            for key, value in scrape(service.metrics_port).items():
                totals[key] = totals.get(key, 0.0) + value
        applied = totals.get("events_applied", 0.0)
        requests = sum(s.requests for s in self.simulation.stats.values())
        elapsed = now - self.simulation.started
        index = self.index_version() or 0
        line = (
            f"[{elapsed:5.0f}s] requests/s {(requests - self._last_requests) / interval:6.0f}"
            f"  consumed/s {(applied - self._last_applied) / interval:7.0f}"
            f"  lag {totals.get('lag', 0):6.0f}  index v{index}  |"
        )
        self._last_applied, self._last_requests = applied, requests
        models = {}
        for policy, stats in sorted(self.simulation.stats.items()):
            recent = stats.ctr_between(max(0.0, elapsed - 15), elapsed)
            if policy != RANDOM_POLICY:
                models[policy] = self.policies.version(policy)
            version = f" v{models[policy]}" if policy in models else ""
            line += f" {policy} {recent:.3f}{version}"
        self.versions.append((elapsed, index, models))
        print(line, flush=True)

    def stop(self) -> None:
        self.simulation.stop()
        self.thread.join(30)
        self.policies.close()
        self.sink.close()
        self.store.close()
        self.redis.close()
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()

    def summary(self) -> dict[str, dict[str, float]]:
        result = dict(self.simulation.summary())
        print("\npolicy      requests   CTR    CTR first 1/5  CTR last 1/5  regret/request")
        for policy, row in result.items():
            print(
                f"{policy:<10} {row['requests']:>9.0f}  {row['ctr']:.3f}   "
                f"{row['ctr_first_fifth']:.3f}          {row['ctr_last_fifth']:.3f}"
                f"         {row['regret_per_request']:.3f}"
            )
        end = self._end()
        counts = {
            policy: stats.counts_between(end * 4 / 5, end)
            for policy, stats in sorted(self.simulation.stats.items())
        }
        if RANDOM_POLICY in counts:
            print("\nIn the last fifth of the run:")
            print("\n".join(verdict_report(counts)))
        if self.simulation.regret_basis == "catalog":
            print(
                "regret/request is against the best slate of the whole live catalog "
                "(serving chooses its own candidates)"
            )
        print(f"index version at the end: v{self.index_version() or 0}")
        if self.simulation.errors:
            print("simulator errors:", "; ".join(self.simulation.errors))
        if self.run_dir is not None and end > 0:
            print(f"CTR over time: {self.plot(self.run_dir / 'ctr.png')}")
        return result

    def _end(self) -> float:
        stats = self.simulation.stats.values()
        return max((s.timeline[-1][0] for s in stats if s.timeline), default=0.0)

    def plot(self, path: Path) -> Path:
        """Write the run's CTR per policy over time (95% Wilson bands) and versions to ``path``."""
        end = self._end()
        width = max(MIN_WINDOW_S, end / PLOT_WINDOWS)
        starts = np.arange(0.0, max(end - width / 2, width / 2), width)
        rates = {}
        for policy, stats in sorted(self.simulation.stats.items()):
            counts = np.array([stats.counts_between(a, min(a + width, end)) for a in starts])
            rates[policy] = (np.minimum(starts + width, end), counts[:, 0], counts[:, 1])
        steps: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if self.versions:
            times = np.array([t for t, _, _ in self.versions])
            steps["index"] = (times, np.array([index for _, index, _ in self.versions]))
            for policy in sorted({p for _, _, models in self.versions for p in models}):
                versions = [models.get(policy, 0) for _, _, models in self.versions]
                steps[f"{policy} model"] = (times, np.array(versions))
        return plot_rates(
            rates,
            path,
            ylabel=f"CTR per {width:.0f} s window",
            xlabel="seconds since the simulator started",
            title="streamrec demo: CTR per policy",
            steps=steps,
            steps_label="version served",
        )
