"""Service processes for integration tests: real ``streamrec run`` subprocesses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

#: Consumer sessions of the integration tests: a SIGKILLed or frozen member is
#: replaced after 3 s instead of the default 10 s (the embedded broker allows
#: sessions this short, see services/stack/kafka.py).
FAST_FAILOVER = {"KAFKA_SESSION_TIMEOUT_MS": "3000", "KAFKA_HEARTBEAT_INTERVAL_MS": "1000"}
#: The same as KafkaSettings arguments.
FAST_FAILOVER_SETTINGS = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 1000}


class ServiceProcess:
    """``python -m services.cli run NAME`` with its own env and log file."""

    def __init__(self, name: str, env: dict[str, str], log: Path) -> None:
        self.name = name
        self.env = os.environ | FAST_FAILOVER | env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> ServiceProcess:
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", self.name],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self) -> None:
        """SIGKILL: no checkpoint, no goodbye."""
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.popen is not None
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                return self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
