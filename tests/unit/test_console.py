"""The console's pure parts: scraping text into a history, windows and bands, the page, auth."""

from __future__ import annotations

import re

import httpx
import pytest
from pydantic import SecretStr
from starlette.testclient import TestClient

from services.common.intervals import wilson
from services.console.app import ConsoleSettings, create_app
from services.console.page import render
from services.console.series import History, Target, parse_targets


def exposition(feedback: dict[str, float], rewards: dict[str, float], **extra: str) -> str:
    lines = ["# TYPE streamrec_joiner_policy_feedback_total counter"]
    lines += [
        f'streamrec_joiner_policy_feedback_total{{policy="{p}"}} {v}' for p, v in feedback.items()
    ]
    lines += ["# TYPE streamrec_joiner_policy_rewards_total counter"]
    lines += [
        f'streamrec_joiner_policy_rewards_total{{policy="{p}"}} {v}' for p, v in rewards.items()
    ]
    lines += list(extra.values())
    return "\n".join(lines) + "\n"


class Scripted:
    """Serves the next text of a script for each URL; an exception is raised instead."""

    def __init__(self, script: dict[str, list[str | Exception]]) -> None:
        self.script = script

    def __call__(self, url: str) -> str:
        value = self.script[url].pop(0)
        if isinstance(value, Exception):
            raise value
        return value


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_targets_parse_named_and_bare_urls_and_refuse_others() -> None:
    assert parse_targets("joiner=http://a:1/metrics, http://b:2/metrics,") == [
        Target("joiner", "http://a:1/metrics"),
        Target("b:2", "http://b:2/metrics"),
    ]
    with pytest.raises(ValueError, match="http:// or https://"):
        parse_targets("joiner=a:1/metrics")


def test_windowed_ctr_has_wilson_bands_and_survives_a_counter_reset() -> None:
    clock = Clock()
    texts: list[str | Exception] = [
        exposition({"random": 0, "linucb": 0}, {"random": 0, "linucb": 0}),
        exposition({"random": 100, "linucb": 100}, {"random": 5, "linucb": 9}),
        # The joiner restarted: its counters start again from zero.
        exposition({"random": 50, "linucb": 40}, {"random": 2, "linucb": 8}),
    ]
    history = History(
        [Target("joiner", "http://j/metrics")],
        window_s=30,
        fetch=Scripted({"http://j/metrics": texts}),
        clock=clock,
    )
    for _ in range(3):
        history.scrape()
        clock.t += 10
    view = history.view()
    linucb = view["policies"]["linucb"]
    assert (linucb["feedback"], linucb["rewards"]) == (140, 17), "100 before + 40 after the reset"
    t, rate, low, high, n = linucb["points"][-1]
    assert (t, n) == (1020.0, 140) and rate == pytest.approx(17 / 140)
    assert (low, high) == pytest.approx(wilson(17, 140))
    assert [p[0] for p in linucb["points"]] == [1010.0, 1020.0]


def test_the_window_drops_old_rounds() -> None:
    clock = Clock()
    texts: list[str | Exception] = [
        exposition({"random": n}, {"random": n / 10}) for n in (0, 100, 200, 300)
    ]
    history = History(
        [Target("joiner", "http://j/metrics")],
        window_s=15,
        fetch=Scripted({"http://j/metrics": texts}),
        clock=clock,
    )
    for _ in range(4):
        history.scrape()
        clock.t += 10
    # The last point covers the rounds at t=1020 and 1030 only (15 s window).
    assert history.view()["policies"]["random"]["points"][-1][4] == 100


def test_a_target_that_stops_answering_is_marked_down_and_keeps_its_totals() -> None:
    clock = Clock()
    history = History(
        [Target("joiner", "http://j/metrics")],
        fetch=Scripted(
            {"http://j/metrics": [exposition({"ts": 10}, {"ts": 1}), httpx.ConnectError("no")]}
        ),
        clock=clock,
    )
    history.scrape()
    clock.t += 2
    history.scrape()
    view = history.view()
    assert view["targets"] == {"joiner": False}
    assert view["policies"]["ts"]["feedback"] == 10


