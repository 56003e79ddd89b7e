"""Running an ASGI app under uvicorn in one process or several pre-forked ones.

One Python process answers HTTP on one core at most (the GIL). :func:`serve`
binds the listening socket once, then forks ``workers`` processes that each
build their own app (so no thread, connection or lock crosses a fork) and accept
from the shared socket; the kernel hands each new connection to a worker that is
waiting in ``accept``. SIGTERM/SIGINT to the parent is passed on to every worker,
each finishes its open requests and closes its app, and the parent returns the
worst exit status.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import FrameType

import uvicorn
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

#: Builds the app in the process that serves it, given the worker's number (0 to
#: workers - 1); leaving the context closes what it opened.
AppFactory = Callable[[int], AbstractContextManager[ASGIApp]]


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket that forked workers can share."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto named explicitly: asyncio turns Nagle off (TCP_NODELAY) only on sockets whose
    # proto is IPPROTO_TCP, and accepted sockets inherit it; with proto 0 every small
    # response waits ~40 ms for a delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.set_inheritable(True)
    return sock


def serve(make_app: AppFactory, *, host: str, port: int, workers: int = 1) -> int:
    """Serve the app ``make_app`` builds on ``host:port`` until SIGTERM; returns an exit status."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    sock = listen(host, port)
    if workers == 1:
        return _serve_one(make_app, 0, sock)
    children = []
    for worker in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve, then leave without running the parent's cleanup
            code = 1
            try:
                code = _serve_one(make_app, worker, sock)
            finally:
                os._exit(code)
        children.append(pid)
    sock.close()
    log.info("serving on %s:%d with %d workers (pids %s)", host, port, workers, children)

    def forward(signum: int, _frame: FrameType | None) -> None:
        for pid in children:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    worst = 0
    for pid in children:
        _, status = os.waitpid(pid, 0)
        worst = max(worst, os.waitstatus_to_exitcode(status) & 0xFF)
    return worst


def _serve_one(make_app: AppFactory, worker: int, sock: socket.socket) -> int:
    # uvicorn handles SIGTERM/SIGINT itself, then restores the handlers it found and
    # raises the signal again; with the default handlers that would kill the process
    # before the app's context closes (and, in serving, delivers the impressions still
    # buffered). These do nothing, so the context is always left normally.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _ignore)
    with make_app(worker) as app:
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        uvicorn.Server(config).run(sockets=[sock])
    return 0


def _ignore(_signum: int, _frame: FrameType | None) -> None:
    """A handler that lets the process go on (see :func:`_serve_one`)."""
