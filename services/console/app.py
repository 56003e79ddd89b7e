"""``streamrec run console``: the live console's HTTP server.

``GET /`` is the page shell (no data in it); ``GET /api/view`` the rendered
charts and tables, ``GET /api/state`` the same data as JSON
(:meth:`~services.console.series.History.view`). Both need ``Authorization:
Bearer <STREAMREC_CONSOLE_TOKEN>`` unless ``STREAMREC_CONSOLE_ALLOW_ANONYMOUS``
is set (the check of :mod:`services.common.http`, as for the gateway and
serving); the page sends the token it finds in its URL's fragment, so
``http://host:port/#token=...`` opens it. ``/healthz`` and ``/metrics`` (the
console's own series) are open. The console only reads: it scrapes the
``/metrics`` of ``STREAMREC_CONSOLE_TARGETS`` every ``interval_s``, so it works
against any deployment whose metrics endpoints it can reach.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from services.common import logs
from services.common.http import BearerAuth, check_token, unauthorised
from services.console.page import page, render
from services.console.series import History, Round, parse_targets

log = logging.getLogger(__name__)


class ConsoleSettings(BaseSettings):
    """Console settings (``STREAMREC_CONSOLE_*``)."""

    model_config = SettingsConfigDict(
        env_prefix="STREAMREC_CONSOLE_", env_file=".env", extra="ignore"
    )

    host: str = "127.0.0.1"
    """``STREAMREC_CONSOLE_HOST``."""
    port: int = 8090
    """``STREAMREC_CONSOLE_PORT``."""
    token: SecretStr | None = None
    """``STREAMREC_CONSOLE_TOKEN``: data requests need ``Authorization: Bearer <token>``."""
    allow_anonymous: bool = False
    """``STREAMREC_CONSOLE_ALLOW_ANONYMOUS``: serve the data without a token."""
    targets: str = ""
    """``STREAMREC_CONSOLE_TARGETS``: the ``/metrics`` URLs to scrape, comma-separated,
    each optionally named (``joiner=http://10.0.0.5:9100/metrics,...``)."""
    interval_s: float = Field(2.0, gt=0)
    """``STREAMREC_CONSOLE_INTERVAL_S``: seconds between scrapes (and page refreshes)."""
    window_s: float = Field(30.0, gt=0)
    """``STREAMREC_CONSOLE_WINDOW_S``: the trailing window of each CTR point."""
    max_rounds: int = Field(900, ge=2)
    """``STREAMREC_CONSOLE_MAX_ROUNDS``: scrapes kept in memory (900 × 2 s = 30 min)."""


class Scraper:
    """Calls :meth:`History.scrape` every ``interval_s`` on a daemon thread until stopped."""

    def __init__(
        self,
        history: History,
        interval_s: float,
        on_round: Callable[[Round], None] | None = None,
    ) -> None:
        self.history = history
        self.interval_s = interval_s
        self.on_round = on_round
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="console-scraper", daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            round_ = self.history.scrape()
            if self.on_round is not None:
                self.on_round(round_)
            self.stopping.wait(self.interval_s)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(10)


def create_app(
    history: History, settings: ConsoleSettings, registry: CollectorRegistry | None = None
) -> Starlette:
    """The console's routes over ``history`` (filled by a :class:`Scraper` or a test)."""
    registry = registry or CollectorRegistry()
    auth = BearerAuth(settings.token)

    async def index(request: Request) -> Response:
        return HTMLResponse(page(settings.interval_s))

    async def view(request: Request) -> Response:
        if not auth.authorised(request):
            return unauthorised()
        return HTMLResponse(render(await run_in_threadpool(history.view)))

    async def state(request: Request) -> Response:
        if not auth.authorised(request):
            return unauthorised()
        return JSONResponse(await run_in_threadpool(history.view))

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok", "rounds": len(history.rounds)})

    async def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/", index),
            Route("/api/view", view),
            Route("/api/state", state),
            Route("/healthz", healthz),
            Route("/metrics", metrics),
        ]
    )


def main(settings: ConsoleSettings | None = None) -> int:
    """Scrape the targets and serve the console with uvicorn until SIGTERM."""
    import uvicorn

    logs.configure("console")
    # httpx logs every request at INFO: one line per target every interval_s.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    settings = settings or ConsoleSettings()
    try:
        check_token(
            settings.token, settings.allow_anonymous, app="console", prefix="STREAMREC_CONSOLE_"
        )
        targets = parse_targets(settings.targets)
    except ValueError as exc:
        log.error("console not started: %s", exc)
        return 2
    if not targets:
        log.error("console not started: STREAMREC_CONSOLE_TARGETS names no /metrics URL")
        return 2
    registry = CollectorRegistry()
    up = Gauge(
        "streamrec_console_target_up",
        "1 if the target's /metrics answered the last scrape, else 0.",
        ["target"],
        registry=registry,
    )

    def record(round_: Round) -> None:
        for name, ok in round_.up.items():
            up.labels(name).set(1 if ok else 0)

    history = History(targets, window_s=settings.window_s, max_rounds=settings.max_rounds)
    scraper = Scraper(history, settings.interval_s, record)
    scraper.start()
    if settings.token is None:
        log.warning("console serves its data without a token (STREAMREC_CONSOLE_ALLOW_ANONYMOUS)")
    try:
        uvicorn.run(
            create_app(history, settings, registry),
            host=settings.host,
            port=settings.port,
            log_config=None,
            access_log=False,
        )
    finally:
        scraper.stop()
    return 0
