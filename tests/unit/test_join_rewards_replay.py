"""Graded rewards keep the join deterministic: three streams, any interleaving, any restore.

As ``tests/unit/test_join_replay.py`` does for impressions and clicks, over random
logs that add a rewards stream (several kinds, retried reward events, rewards
late for their window or before their impression, idle markers): the output
(ids, order, combined rewards and their parts) must not depend on how the three
topics interleave, and a join restored from a checkpoint taken anywhere, re-reading
each topic from its replay mark, must emit exactly what the first run emitted
after it (docs/decisions.md §5, §6, §21).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from contracts.events import Click, Feedback, Impression, Reward, SlateItem
from services.common.rewards import RewardRule
from services.joiner.join import PartitionJoin

T0 = 1_700_000_000.0
RULE = RewardRule({"click": 0.3, "purchase": 1.0, "dwell": 0.5}, combine="sum")
PARAMS = {"window_s": 4.0, "lateness_s": 1.0, "retry_horizon_s": 6.0, "rule": RULE}
#: (event or None for an idle marker, record timestamp, marker time)
Entry = tuple[Impression | Click | Reward | None, float, float]


def _streams(seed: int, n: int = 120) -> list[list[Entry]]:
    rng = random.Random(seed)
    streams: list[list[tuple[float, Entry]]] = [[], [], []]
    for k in range(n):
        user = f"u{rng.randrange(4)}"
        ts = T0 + 0.2 * k - rng.uniform(0, 0.9)
        items = rng.sample([f"i{j}" for j in range(6)], 3)
        slate = [SlateItem(item_id=i, position=p, propensity=0.5) for p, i in enumerate(items)]
        imp = Impression(request_id=f"r{k}", user_id=user, ts=ts, policy="p", slate=slate)
        appended = ts + rng.uniform(0, 0.3) + (6.0 if rng.random() < 0.05 else 0.0)
        streams[0].append((appended, (imp, appended, 0.0)))
        for c in range(rng.choice((0, 0, 1))):
            at = ts + rng.uniform(0, 5.0)
            click = Click(
                event_id=f"c{k}-{c}",
                user_id=user,
                item_id=rng.choice(items),
                ts=at,
                request_id=f"r{k}",
            )
            streams[1].append((at + rng.uniform(0, 0.9), (click, at + 0.1, 0.0)))
        for r in range(rng.choice((0, 1, 2, 3))):
            at = ts + rng.uniform(-0.5, 6.0)  # some before the impression, some after the window
            reward = Reward(
                event_id=f"e{k}-{r}",
                user_id=user,
                request_id=f"r{k}",
                item_id=rng.choice(items),
                kind=rng.choice(("purchase", "dwell")),
                value=round(rng.random(), 3),
                ts=at,
            )
            streams[2].append((at + rng.uniform(0, 0.9), (reward, at + 0.1, 0.0)))
            if rng.random() < 0.15:  # a retry of the same event
                retried = at + rng.uniform(0.5, 4)
                streams[2].append((retried, (reward, retried, 0.0)))
    out = []
    for stream in streams:
        stream.sort(key=lambda entry: entry[0])
        for at in sorted(rng.sample([a for a, _ in stream], 3)):
            stream.append((at + 1e-6, (None, at, at - 1.0)))
        stream.sort(key=lambda entry: entry[0])
        stream.append((float("inf"), (None, 0.0, T0 + 1e6)))
        out.append([entry for _, entry in stream])
    return out


def _feed(join: PartitionJoin, side: int, entry: Entry, offset: int) -> list[Feedback]:
    event, received, marker = entry
    if event is None:
        return join.advance(marker, impressions=side == 0, clicks=side == 1, rewards=side == 2)
    if isinstance(event, Impression):
        return join.impression(event, offset, received)
    if isinstance(event, Click):
        return join.click(event, offset, received)
    return join.reward(event, offset, received)


def _run(
    join: PartitionJoin, streams: list[list[Entry]], start: list[int], rng: random.Random
) -> Iterator[tuple[list[int], list[Feedback]]]:
    at = list(start)
    while any(at[s] < len(streams[s]) for s in range(3)):
        side = rng.choice([s for s in range(3) if at[s] < len(streams[s])])
        for _ in range(min(len(streams[side]) - at[side], rng.choice((1, 1, 3, 12)))):
            emitted = _feed(join, side, streams[side][at[side]], at[side])
            at[side] += 1
            yield list(at), emitted


def _outcomes(feedback: list[Feedback]) -> list[tuple[str, float, dict[str, float]]]:
    return [(f.feedback_id, f.reward, f.signals) for f in feedback]


@pytest.mark.parametrize("seed", range(15))
def test_the_output_does_not_depend_on_how_the_three_streams_interleave(seed: int) -> None:
    streams = _streams(seed)
    a, b = (
        [fb for _, out in _run(PartitionJoin(**PARAMS), streams, [0, 0, 0], rng) for fb in out]
        for rng in (random.Random(seed), random.Random(seed + 1000))
    )
    assert a and _outcomes(a) == _outcomes(b)
    assert any(f.signals.keys() - {"click"} for f in a), "graded signals were joined"
    ids = [f.feedback_id for f in a]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("seed", range(30))
def test_a_restored_join_emits_what_the_first_run_emitted_after_the_checkpoint(seed: int) -> None:
    streams = _streams(seed)
    steps = list(_run(PartitionJoin(**PARAMS), streams, [0, 0, 0], random.Random(seed)))
    cut = random.Random(-seed).randrange(len(steps))
    first = PartitionJoin(**PARAMS)
    rerun = _run(first, streams, [0, 0, 0], random.Random(seed))
    for _ in range(cut):
        next(rerun)
    at, _ = next(rerun)
    marks = (*first.replay_marks(), first.reward_replay_mark())
    start = [at[s] if mark is None else mark.offset for s, mark in enumerate(marks)]
    progress = [0.0 if mark is None else mark.progress for mark in marks]
    restored = PartitionJoin(**PARAMS)
    restored.resume_after(
        first.seen_impressions,
        first.seen_clicks,
        at[0],
        rereading_impressions=start[0] < at[0],
        rereading_clicks=start[1] < at[1],
        impressions_progress=progress[0],
        clicks_progress=progress[1],
        seen_rewards=first.seen_rewards,
        rereading_rewards=start[2] < at[2],
        rewards_progress=progress[2],
    )
    expected = [fb for _, emitted in steps[cut + 1 :] for fb in emitted]
    got = [
        fb
        for _, emitted in _run(restored, streams, start, random.Random(seed + 1))
        for fb in emitted
    ]
    assert _outcomes(got) == _outcomes(expected)
