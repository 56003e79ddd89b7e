"""The embedded Apache Kafka: KRaft nodes (combined broker + controller) on loopback.

``streamrec up``, the test suite and the benchmarks run a real Apache Kafka
broker, not an emulation. Its jars are resolved from Maven Central once, by
``make kafka`` (``deploy/kafka/pom.xml`` pins the release), into
``~/.cache/streamrec/kafka-<version>/libs``; nothing is downloaded at run time.
Starting a node formats its KRaft log directory (once: a directory that holds a
log keeps it, so a restarted node finds its data), writes ``server.properties``
and a log4j2 configuration next to it, and runs ``kafka.Kafka`` with a small
heap. The JVM is a child started with ``PR_SET_PDEATHSIG`` (see
:class:`~services.stack.servers.ManagedProcess`), so it dies with whatever
started it, even a SIGKILLed ``streamrec up``.

Every broker setting that differs from Apache Kafka's defaults is in
:func:`broker_settings`, with the reason.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from kafka import KafkaAdminClient

from services.stack.servers import (
    ManagedProcess,
    ServerError,
    free_port,
    wait_healthy,
    wait_port,
)

#: The pinned Apache Kafka release; equal to ``kafka.version`` in deploy/kafka/pom.xml.
KAFKA_VERSION = "4.4.0"
#: Kafka 4 brokers need Java 17 or newer.
MIN_JAVA = 17
#: Heap of each embedded node (``STREAMREC_KAFKA_HEAP``): ample for a 5k events/s soak.
DEFAULT_HEAP = "512m"

_LOG4J2 = """\
status = warn
appender.out.type = Console
appender.out.name = STDOUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = STDOUT
logger.state.name = state.change.logger
logger.state.level = WARN
logger.request.name = kafka.request.logger
logger.request.level = WARN
"""


def kafka_home() -> Path:
    """Where ``make kafka`` puts the broker's jars: ``STREAMREC_KAFKA_HOME``, else
    ``$XDG_CACHE_HOME/streamrec/kafka-<version>`` (``~/.cache`` by default)."""
    if env := os.environ.get("STREAMREC_KAFKA_HOME"):
        return Path(env)
    cache_root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_root / "streamrec" / f"kafka-{KAFKA_VERSION}"


_NO_KAFKA_HINT = "or pass --kafka HOST:PORT (STREAMREC_KAFKA in the tests) to use a running Kafka"


def kafka_classpath(home: Path | None = None) -> str:
    """The class path of the resolved jars; a clear error if ``make kafka`` has not run."""
    home = home or kafka_home()
    libs = home / "libs"
    jars = sorted(libs.glob("*.jar"))
    if not (home / ".complete").exists() or not jars:
        raise ServerError(
            f"Apache Kafka {KAFKA_VERSION} is not installed in {home}: run `make kafka` in a "
            f"streamrec checkout (it needs Maven: apt install maven), {_NO_KAFKA_HINT}"
        )
    return os.pathsep.join(str(jar) for jar in jars)


def java_major(version_output: str) -> int:
    """The major version in ``java -version`` output (``"1.8.0_402"`` → 8, ``"17.0.15"`` → 17).

    >>> java_major('openjdk version "17.0.15" 2025-04-15')
    17
    >>> java_major('java version "1.8.0_402"')
    8
    """
    found = re.search(r'version "(\d+)(?:\.(\d+))?', version_output)
    if found is None:
        raise ServerError(f"cannot read a Java version from: {version_output.strip()[:200]!r}")
    major = int(found.group(1))
    return int(found.group(2) or 0) if major == 1 else major


@cache
def find_java() -> Path:
    """``$JAVA_HOME/bin/java`` or ``java`` on the PATH, checked to be Java 17 or newer."""
    home = os.environ.get("JAVA_HOME")
    candidate = Path(home) / "bin" / "java" if home else None
    if candidate is None or not candidate.is_file():
        found = shutil.which("java")
        candidate = Path(found) if found else None
    if candidate is None:
        raise ServerError(
            f"no Java found: the embedded Apache Kafka needs Java {MIN_JAVA}+ "
            f"(apt install openjdk-17-jre-headless, or set JAVA_HOME), {_NO_KAFKA_HINT}"
        )
    result = subprocess.run(
        [str(candidate), "-version"], capture_output=True, text=True, timeout=30, check=False
    )
    major = java_major(result.stderr + result.stdout)
    if major < MIN_JAVA:
        raise ServerError(
            f"{candidate} is Java {major}; the embedded Apache Kafka needs Java {MIN_JAVA}+ "
            f"(apt install openjdk-17-jre-headless, or set JAVA_HOME), {_NO_KAFKA_HINT}"
        )
    return candidate


def new_cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, base64url without padding (22 characters)."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not text.startswith("-"):  # Kafka's own generator avoids ids that look like flags
            return text


def broker_settings(nodes: int) -> dict[str, str]:
    """The embedded broker's settings that differ from Apache Kafka's defaults, and why.

    Everything else (retention, segment sizes, fetch sizes) is Kafka's default,
    so what the suite measures is what a stock broker does.
    """
    replicas = str(min(nodes, 3))
    return {
        # The first member of a new group starts at once instead of after 3 s
        # (every test and service start creates groups).
        "group.initial.rebalance.delay.ms": "0",
        # Fault tests run consumers with 3 s sessions so a SIGKILLed one is replaced
        # quickly; Kafka refuses sessions under 6 s by default.
        "group.min.session.timeout.ms": "1000",
        # __consumer_offsets is created on the first group join; 50 partitions (the
        # default) cost seconds on a 2-core machine and buy nothing here.
        "offsets.topic.num.partitions": "8",
        # Internal topics replicate as far as the cluster allows (1 on one node, 3 on
        # three), so a single node works and a cluster survives the loss of a node.
        "offsets.topic.replication.factor": replicas,
        "transaction.state.log.replication.factor": replicas,
        "transaction.state.log.min.isr": str(min(nodes, 2)),
        "share.coordinator.state.topic.replication.factor": replicas,
        "share.coordinator.state.topic.min.isr": str(min(nodes, 2)),
        # Fewer threads than the defaults (3 network, 8 I/O) suit a 2-core machine.
        "num.network.threads": "2",
        "num.io.threads": "4",
    }


@dataclass
class KafkaNode:
    """One combined broker + controller: its ports, directory and JVM."""

    node_id: int
    port: int
    controller_port: int
    directory: Path
    process: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data"

    def alive(self) -> bool:
        return self.process is not None and self.process.alive()

    def properties(self, voters: str, settings: Mapping[str, str]) -> str:
        own = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{self.address},CONTROLLER://127.0.0.1:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.address}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
        }
        return "".join(f"{key}={value}\n" for key, value in (own | dict(settings)).items())


@dataclass
class EmbeddedKafka:
    """Apache Kafka in KRaft mode on loopback: one node, or a small cluster.

    Every node is a voter of the controller quorum and a broker. Nodes can be
    stopped, killed and started again individually (their logs stay on disk),
    which is what the fault tests do.
    """

    directory: Path
    nodes: list[KafkaNode]
    heap: str = DEFAULT_HEAP
    cluster_id: str = field(default_factory=new_cluster_id)
    classpath: str = field(default_factory=kafka_classpath)

    @classmethod
    def create(
        cls, directory: Path, nodes: int = 1, *, port: int | None = None, heap: str | None = None
    ) -> EmbeddedKafka:
        """Nodes with free loopback ports (``port`` fixes the first broker's) in ``directory``."""
        directory = Path(directory)
        members = [
            KafkaNode(
                node_id=i + 1,
                port=(port if i == 0 and port else free_port()),
                controller_port=free_port(),
                directory=directory / f"node-{i + 1}",
            )
            for i in range(nodes)
        ]
        return cls(directory, members, heap or os.environ.get("STREAMREC_KAFKA_HEAP", DEFAULT_HEAP))

    # -- addresses ----------------------------------------------------------------

    @property
    def bootstrap(self) -> str:
        """Every node's address, comma-separated (what clients are given)."""
        return ",".join(node.address for node in self.nodes)

    @property
    def port(self) -> int:
        return self.nodes[0].port

    @property
    def processes(self) -> list[ManagedProcess]:
        return [node.process for node in self.nodes if node.process is not None]

    @property
    def _voters(self) -> str:
        return ",".join(f"{n.node_id}@127.0.0.1:{n.controller_port}" for n in self.nodes)

    # -- lifecycle ----------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> EmbeddedKafka:
        """Start every node that is not running and wait until all brokers answer."""
        for node in self.nodes:
            if not node.alive():
                self._launch(node)
        self.wait_ready(timeout)
        return self

    def start_node(self, index: int, timeout: float = 90.0) -> None:
        """Start one node again (on its ports, with its log) and wait for the cluster."""
        self._launch(self.nodes[index])
        self.wait_ready(timeout)

    def stop_node(self, index: int, timeout: float = 30.0) -> None:
        """Stop one node gracefully (SIGTERM: a controlled shutdown)."""
        process = self.nodes[index].process
        if process is not None:
            process.stop(timeout)

    def kill_node(self, index: int) -> None:
        """SIGKILL one node: no controlled shutdown, its log recovers on the next start."""
        process = self.nodes[index].process
        if process is not None and process.popen is not None and process.alive():
            process.signal(signal.SIGKILL)
            process.popen.wait(30)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every node: SIGTERM to all at once (a cluster that stops node by node
        loses its quorum half way), then wait, then SIGKILL what is left."""
        for process in self.processes:
            process.signal(signal.SIGTERM)
        for process in self.processes:
            process.stop(timeout)

    def _launch(self, node: KafkaNode) -> None:
        node.directory.mkdir(parents=True, exist_ok=True)
        config = node.directory / "server.properties"
        config.write_text(node.properties(self._voters, broker_settings(len(self.nodes))))
        log4j = node.directory / "log4j2.properties"
        log4j.write_text(_LOG4J2)
        java = [
            str(find_java()),
            f"-Dlog4j2.configurationFile={log4j}",
            "-Djava.awt.headless=true",
            "-cp",
            self.classpath,
        ]
        if not (node.data_dir / "meta.properties").exists():
            self._format(java, node, config)
        node.process = ManagedProcess(
            f"kafka-{node.node_id}",
            [
                *java[:1],
                f"-Xms{self.heap}",
                f"-Xmx{self.heap}",
                "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20",
                "-XX:+ExitOnOutOfMemoryError",
                *java[1:],
                "kafka.Kafka",
                str(config),
            ],
            node.directory / "kafka.log",
        ).start()

    def _format(self, java: list[str], node: KafkaNode, config: Path) -> None:
        """Format the node's KRaft log directory (the storage tool, in a short-lived JVM)."""
        result = subprocess.run(
            [
                *java[:1],
                "-Xmx256m",
                "-XX:TieredStopAtLevel=1",  # a short run: start fast, do not optimise
                *java[1:],
                "kafka.tools.StorageTool",
                "format",
                "--cluster-id",
                self.cluster_id,
                "--config",
                str(config),
                "--ignore-formatted",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(
                f"formatting {node.data_dir} failed ({result.returncode}): "
                f"{(result.stderr or result.stdout).strip()[-2000:]}"
            )

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Until every running node is a registered broker that answers metadata."""
        running = [node for node in self.nodes if node.alive()]
        if not running:
            raise ServerError("no Kafka node is running")

        def ready() -> None:
            for node in running:
                _answers_metadata(node.address, expect_brokers=len(running))

        names = ", ".join(f"kafka node {n.node_id}" for n in running)
        wait_healthy(ready, names, timeout, [n.process for n in running if n.process])


def _answers_metadata(address: str, expect_brokers: int) -> None:
    wait_port(address)
    admin = KafkaAdminClient(bootstrap_servers=address, request_timeout_ms=3000)
    try:
        brokers = admin.describe_cluster()["brokers"]
        if len(brokers) < expect_brokers:
            raise ServerError(f"{len(brokers)} of {expect_brokers} brokers registered")
    finally:
        admin.close()


def start_broker(directory: Path, port: int | None = None, timeout: float = 90.0) -> EmbeddedKafka:
    """A single-node Apache Kafka (broker + controller) in ``directory``, running and answering."""
    return EmbeddedKafka.create(directory, 1, port=port).start(timeout)


def start_cluster(directory: Path, nodes: int = 3, timeout: float = 120.0) -> EmbeddedKafka:
    """An ``nodes``-node Apache Kafka cluster in ``directory``, every broker registered."""
    return EmbeddedKafka.create(directory, nodes).start(timeout)
