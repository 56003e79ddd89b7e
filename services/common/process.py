"""Running one service as a process: logs, /metrics, and a graceful SIGTERM."""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from types import FrameType

from prometheus_client import CollectorRegistry

from services.common import logs
from services.common.metrics import serve_metrics
from services.common.runtime import ConsumerRuntime
from services.common.settings import RuntimeSettings

log = logging.getLogger(__name__)


def run_consumer_service(
    service: str, build: Callable[[CollectorRegistry], ConsumerRuntime]
) -> int:
    """Configure logs, serve metrics, run the runtime until SIGTERM/SIGINT."""
    logs.configure(service)
    settings = RuntimeSettings()
    registry = CollectorRegistry()
    server, _ = serve_metrics(registry, settings.metrics_port, settings.metrics_host)
    runtime = build(registry)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %s: finishing the batch, checkpointing, stopping", signum)
        runtime.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runtime.run()
    finally:
        server.shutdown()
        server.server_close()
    return 0
