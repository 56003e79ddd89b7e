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
