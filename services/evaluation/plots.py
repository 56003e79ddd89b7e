"""PNG plots of evaluation runs.

Figures are built with matplotlib's object API (``Figure``, rendered by Agg on
save) rather than pyplot, so plotting needs no display, touches no global
backend state and leaks no open figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from services.evaluation.estimators import Estimate
from services.evaluation.online import OnlineResult


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


def plot_online(result: OnlineResult, directory: str | Path, *, window: int) -> list[Path]:
    """``ctr.png`` (windowed CTR, with the best slates' expected CTR) and ``regret.png``."""
    directory = Path(directory)
    windows = result.windowed_ctr(window)
    ends = result.window_ends(window)
    n = len(ends)
    best = result.best[: n * window].reshape(n, window).sum(axis=1) / (window * result.slate_size)
    title = f"{result.scenario} world, seed {result.seed}"
    return [
        plot_series(
            {**windows, "best (expected)": best},
            f"CTR per {window}-request window",
            directory / "ctr.png",
            x=ends,
            title=title,
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
