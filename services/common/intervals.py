"""Confidence intervals of rates (CTR, mean reward, win rate) from counts.

:func:`wilson` is the Wilson score interval of a binomial proportion: unlike the
normal ("Wald") interval it stays inside [0, 1] and keeps close to its nominal
coverage for small counts and rates near 0, which is where CTRs live. A
fractional ``successes`` (a sum of rewards in [0, 1]) is accepted: the interval
is then the one of a proportion with that mean, an approximation that is
conservative for rewards that are not all 0 or 1.
"""

from __future__ import annotations

import math
from statistics import NormalDist


def wilson(successes: float, trials: float, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / trials`` at ``level`` (two-sided).

    With no trials the interval is [0, 1].

    >>> [round(x, 4) for x in wilson(6, 100)]
    [0.0278, 0.1248]
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return 0.0, 1.0
    rate = successes / trials
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    z2n = z * z / trials
    centre = (rate + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(rate * (1 - rate) / trials + z2n / (4 * trials))
    return max(0.0, centre - half), min(1.0, centre + half)
