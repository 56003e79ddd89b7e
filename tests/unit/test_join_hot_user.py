"""A hot user: clicks without request id, thousands of open impressions, the per-user bound."""

from __future__ import annotations

import random
import time

from contracts.events import Click, Feedback, Impression, SlateItem
from services.joiner.join import PartitionJoin

T0 = 1_700_000_000.0


def impression(rid: str, ts: float, items, user: str = "u1") -> Impression:
    slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate(items)]
    return Impression(request_id=rid, user_id=user, ts=ts, policy="linucb", slate=slate)


def click(eid: str, item: str, ts: float, rid: str | None = None, user: str = "u1") -> Click:
    return Click(event_id=eid, user_id=user, item_id=item, ts=ts, request_id=rid)


def rewards(feedback: list[Feedback]) -> dict[tuple[str, str], int]:
    return {(f.request_id, f.item_id): f.reward for f in feedback}


def test_clicks_without_request_id_against_5000_open_impressions_of_one_user_are_fast():
    """The review's case: 2,000 such clicks against 5,000 open impressions of one user
    took 55 s (a scan of the user's impressions per click, list.remove per close).
    Half the clicks are on items no open impression showed (the full scan before)."""
    rng = random.Random(1)
    join = PartitionJoin(window_s=30, lateness_s=5)
    for k in range(5_000):
        items = rng.sample([f"i{j}" for j in range(200)], 10)
        join.impression(impression(f"r{k}", T0 + k * 0.004, items), k)
    join.advance(T0 + 27, clicks=False)  # the impressions are read well ahead of the clicks
    started = time.perf_counter()
    for n in range(2_000):
        item = f"i{rng.randrange(200)}" if n % 2 else f"x{n}"
        join.click(click(f"c{n}", item, T0 + 20 + n * 0.001), n)
    join.advance(T0 + 100)
    elapsed = time.perf_counter() - started
    assert elapsed < 2.0, f"{elapsed:.1f} s"
    attributed = join.stats["clicks_matched"] + join.stats["clicks_duplicate"]
    assert attributed == 1_000 and join.stats["clicks_unmatched"] == 1_000


def test_the_latest_impression_that_showed_the_item_gets_the_click_however_it_is_read():
    """Which impression a click without request id rewards must not depend on
    whether the impression stream was read before or after the click."""
    imps = [impression("r1", T0, ("a",)), impression("r2", T0 + 0.9, ("a",))]
    c1 = click("c1", "a", T0 + 1)

    def run(click_first: bool) -> dict[tuple[str, str], int]:
        join = PartitionJoin(window_s=30, lateness_s=5)
        out = join.impression(imps[0], 0)
        if click_first:
            out += join.click(c1, 0) + join.impression(imps[1], 1)
        else:
            out += join.impression(imps[1], 1) + join.click(c1, 0)
        return rewards(out + join.advance(T0 + 100))

    assert run(click_first=True) == run(click_first=False) == {("r1", "a"): 0, ("r2", "a"): 1}


def test_above_the_per_user_bound_the_oldest_closes_early_with_its_clicks_so_far():
    join = PartitionJoin(window_s=30, lateness_s=5, max_open_per_user=3)
    out = []
    for k in range(3):
        out += join.impression(impression(f"r{k}", T0 + k, ("a", "b")), k)
    out += join.click(click("c0", "a", T0 + 0.5, rid="r0"), 0)
    out += join.click(click("c1", "b", T0 + 5, rid="r0"), 1)  # after the window the bound cuts
    out += join.impression(impression("r3", T0 + 9, ("a",)), 3)  # the fourth: r0 closes early
    assert join.stats["impressions_closed_early"] == 1
    assert out == []
    # Its window now ends at the impression stream's progress minus lateness (T0 + 4);
    # its feedback comes when the watermark reaches T0 + 9, long before T0 + 35.
    closed = join.advance(T0 + 9)
    assert rewards(closed) == {("r0", "a"): 1, ("r0", "b"): 0}
    assert {f.request_id for f in join.advance(T0 + 1000)} == {"r1", "r2", "r3"}


def test_a_hot_user_keeps_at_most_the_bound_in_its_windows():
    join = PartitionJoin(window_s=30, lateness_s=5, max_open_per_user=100)
    for k in range(1_000):
        join.impression(impression(f"r{k}", T0 + k * 0.01, ("a",)), k)
        join.click(click(f"c{k}", "a", T0 + k * 0.01 + 0.001), k)  # the watermark keeps up
    assert len(join.open) <= 101
    assert join.stats["impressions_closed_early"] == 900
