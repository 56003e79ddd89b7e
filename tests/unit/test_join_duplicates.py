"""Nothing doubled: retries and late copies of impressions and clicks, without Kafka.

A client that got a 503 from the gateway (after its 30 s produce timeout) sends
the batch again, while the producer may still land the original up to its 120 s
delivery timeout later: copies of an event can arrive well after its window.
"""

from __future__ import annotations

from contracts.events import Click, Feedback, Impression, SlateItem
from services.joiner.join import PartitionJoin

T0 = 1_700_000_000.0


def impression(rid: str, ts: float, items=("a", "b"), user: str = "u1") -> Impression:
    slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate(items)]
    return Impression(request_id=rid, user_id=user, ts=ts, policy="linucb", slate=slate)


def click(eid: str, item: str, ts: float, rid: str | None = None, user: str = "u1") -> Click:
    return Click(event_id=eid, user_id=user, item_id=item, ts=ts, request_id=rid)


def rewards(feedback: list[Feedback]) -> dict[tuple[str, str], int]:
    return {(f.request_id, f.item_id): f.reward for f in feedback}


def test_a_retried_impression_after_its_window_closed_emits_no_second_feedback():
    join = PartitionJoin(window_s=30, lateness_s=5)
    first = impression("r1", T0)
    join.impression(first, 0)
    join.click(click("c1", "a", T0 + 2, rid="r1"), 0)
    assert rewards(join.advance(T0 + 40)) == {("r1", "a"): 1, ("r1", "b"): 0}
    # The same slate again a minute later: it must not come back as reward 0.
    assert join.impression(first, 1) == []
    assert join.advance(T0 + 200) == []
    assert join.stats["impressions_duplicate"] == 1


def test_a_click_delivered_twice_is_rewarded_once_even_without_request_id():
    join = PartitionJoin(window_s=30, lateness_s=5)
    join.impression(impression("r1", T0, items=("a",)), 0)
    join.click(click("c1", "a", T0 + 1), 0)
    join.impression(impression("r2", T0 + 0.9, items=("a",)), 1)
    out = join.advance(T0 + 35.5)  # r1's window is over, r2's is not
    out += join.click(click("c1", "a", T0 + 1), 1)  # the retry of c1
    out += join.advance(T0 + 100)
    assert rewards(out) == {("r1", "a"): 0, ("r2", "a"): 1}
    assert join.stats["clicks_duplicate"] == 1


def test_a_late_impression_is_attributed_the_click_that_came_before_it():
    """The click arrived on time; its impression's record was written a minute later
    (a retry): the click waits for it, and the late impression is rewarded."""
    join = PartitionJoin(window_s=30, lateness_s=5)
    join.click(click("c1", "a", T0 + 3, rid="r1"), 0)
    join.impression(impression("r2", T0 + 60, user="u2"), 0)
    join.click(click("c2", "z", T0 + 60, rid="r2", user="u2"), 1)
    out = join.impression(impression("r1", T0), 1)
    out += join.advance(T0 + 1000)
    assert rewards(out)[("r1", "a")] == 1
    assert join.stats["impressions_late"] == 1


def test_ids_are_remembered_for_the_horizon_after_they_arrived_then_forgotten():
    join = PartitionJoin(window_s=30, lateness_s=5, retry_horizon_s=60)
    imp = impression("r1", T0)
    join.impression(imp, 0, received=T0 + 10)  # its record was written 10 s late
    assert len(join.advance(T0 + 40)) == 2
    join.advance(T0 + 104.9)  # 10 + 30 + 5 + 60 s: still a duplicate
    assert join.impression(imp, 1, received=T0 + 104) == []
    assert join.stats["impressions_duplicate"] == 1
    join.advance(T0 + 105)  # past the horizon: a new impression again
    assert len(join.impression(imp, 2, received=T0 + 105)) == 2


def test_remembered_ids_are_capped_oldest_first_and_evictions_counted():
    join = PartitionJoin(window_s=30, lateness_s=5, max_remembered=2)
    for k in range(3):
        join.impression(impression(f"r{k}", T0 + k, user=f"u{k}"), k)
        join.click(click(f"c{k}", "a", T0 + k, rid=f"r{k}", user=f"u{k}"), k)
    assert join.remembered() == (2, 2)
    assert join.stats["evicted_impressions"] == 1 and join.stats["evicted_clicks"] == 1
    join.impression(impression("r0", T0), 3)  # forgotten: joined again, not dropped
    assert join.stats["impressions_duplicate"] == 0


def test_a_restore_within_the_horizon_still_drops_the_retry():
    """The remembered ids are rebuilt by re-reading from the replay offsets."""
    imps = [impression("r1", T0), impression("r2", T0 + 50, user="u2"), impression("r1", T0)]
    clicks = [click("c1", "a", T0 + 1, rid="r1"), click("c2", "z", T0 + 50, rid="r2", user="u2")]
    first = PartitionJoin(window_s=30, lateness_s=5)
    emitted = []
    for k in range(2):
        emitted += first.impression(imps[k], k) + first.click(clicks[k], k)
    assert rewards(emitted) == {("r1", "a"): 1, ("r1", "b"): 0}
    replay_impressions, replay_clicks = first.replay_from()  # checkpoint at offsets (2, 2)

    restored = PartitionJoin(window_s=30, lateness_s=5)
    restored.resume_after(
        first.seen_impressions,
        first.seen_clicks,
        2,
        rereading_impressions=replay_impressions is not None and replay_impressions < 2,
        rereading_clicks=replay_clicks is not None and replay_clicks < 2,
    )
    out = []
    for k in range(replay_impressions if replay_impressions is not None else 2, 3):
        out += restored.impression(imps[k], k)
    for k in range(replay_clicks if replay_clicks is not None else 2, 2):
        out += restored.click(clicks[k], k)
    out += restored.advance(T0 + 1000)
    assert {f.request_id for f in out} == {"r2"}, "the retried r1 was joined again"