def test_gauges_lag_dead_letters_dbgd_and_guard_are_read() -> None:
    extra = {
        "rest": """
# TYPE streamrec_consumer_lag_records gauge
streamrec_consumer_lag_records{service="bandits",topic="feedback",partition="3"} 42
# TYPE streamrec_consumer_dead_letters_total counter
streamrec_consumer_dead_letters_total{service="joiner",reason="schema"} 2
# TYPE streamrec_index_version gauge
streamrec_index_version 7
# TYPE streamrec_drn_minor_updates_total counter
streamrec_drn_minor_updates_total{winner="explore"} 30
streamrec_drn_minor_updates_total{winner="exploit"} 10
streamrec_drn_minor_updates_total{winner="tie"} 5
# TYPE streamrec_guard_tripped gauge
streamrec_guard_tripped{policy="linucb"} 1"""
    }
    history = History(
        [Target("all", "http://a/metrics")],
        fetch=Scripted({"http://a/metrics": [exposition({}, {}, **extra)]}),
        clock=Clock(),
    )
    history.scrape()
    view = history.view()
    assert view["lag"] == [
        {"service": "bandits", "topic": "feedback", "partition": "3", "records": 42.0}
    ]
    assert view["dead_letters"] == [{"service": "joiner", "reason": "schema", "records": 2.0}]
    assert view["index"]["version"] == 7
    assert view["dbgd"]["win_rate"] == 0.75 and view["dbgd"]["ties"] == 5
    assert (view["dbgd"]["ci_low"], view["dbgd"]["ci_high"]) == pytest.approx(wilson(30, 40))
    assert view["guard"]["policies"]["linucb"]["tripped"] is True


def _history() -> History:
    clock = Clock()
    texts: list[str | Exception] = [
        exposition({"random": 0, "ts": 0}, {"random": 0, "ts": 0}),
        exposition({"random": 100, "ts": 120}, {"random": 6, "ts": 11}),
        exposition({"random": 210, "ts": 230}, {"random": 12, "ts": 25}),
    ]
    history = History(
        [Target("joiner", "http://j/metrics")],
        fetch=Scripted({"http://j/metrics": texts}),
        clock=clock,
    )
    for _ in range(3):
        history.scrape()
        clock.t += 2
    return history


def test_the_page_draws_a_line_and_a_band_per_policy_and_prints_the_totals() -> None:
    html = render(_history().view())
    for policy, points in (("random", 2), ("ts", 2)):
        line = re.search(rf'<polyline class="series" data-policy="{policy}" [^>]*>', html)
        assert line is not None and f'data-points="{points}"' in line.group(0)
        assert len(re.search(r' points="([^"]*)"', line.group(0)).group(1).split()) == points
        assert f'<polygon class="band" data-policy="{policy}"' in html
    assert '<span data-policy-feedback="ts">230</span>' in html
    assert '<span data-policy-rewards="random">12</span>' in html


def test_data_need_the_token_and_the_shell_holds_none() -> None:
    settings = ConsoleSettings(token=SecretStr("s3cret"))
    client = TestClient(create_app(_history(), settings))
    shell = client.get("/")
    assert shell.status_code == 200 and "data-policy" not in shell.text
    assert "Bearer" in shell.text, "the page sends the token it was opened with"
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/view", headers={"Authorization": "Bearer wrong"}).status_code == 401
    ok = client.get("/api/state", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["policies"]["ts"]["feedback"] == 230
    view = client.get("/api/view", headers={"Authorization": "Bearer s3cret"})
    assert 'id="ctr-chart"' in view.text
    assert client.get("/healthz").status_code == 200


def test_the_console_refuses_to_start_without_a_token_or_targets() -> None:
    from services.console.app import main

    assert main(ConsoleSettings(targets="joiner=http://127.0.0.1:1/metrics")) == 2
    assert main(ConsoleSettings(token=SecretStr("t"), targets="")) == 2


def test_gauges_of_several_targets_take_the_largest_and_counters_add_up() -> None:
    index = "# TYPE streamrec_index_version gauge\nstreamrec_index_version {}\n"
    history = History(
        [Target("a", "http://a/metrics"), Target("b", "http://b/metrics")],
        fetch=Scripted(
            {
                "http://a/metrics": [exposition({"ts": 10}, {"ts": 1}) + index.format(4)],
                "http://b/metrics": [exposition({"ts": 5}, {"ts": 2}) + index.format(3)],
            }
        ),
        clock=Clock(),
    )
    history.scrape()
    view = history.view()
    assert view["index"]["version"] == 4
    assert (view["policies"]["ts"]["feedback"], view["policies"]["ts"]["rewards"]) == (15, 3)
