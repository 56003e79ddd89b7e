"""`streamrec up/status/down` as a user runs them: real processes, no orphans left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.integration.processes import FAST_FAILOVER, ROOT, wait_for

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purposes; /proc says so.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        **kwargs,
    )


def _up(run_dir: Path) -> tuple[subprocess.Popen, dict]:
    env = os.environ | {
        **FAST_FAILOVER,
    }
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.cli",
            "up",
            "--run-dir",
            str(run_dir),
            "--services",
            "gateway,joiner,bandits",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = run_dir / "stack.json"
    wait_for(state_file.exists, 60, "stack.json")
    state = json.loads(state_file.read_text())
    port = state["services"]["gateway"]["http_port"]

    def gateway_healthy() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(gateway_healthy, 60, "the gateway")
    return up, state


def _pids(state: dict) -> list[int]:
    return [*state["servers"].values(), *(s["pid"] for s in state["services"].values())]


def test_status_restart_of_a_crashed_service_and_sigterm_stopping_everything(tmp_path):
    up, state = _up(tmp_path)
    status = _cli("status", "--run-dir", str(tmp_path))
    assert status.returncode == 0, status.stdout + status.stderr
    assert "gateway" in status.stdout and "joiner" in status.stdout
    joiner = state["services"]["joiner"]["pid"]
    os.kill(joiner, signal.SIGKILL)

    def restarted() -> dict | None:
        fresh = json.loads((tmp_path / "stack.json").read_text())
        info = fresh["services"]["joiner"]
        ok = info["restarts"] == 1 and info["pid"] != joiner and _alive(info["pid"])
        return fresh if ok else None

    wait_for(lambda: restarted() is not None, 30, "the supervisor to restart the joiner")
    state = restarted()
    up.send_signal(signal.SIGTERM)
    assert up.wait(60) == 0
    assert [pid for pid in _pids(state) if _alive(pid)] == []
    assert not (tmp_path / "stack.json").exists()


def test_down_stops_a_running_stack_whose_gateway_requires_its_generated_token(tmp_path):
    up, state = _up(tmp_path)
    token_file = tmp_path / "gateway-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    url = f"http://127.0.0.1:{state['services']['gateway']['http_port']}/v1/clicks"
    click = {"event_id": "e1", "user_id": "u1", "item_id": "i1", "ts": time.time()}
    assert httpx.post(url, json=click, timeout=10).status_code == 401
    auth = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    assert httpx.post(url, json=click, headers=auth, timeout=10).status_code == 202
    result = _cli("down", "--run-dir", str(tmp_path))
    assert result.returncode == 0 and "stopped stack" in result.stdout
    assert up.wait(60) == 0
    assert [pid for pid in _pids(state) if _alive(pid)] == []


def test_sigkill_of_up_leaves_no_orphans(tmp_path):
    up, state = _up(tmp_path)
    up.kill()
    up.wait()
    wait_for(lambda: not any(_alive(pid) for pid in _pids(state)), 30, "children to die")
