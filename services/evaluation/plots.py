"""PNG plots of evaluation runs and of ``make demo``: the project's one plotting module.

:func:`plot_rates` draws rates (CTR, mean reward) over time, each with its 95%
Wilson band (:func:`services.common.intervals.wilson`) and optionally a second
panel of step lines (model and index versions); ``streamrec evaluate`` and the
demo summary (:mod:`services.stack.demo`) both use it.

Figures are built with matplotlib's object API (``Figure``, rendered by Agg on
save) rather than pyplot, so plotting needs no display, touches no global
backend state and leaks no open figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from services.common.intervals import wilson
from services.evaluation.estimators import Estimate
from services.evaluation.online import OnlineResult

#: (x, successes, trials) of one rate series: the rate at ``x[i]`` is ``successes[i] / trials[i]``.
Rates = tuple[np.ndarray, np.ndarray, np.ndarray]


def plot_series(
    series: Mapping[str, np.ndarray],
    ylabel: str,
    path: str | Path,
    *,
    x: np.ndarray | None = None,
    xlabel: str = "step",
    title: str | None = None,
) -> Path:
    """One line per named series against ``x`` (default ``1..n``); writes a PNG at ``path``."""
    if not series:
        raise ValueError("plot_series needs at least one series")
    path = Path(path)
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, values in series.items():
        values = np.asarray(values)
        xs = np.arange(1, len(values) + 1) if x is None else x
        if len(xs) != len(values):
            raise ValueError(f"series {name!r} has {len(values)} points for {len(xs)} x values")
        ax.plot(xs, values, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def plot_rates(
    rates: Mapping[str, Rates],
    path: str | Path,
    *,
    ylabel: str,
    xlabel: str,
    title: str | None = None,
    reference: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    steps: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None,
    steps_label: str = "version",
) -> Path:
    """A line per rate series with its 95% Wilson band; writes a PNG at ``path``.

    ``reference`` adds plain (x, y) lines without a band (an expected ceiling);
    ``steps`` adds a second panel below of (x, y) step lines, e.g. the model
    version each policy served and the index version, over the same x. A point
    with no trials is left out.
    """
    if not rates:
        raise ValueError("plot_rates needs at least one series")
    path = Path(path)
    fig = Figure(figsize=(8, 6.5 if steps else 4.5))
    if steps:
        ax, lower = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.3))
    else:
        ax, lower = fig.subplots(), None
    for name, (x, successes, trials) in rates.items():
        x, successes, trials = (np.asarray(a, dtype=np.float64) for a in (x, successes, trials))
        if not len(x) == len(successes) == len(trials):
            raise ValueError(f"series {name!r}: x, successes and trials differ in length")
        keep = trials > 0
        x, successes, trials = x[keep], successes[keep], trials[keep]
        bands = np.array([wilson(s, t) for s, t in zip(successes, trials, strict=True)])
        (line,) = ax.plot(x, successes / trials, label=name)
        if len(bands):
            ax.fill_between(x, bands[:, 0], bands[:, 1], color=line.get_color(), alpha=0.2)
    for name, (x, y) in (reference or {}).items():
        ax.plot(x, y, label=name, linestyle="--", color="black")
    ax.set_ylabel(f"{ylabel} (95% Wilson band)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if lower is not None and steps:
        for name, (x, y) in steps.items():
            lower.step(x, y, where="post", label=name)
        lower.set_ylabel(steps_label)
        lower.grid(alpha=0.3)
        lower.legend(fontsize="small", ncol=2)
        lower.set_xlabel(xlabel)
    else:
        ax.set_xlabel(xlabel)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path


def plot_online(result: OnlineResult, directory: str | Path, *, window: int) -> list[Path]:
    """``ctr.png`` (windowed CTR, with the best slates' expected CTR) and ``regret.png``."""
    directory = Path(directory)
    ends = result.window_ends(window)
    n = len(ends)
    shown = np.full(n, window * result.slate_size)
    clicks = {
        p: result.clicks[i, : n * window].reshape(n, window).sum(axis=1)
        for i, p in enumerate(result.policies)
    }
    best = result.best[: n * window].reshape(n, window).sum(axis=1) / shown
    title = f"{result.scenario} world, seed {result.seed}"
    return [
        plot_rates(
            {p: (ends, c, shown) for p, c in clicks.items()},
            directory / "ctr.png",
            ylabel=f"CTR per {window}-request window",
            xlabel="step",
            title=title,
            reference={"best (expected)": (ends, best)},
        ),
        plot_series(
            result.cumulative_regret(),
            "cumulative expected regret (clicks)",
            directory / "regret.png",
            title=title,
        ),
    ]


def plot_estimates(
    estimates: Mapping[str, Mapping[str, Estimate | None]],
    path: str | Path,
    *,
    title: str | None = None,
    truth: Mapping[str, float] | None = None,
) -> Path:
    """Point estimates with their confidence intervals: one group per policy, one bar
    per estimator (estimators that are unavailable, None, are left out).

    ``truth`` (policy -> value), where known, is drawn as a dashed line per group.
    """
    if not estimates:
        raise ValueError("plot_estimates needs at least one policy")
    path = Path(path)
    kinds = sorted({k for per in estimates.values() for k, e in per.items() if e is not None})
    fig = Figure(figsize=(max(6.0, 1.6 * len(estimates) + 2), 4))
    ax = fig.subplots()
    width = 0.8 / max(1, len(kinds))
    for j, kind in enumerate(kinds):
        xs, values, errors = [], [], []
        for i, per in enumerate(estimates.values()):
            e = per.get(kind)
            if e is None:
                continue
            xs.append(i + (j - (len(kinds) - 1) / 2) * width)
            values.append(e.value)
            errors.append([e.value - e.ci_low, e.ci_high - e.value])
        ax.errorbar(xs, values, yerr=np.array(errors).T, fmt="o", capsize=4, label=kind)
    for i, name in enumerate(estimates):
        if truth and name in truth:
            ax.hlines(truth[name], i - 0.45, i + 0.45, colors="black", linestyles="dashed")
    ax.set_xticks(range(len(estimates)), list(estimates), rotation=15)
    ax.set_ylabel("estimated reward per shown item")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path
