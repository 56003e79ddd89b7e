"""Pre-forked workers (services/common/webserver.py) on a real socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# Each worker answers with its pid and its worker number.
APP = """
import os, sys
from contextlib import contextmanager
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from services.common.webserver import serve

@contextmanager
def app(worker):
    async def who(request):
        return JSONResponse({"pid": os.getpid(), "worker": worker})
    yield Starlette(routes=[Route("/", who)])
    print(f"worker {worker} closed", flush=True)

sys.exit(serve(app, host="127.0.0.1", port=int(sys.argv[1]), workers=int(sys.argv[2])))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(workers: int) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-c", APP, str(port), str(workers)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=1)
            return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise TimeoutError("the server did not start")


def test_two_workers_share_the_port_and_each_builds_its_own_app() -> None:
    process, url = start(workers=2)
    try:
        seen = set()
        deadline = time.monotonic() + 30
        while len(seen) < 2 and time.monotonic() < deadline:
            # A new connection each time: the kernel hands it to a waiting worker.
            answer = httpx.get(url, headers={"connection": "close"}, timeout=5).json()
            seen.add((answer["pid"], answer["worker"]))
        assert {worker for _, worker in seen} == {0, 1}
        assert len({pid for pid, _ in seen}) == 2
        assert process.pid not in {pid for pid, _ in seen}
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert sorted(line for line in out.splitlines() if "closed" in line) == [
        "worker 0 closed",
        "worker 1 closed",
    ]


def test_one_worker_serves_in_the_process_itself() -> None:
    process, url = start(workers=1)
    try:
        assert httpx.get(url, timeout=5).json() == {"pid": process.pid, "worker": 0}
    finally:
        os.kill(process.pid, signal.SIGTERM)
        out, _ = process.communicate(timeout=30)
    assert process.returncode == 0
    assert "worker 0 closed" in out
