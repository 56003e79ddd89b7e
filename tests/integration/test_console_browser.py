"""The console in a real browser: `streamrec up --simulate`, opened in headless Chromium.

The test starts the whole embedded stack as a user does (the demo's settings),
opens the URL ``up`` prints in Debian's ``chromium`` driven by Selenium, waits
until the CTR chart has drawn points for every policy serving answered for,
checks that the feedback counts and the index version on the page match the
services' own /metrics (read before and after the page's scrape: counters only
grow, so the page's numbers must lie between), saves a screenshot, then stops
the stack and checks the demo's verdict and PNG.

The screenshot goes to ``.streamrec/artifacts/console.png``, or to
``STREAMREC_CONSOLE_SCREENSHOT`` if set (the README's picture is made with
``STREAMREC_CONSOLE_SCREENSHOT=docs/console.png``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.processes import FAST_FAILOVER, ROOT, wait_for

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
webdriver = pytest.importorskip("selenium.webdriver")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        CHROMIUM is None or CHROMEDRIVER is None,
        reason="Debian's chromium and chromium-driver are not installed; "
        "`apt-get install chromium chromium-driver` (.ci/run does)",
    ),
]

#: The demo's settings (Makefile), so that feedback and versions come within seconds.
DEMO_ENV = {
    "STREAMREC_JOINER_WINDOW_S": "5",
    "STREAMREC_JOINER_LATENESS_S": "2",
    "STREAMREC_EMBEDDINGS_PUBLISH_INTERVAL_S": "5",
    "STREAMREC_DRN_MAJOR_INTERVAL_S": "5",
    "STREAMREC_CONSOLE_INTERVAL_S": "1",
}


def _samples(port: int, name: str) -> dict[str, float]:
    """``name``'s samples on 127.0.0.1:port/metrics, by their policy label ('' if none);
    none while the service does not answer yet."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {
        sample.labels.get("policy", ""): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _scrape(driver) -> tuple[float, int]:
    """The (start time, number) of the console's scrape the page shows; (0, 0) before one.

    Read in one script: the page replaces its content every second, so an element
    found by one WebDriver call can be gone by the next.
    """
    found = driver.execute_script(
        "const e = document.getElementById('scraped-at');"
        "return e ? [Number(e.dataset.t), Number(e.dataset.rounds)] : null;"
    )
    return (found[0], int(found[1])) if found else (0.0, 0)


def _screenshot_path() -> Path:
    configured = os.environ.get("STREAMREC_CONSOLE_SCREENSHOT")
    return Path(configured) if configured else ROOT / ".streamrec" / "artifacts" / "console.png"


def test_the_console_draws_every_policy_and_matches_the_metrics(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = tmp_path / "up.log"
    with open(out, "w") as log:
        up = subprocess.Popen(
            [sys.executable, "-m", "services.cli", "up", "--run-dir", str(run_dir)]
            + ["--simulate", "--rate", "100", "--duration", "300"],
            cwd=ROOT,
            env=os.environ | FAST_FAILOVER | DEMO_ENV,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    driver = None
    try:
        wait_for(lambda: "console: http" in out.read_text(), 120, "the console URL")
        url = re.search(r"console: (http\S+)", out.read_text()).group(1)
        assert "#token=" in url
        state = json.loads((run_dir / "stack.json").read_text())["services"]
        joiner_port = state["joiner"]["metrics_port"]
        serving_port = state["serving"]["metrics_port"]
        console_port = state["console"]["http_port"]
        wait_for(lambda: _answers(console_port), 120, "the console")
        # The data need the token; the URL carries it in its fragment, which the page sends.
        assert httpx.get(f"http://127.0.0.1:{console_port}/api/state").status_code == 401

        def served() -> set[str]:
            requests = _samples(serving_port, "streamrec_serving_requests_total")
            return {p for p, n in requests.items() if n > 0}

        wait_for(lambda: len(served()) >= 2, 120, "serving to answer for the policies")
        policies = served()

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
            options.add_argument(argument)
        options.add_argument("--window-size=1100,2000")
        driver = webdriver.Chrome(
            service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options
        )
        driver.get(url)

        def drawn() -> dict[str, int]:
            return driver.execute_script(
                "const d = {};"
                "document.querySelectorAll('#ctr-chart polyline[data-policy]').forEach("
                "  l => { d[l.dataset.policy] = l.points.numberOfItems; });"
                "return d;"
            )

        wait_for(
            lambda: all(drawn().get(p, 0) >= 2 for p in policies),
            120,
            f"CTR lines of {sorted(policies)} with two points or more",
        )

        before = _samples(joiner_port, "streamrec_joiner_policy_feedback_total")
        index_before = _samples(serving_port, "streamrec_index_version")[""]
        asked = time.time()

        wait_for(lambda: _scrape(driver)[0] > asked, 30, "a console scrape after the metrics")
        page = driver.execute_script(
            "const d = {};"
            "document.querySelectorAll('[data-policy-feedback]').forEach("
            "  e => { d[e.dataset.policyFeedback] = Number(e.textContent); });"
            "return [d, document.getElementById('index-version').textContent];"
        )
        after = _samples(joiner_port, "streamrec_joiner_policy_feedback_total")
        index_after = _samples(serving_port, "streamrec_index_version")[""]
        feedback, index = page
        assert policies <= set(feedback)
        for policy in policies:
            assert before[policy] <= feedback[policy] <= after[policy], policy
        shown_index = 0.0 if index == "–" else float(index)
        assert index_before <= shown_index <= index_after

        if os.environ.get("STREAMREC_CONSOLE_SCREENSHOT"):
            # The README's picture: let the curves run for a minute first.
            wait_for(lambda: _scrape(driver)[1] >= 60, 180, "60 console rounds")
        screenshot = _screenshot_path()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1100, height + 120)
        assert driver.save_screenshot(str(screenshot))
        assert screenshot.read_bytes().startswith(b"\x89PNG")
    finally:
        if driver is not None:
            driver.quit()
        up.send_signal(signal.SIGINT)
        code = up.wait(120)
    text = out.read_text()
    assert code == 0, text[-3000:]
    assert "learning policies beat random (CTR with 95% Wilson intervals" in text
    png = Path(re.search(r"CTR over time: (\S+)", text).group(1))
    assert png == run_dir.resolve() / "ctr.png" and png.read_bytes().startswith(b"\x89PNG")
