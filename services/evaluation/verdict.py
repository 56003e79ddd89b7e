"""Whether a policy beats the random baseline, said only when the data say so.

Each policy's CTR (or mean reward) gets a 95% Wilson score interval
(:func:`services.common.intervals.wilson`) from its clicks and shown items. A
policy *beats random* only when its interval lies entirely above random's (its
lower bound over random's upper bound), *trails random* when it lies entirely
below, and is *not distinguishable yet* otherwise. Requiring disjoint 95%
intervals is stricter than a 5% two-proportion test (for two equal-width
intervals it is a test at about 0.6%), which is the point: a demo's few hundred
requests should not be reported as a win. Shown items of one slate are treated
as independent trials, which makes the intervals somewhat too narrow when the
clicks within a slate are correlated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from services.common.intervals import wilson

BASELINE = "random"
LEVEL = 0.95
Outcome = Literal["beats random", "trails random", "not distinguishable yet"]


@dataclass(frozen=True)
class Verdict:
    """One policy against the baseline: its rate, interval and the outcome."""

    policy: str
    clicks: float
    shown: float
    rate: float
    ci_low: float
    ci_high: float
    outcome: Outcome

    def line(self) -> str:
        """``ts_beta 0.061 [0.041, 0.089]: not distinguishable yet``."""
        return (
            f"{self.policy} {self.rate:.3f} [{self.ci_low:.3f}, {self.ci_high:.3f}]: {self.outcome}"
        )


def verdicts(
    counts: Mapping[str, tuple[float, float]], baseline: str = BASELINE, level: float = LEVEL
) -> tuple[tuple[float, float, float], list[Verdict]]:
    """The baseline's (rate, low, high) and a :class:`Verdict` for every other policy.

    ``counts`` maps a policy to its (clicks, shown items); it must hold ``baseline``.
    """
    if baseline not in counts:
        raise ValueError(f"no {baseline!r} policy to compare with")
    b_clicks, b_shown = counts[baseline]
    b_low, b_high = wilson(b_clicks, b_shown, level)
    b_rate = b_clicks / b_shown if b_shown else 0.0
    result = []
    for policy, (clicks, shown) in counts.items():
        if policy == baseline:
            continue
        low, high = wilson(clicks, shown, level)
        outcome: Outcome
        if shown and b_shown and low > b_high:
            outcome = "beats random"
        elif shown and b_shown and high < b_low:
            outcome = "trails random"
        else:
            outcome = "not distinguishable yet"
        rate = clicks / shown if shown else 0.0
        result.append(Verdict(policy, clicks, shown, rate, low, high, outcome))
    return (b_rate, b_low, b_high), result


def report(
    counts: Mapping[str, tuple[float, float]], baseline: str = BASELINE, level: float = LEVEL
) -> list[str]:
    """The verdict as printable lines: the rule, the baseline's interval, one line a policy."""
    (rate, low, high), rows = verdicts(counts, baseline, level)
    beating = [v.policy for v in rows if v.outcome == "beats random"]
    return [
        f"{len(beating)} of {len(rows)} learning policies beat {baseline} "
        f"(CTR with {level:.0%} Wilson intervals; a win needs the policy's interval above "
        f"{baseline}'s): {', '.join(beating) or 'none'}",
        f"  {baseline} {rate:.3f} [{low:.3f}, {high:.3f}]",
        *(f"  {v.line()}" for v in rows),
    ]
