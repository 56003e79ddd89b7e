"""The console's HTML: server-rendered SVG charts and tables from :meth:`History.view`.

No JavaScript library and nothing fetched from elsewhere: the charts are plain
SVG drawn here, and the page's few lines of script only fetch the next
rendering (``/api/view``) every few seconds with the bearer token, which the
page takes from its URL's fragment (``#token=...``; a fragment never reaches a
server or its logs). Every element a test or a reader looks for has a stable
``id`` or ``data-`` attribute: ``svg#ctr-chart polyline[data-policy]`` holds
one point per round of a policy's windowed CTR, ``td[data-policy-feedback]``
its feedback count.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from html import escape
from typing import Any

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 130, 12, 30


def chart(
    chart_id: str,
    series: Mapping[str, Sequence[Sequence[float]]],
    *,
    y_label: str,
    now: float,
    bands: bool = False,
    colours: Mapping[str, str] | None = None,
) -> str:
    """An SVG line chart: x is seconds before ``now``; each point is ``[t, y(, low, high)]``.

    With ``bands`` each series gets a shaded polygon from its points' low and high;
    ``colours`` keeps a policy's colour the same in every chart.
    """
    colours = colours or _colours(series)
    points = [p for values in series.values() for p in values]
    if not points:
        return f'<p id="{chart_id}-empty" class="empty">no data yet</p>'
    t0 = min(p[0] for p in points)
    span = max(now - t0, 1.0)
    top = max(p[3] if bands else p[1] for p in points)
    top = _nice(top * 1.05 if top > 0 else 1.0)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def xy(t: float, y: float) -> str:
        return f"{LEFT + (t - t0) / span * plot_w:.1f},{TOP + (1 - y / top) * plot_h:.1f}"

    out = [
        f'<svg id="{chart_id}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" '
        f'width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="{escape(y_label)}">'
    ]
    for i in range(5):
        y = top * i / 4
        py = TOP + (1 - i / 4) * plot_h
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{py:.1f}" y2="{py:.1f}" class="grid"/>'
            f'<text x="{LEFT - 6}" y="{py + 4:.1f}" text-anchor="end">{_fmt(y)}</text>'
        )
    for i in range(5):
        px = LEFT + i / 4 * plot_w
        ago = span * (1 - i / 4)
        out.append(f'<text x="{px:.1f}" y="{HEIGHT - 10}" text-anchor="middle">-{ago:.0f} s</text>')
    out.append(
        f'<text x="12" y="{TOP + plot_h / 2:.0f}" transform="rotate(-90 12 {TOP + plot_h / 2:.0f})"'
        f' text-anchor="middle">{escape(y_label)}</text>'
    )
    for i, (name, values) in enumerate(series.items()):
        colour = colours.get(name, PALETTE[i % len(PALETTE)])
        label = escape(name)
        if bands and values:
            outline = [xy(p[0], p[3]) for p in values] + [xy(p[0], p[2]) for p in values[::-1]]
            out.append(
                f'<polygon class="band" data-policy="{label}" fill="{colour}" '
                f'fill-opacity="0.18" stroke="none" points="{" ".join(outline)}"/>'
            )
        line = " ".join(xy(p[0], p[1]) for p in values)
        out.append(
            f'<polyline class="series" data-policy="{label}" data-points="{len(values)}" '
            f'fill="none" stroke="{colour}" stroke-width="2" points="{line}"/>'
        )
        ly = TOP + 14 + 16 * i
        out.append(
            f'<rect x="{WIDTH - RIGHT + 10}" y="{ly - 9}" width="12" height="10" fill="{colour}"/>'
            f'<text x="{WIDTH - RIGHT + 26}" y="{ly}">{label}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def render(view: Mapping[str, Any]) -> str:
    """The page body (everything inside ``<main>``) for one :meth:`History.view`."""
    if view.get("t") is None:
        return '<p id="waiting">waiting for the first scrape</p>'
    now = view["t"]
    window = view["window_s"]
    policies = view["policies"]
    colours = _colours([*policies, *view["regret"]])
    parts = [
        f'<p class="meta">scraped <span id="scraped-at" data-t="{now:.3f}" '
        f'data-rounds="{view["rounds"]}">'
        f"{time.strftime('%H:%M:%S', time.localtime(now))}</span>, {view['rounds']} rounds; "
        f"targets {_targets(view.get('targets', {}))}</p>",
        f"<h2>CTR per policy (mean reward per shown item, trailing {window:.0f} s, "
        "95% Wilson band)</h2>",
        chart(
            "ctr-chart",
            {p: v["points"] for p, v in policies.items()},
            y_label="CTR",
            now=now,
            bands=True,
            colours=colours,
        ),
        _table(
            "policies",
            ("policy", "feedback", "rewards", "CTR (all)", "CTR (window)", "95% interval"),
            [
                (
                    escape(p),
                    f'<span data-policy-feedback="{escape(p)}">{v["feedback"]:.0f}</span>',
                    f'<span data-policy-rewards="{escape(p)}">{v["rewards"]:.0f}</span>',
                    _fmt(v["ctr"]),
                    _fmt(v["points"][-1][1]) if v["points"] else "–",
                    f"[{_fmt(v['points'][-1][2])}, {_fmt(v['points'][-1][3])}]"
                    if v["points"]
                    else "–",
                )
                for p, v in policies.items()
            ],
        ),
    ]
    if view["regret"]:
        parts += [
            "<h2>Cumulative expected regret (simulator)</h2>",
            chart("regret-chart", view["regret"], y_label="clicks", now=now, colours=colours),
        ]
    index = view["index"]
    dbgd = view["dbgd"]
    parts += [
        "<h2>Models and index</h2>",
        _table(
            "models",
            ("model", "serving version", "serving age", "published version", "published ago"),
            [
                (
                    escape(m),
                    _fmt(v.get("serving_version")),
                    _seconds(v.get("serving_age_s")),
                    _fmt(v.get("published_version")),
                    _seconds(max(0.0, now - v["published_at"]) if v.get("published_at") else None),
                )
                for m, v in view["models"].items()
            ],
        ),
        f'<p>index version <span id="index-version">{_fmt(index["version"])}</span>, '
        f"age {_seconds(index['age_s'])}; DBGD: explore wins "
        f'<span id="dbgd-win-rate">{_fmt(dbgd["win_rate"])}</span>'
        + (
            f" [{_fmt(dbgd['ci_low'])}, {_fmt(dbgd['ci_high'])}] of {dbgd['decided']:.0f} "
            "decided slates"
            if dbgd["win_rate"] is not None
            else ""
        )
        + "</p>",
        '<div class="columns"><div>',
        "<h2>Throughput</h2>",
        _table(
            "events",
            ("service", "events/s applied"),
            [(escape(s), f"{r:.0f}") for s, r in view["events_per_s"].items()],
        ),
        _table(
            "requests",
            ("policy (serving)", "requests/s"),
            [(escape(s), f"{r:.0f}") for s, r in view["requests_per_s"].items()],
        ),
        "</div><div>",
        "<h2>Consumer lag (records, by partition)</h2>",
        _lag(view["lag"]),
        "</div><div>",
        "<h2>Dead letters</h2>",
        _table(
            "dead-letters",
            ("service", "reason", "records"),
            [
                (escape(r["service"]), escape(r["reason"]), _fmt(r["records"]))
                for r in view["dead_letters"]
            ],
        ),
        "<h2>Guard</h2>",
        _table(
            "guard",
            ("policy", "state", "statistic"),
            [
                (escape(p), "tripped (pinned)" if g["tripped"] else "ok", _fmt(g["statistic"]))
                for p, g in view["guard"]["policies"].items()
            ],
        ),
        "</div></div>",
    ]
    return "\n".join(parts)


def page(refresh_s: float) -> str:
    """The page shell: styles, an empty ``<main>`` and the script that fills it."""
    return PAGE.replace("__REFRESH_MS__", str(int(refresh_s * 1000)))


def _table(table_id: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    if not rows:
        return f'<p id="{table_id}-empty" class="empty">none</p>'
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><tr>{head}</tr>{body}</table>'


def _colours(names: Iterable[str]) -> dict[str, str]:
    """One palette colour per name, in sorted order, so every chart agrees."""
    return {n: PALETTE[i % len(PALETTE)] for i, n in enumerate(sorted(set(names)))}


def _lag(rows: Sequence[Mapping[str, Any]]) -> str:
    """Consumer lag as one row per (service, topic) and one column per partition."""
    partitions = sorted({r["partition"] for r in rows}, key=lambda p: (len(p), p))
    cells: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        cells.setdefault((r["service"], r["topic"]), {})[r["partition"]] = r["records"]
    return _table(
        "lag",
        ("service", "topic", *(escape(p) for p in partitions)),
        [
            (escape(service), escape(topic), *(_fmt(lag.get(p)) for p in partitions))
            for (service, topic), lag in sorted(cells.items())
        ],
    )


def _targets(up: Mapping[str, bool]) -> str:
    return ", ".join(
        f'<span class="{"up" if ok else "down"}">{escape(name)}</span>' for name, ok in up.items()
    )


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if float(value).is_integer() and abs(value) >= 1:
        return f"{value:.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.1f}"


def _seconds(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.0f} s"


def _nice(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above ``value``."""
    exponent = math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * 10**exponent >= value:
            return float(step * 10**exponent)
    return float(10 ** (exponent + 1))


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>streamrec console</title>
<style>
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 1.4em; }
table { border-collapse: collapse; margin: .4em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child { text-align: left; }
svg.chart text { font-size: 11px; fill: #444; } svg.chart .grid { stroke: #e4e4e4; }
.up { color: #2a7d2a; } .down { color: #b00; } .empty, .meta { color: #777; }
#error { color: #b00; }
.columns { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
</style></head>
<body><h1>streamrec console</h1><p id="error"></p><main id="main">loading…</main>
<script>
const token = new URLSearchParams(location.hash.slice(1)).get("token");
const headers = token ? {Authorization: "Bearer " + token} : {};
async function refresh() {
  try {
    const response = await fetch("api/view", {headers});
    if (!response.ok) throw new Error(response.status + " " + (await response.text()));
    document.getElementById("main").innerHTML = await response.text();
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = "console data: " + e.message;
  }
}
refresh();
setInterval(refresh, __REFRESH_MS__);
</script></body></html>
"""
