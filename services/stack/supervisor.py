"""Supervise the service processes of a stack: start, restart with backoff, stop.

Every service runs as ``python -m services.cli run NAME`` with its own log file
and /metrics port. A process that exits is restarted after a backoff that doubles
up to ``max_backoff_s`` and resets once the process has stayed up for a minute.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from services.stack.servers import ManagedProcess, free_port

log = logging.getLogger(__name__)

STABLE_AFTER_S = 60.0


@dataclass
class SupervisedService:
    """One service process and its restart bookkeeping."""

    name: str
    process: ManagedProcess
    env: dict[str, str]
    metrics_port: int
    http_port: int | None = None
    restarts: int = 0
    backoff_s: float = 1.0
    started_at: float = 0.0
    restart_at: float | None = None
    exit_codes: list[int] = field(default_factory=list)


class Supervisor:
    """Starts services, restarts the ones that die, stops them all (no orphans)."""

    def __init__(
        self,
        run_dir: Path,
        base_env: Mapping[str, str],
        *,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.base_env = dict(base_env)
        self.max_backoff_s = max_backoff_s
        self.services: dict[str, SupervisedService] = {}

    def add(
        self, name: str, extra_env: Mapping[str, str] | None = None, http_port: int | None = None
    ) -> SupervisedService:
        metrics_port = free_port()
        env = (
            os.environ
            | self.base_env
            | {
                "STREAMREC_RUNTIME_METRICS_PORT": str(metrics_port),
                "PYTHONUNBUFFERED": "1",
            }
            | dict(extra_env or {})
        )
        process = ManagedProcess(
            name,
            [sys.executable, "-m", "services.cli", "run", name],
            self.run_dir / "logs" / f"{name}.log",
        )
        service = SupervisedService(name, process, env, metrics_port, http_port)
        self.services[name] = service
        self._start(service)
        return service

    def _start(self, service: SupervisedService) -> None:
        service.process.start(service.env)
        service.started_at = time.monotonic()
        service.restart_at = None
        log.info("started %s (pid %d)", service.name, service.process.pid)

    def check(self) -> list[str]:
        """Restart dead services whose backoff has passed; returns events for the log."""
        events = []
        now = time.monotonic()
        for service in self.services.values():
            if service.process.alive():
                if now - service.started_at > STABLE_AFTER_S:
                    service.backoff_s = 1.0
                continue
            if service.restart_at is None:
                assert service.process.popen is not None
                code = service.process.popen.returncode
                service.exit_codes.append(code)
                service.restart_at = now + service.backoff_s
                events.append(
                    f"{service.name} exited with {code}; restarting in {service.backoff_s:.0f} s"
                    f" (log: {service.process.log_path})"
                )
                service.backoff_s = min(service.backoff_s * 2, self.max_backoff_s)
            elif now >= service.restart_at:
                service.restarts += 1
                self._start(service)
                events.append(f"{service.name} restarted (#{service.restarts})")
        return events

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM every service (they checkpoint), then wait; SIGKILL stragglers."""
        for service in self.services.values():
            service.process.signal(15)
        deadline = time.monotonic() + timeout
        for service in self.services.values():
            service.process.stop(max(0.1, deadline - time.monotonic()))
