"""The run's HTML report: one self-contained file that opens offline.

Charts are Vega-Lite specs built with Altair and drawn by the browser with the Vega
libraries that vl-convert bundles; the bundle, the specs and their data are inlined in
the page, so it fetches no script, font or style sheet. Choices where the brief is
silent:

- Channels are ordered by total spend over the report, highest first (then by name);
  channels that appear only in the model comparison come last.
- Totals per channel and per day are recomputed from the report's sums (cpo = cost /
  ihc, roas = ihc_revenue / cost), never averaged from the daily ratios.
- Amounts are shown in EUR with thousands separators and two decimals in tables, whole
  euros on chart axes; shares as percentages with one decimal; "–" where a value does
  not exist (no spend: no ROAS; no attributed order: no CPO).
- Charts are drawn as SVG (crisp when printed); each sits beside a table with its
  numbers, so the page reads without JavaScript too.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import altair as alt
import polars as pl
import vl_convert
from altair.utils._importers import vl_version_for_vl_convert

from tasks.export import channel_totals, report_totals, write_atomically

SPEND = "Spend"
REVENUE = "Attributed revenue"
CHART_WIDTH = 640
# Vega's number formats: "$" renders as the euro sign, "," groups thousands.
FORMAT_LOCALE = {"decimal": ".", "thousands": ",", "grouping": [3], "currency": ["€", ""]}
EMBED_OPTIONS = {"actions": False, "renderer": "svg", "formatLocale": FORMAT_LOCALE}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 2rem auto; max-width: 1100px; padding: 0 1rem; color: #1f2328; }
h1 { margin-bottom: 0.3rem; }
h2 { margin-top: 2.5rem; border-bottom: 1px solid #d0d7de; padding-bottom: 0.3rem; }
p.how { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; margin: 1rem 0; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #eaeef2; }
th { text-align: left; background: #f6f8fa; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.about th { background: none; font-weight: 600; }
.chart { margin: 1rem 0; }
"""


def user_cache_dir() -> Path:
    """Where the report keeps files between runs: ``$XDG_CACHE_HOME/ihc-attribution``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ihc-attribution"


@cache
def _vega_bundle(cache_dir: Path | None) -> str:
    """Vega, Vega-Lite and Vega-Embed as one script.

    Building it takes 1–2 s, so it is kept in ``cache_dir`` (one file per vl-convert and
    Vega-Lite version) and read from there by later runs; a cache that cannot be read or
    written is not used.
    """
    vl_version = vl_version_for_vl_convert()
    cached = (
        cache_dir / f"vega-bundle-{vl_convert.__version__}-{vl_version}.js" if cache_dir else None
    )
    with contextlib.suppress(OSError):
        if cached is not None and cached.is_file():
            return cached.read_text(encoding="utf-8")
    bundle = vl_convert.javascript_bundle(vl_version=vl_version)
    with contextlib.suppress(OSError):
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(cached, lambda p: p.write_text(bundle, encoding="utf-8"))
    return bundle


def _eur(value: float | None) -> str:
    return "–" if value is None else f"€{value:,.2f}"


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{value:.1%}"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:,.2f}"


def _orders(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _table(columns: Sequence[str], rows: Sequence[Sequence[object]], numeric_from: int = 1) -> str:
    """An HTML table; cells from column ``numeric_from`` on are right-aligned numbers."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{html.escape(str(v))}</td>'
            if i >= numeric_from
            else f"<td>{html.escape(str(v))}</td>"
            for i, v in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _spend_revenue_section(totals: pl.DataFrame, order: list[str]) -> tuple[str, alt.Chart]:
    long = pl.concat(
        [
            totals.select("channel_name", measure=pl.lit(SPEND), amount="cost"),
            totals.select("channel_name", measure=pl.lit(REVENUE), amount="ihc_revenue"),
        ]
    )
    chart = (
        alt.Chart(long)
        .mark_bar()
        .encode(
            y=alt.Y("channel_name:N", sort=order, title=None),
            yOffset=alt.YOffset("measure:N", sort=[SPEND, REVENUE]),
            x=alt.X("amount:Q", title="EUR", axis=alt.Axis(format="$,.0f")),
            color=alt.Color("measure:N", sort=[SPEND, REVENUE], title=None),
            tooltip=[
                alt.Tooltip("channel_name:N", title="Channel"),
                alt.Tooltip("measure:N", title="Measure"),
                alt.Tooltip("amount:Q", title="EUR", format="$,.2f"),
            ],
        )
        .properties(width=CHART_WIDTH, height=alt.Step(12))
    )
    table = _table(
        ["Channel", "Spend", "Attributed orders", "Attributed revenue", "CPO", "ROAS"],
        [
            (
                row["channel_name"],
                _eur(row["cost"]),
                _orders(row["ihc"]),
                _eur(row["ihc_revenue"]),
                _eur(row["cpo"]),
                _ratio(row["roas"]),
            )
            for row in totals.iter_rows(named=True)
        ],
    )
    return table, chart


def _efficiency_section(totals: pl.DataFrame, order: list[str]) -> tuple[str, alt.HConcatChart]:
    def bars(column: str, title: str, number_format: str) -> alt.Chart:
        return (
            alt.Chart(totals.select("channel_name", column))
            .mark_bar()
            .encode(
                y=alt.Y("channel_name:N", sort=order, title=None),
                x=alt.X(f"{column}:Q", title=title, axis=alt.Axis(format=number_format)),
                tooltip=[
                    alt.Tooltip("channel_name:N", title="Channel"),
                    alt.Tooltip(f"{column}:Q", title=title, format=number_format),
                ],
            )
            .properties(width=CHART_WIDTH // 2 - 90, height=alt.Step(16))
        )

    chart = alt.hconcat(
        bars("roas", "ROAS (EUR revenue per EUR spent)", ",.2f"),
        bars("cpo", "CPO (EUR per attributed order)", "$,.2f"),
    )
    table = _table(
        ["Channel", "ROAS", "CPO"],
        [
            (row["channel_name"], _ratio(row["roas"]), _eur(row["cpo"]))
            for row in totals.iter_rows(named=True)
        ],
    )
    return table, chart


def _daily_section(days: pl.DataFrame) -> tuple[str, alt.Chart]:
    long = pl.concat(
        [
            days.select(pl.col("date").cast(pl.String), measure=pl.lit(SPEND), amount="cost"),
            days.select(
                pl.col("date").cast(pl.String), measure=pl.lit(REVENUE), amount="ihc_revenue"
            ),
        ]
    )
    chart = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("utcyearmonthdate(date):T", title=None, axis=alt.Axis(format="%d %b")),
            y=alt.Y("amount:Q", title="EUR", axis=alt.Axis(format="$,.0f")),
            color=alt.Color("measure:N", sort=[SPEND, REVENUE], title=None),
            tooltip=[
                alt.Tooltip("utcyearmonthdate(date):T", title="Day", format="%a %d %b %Y"),
                alt.Tooltip("measure:N", title="Measure"),
                alt.Tooltip("amount:Q", title="EUR", format="$,.2f"),
            ],
        )
        .properties(width=CHART_WIDTH, height=260)
    )
    table = _table(
        ["Day", "Spend", "Attributed revenue", "ROAS"],
        [
            (
                row["date"].isoformat(),
                _eur(row["cost"]),
                _eur(row["ihc_revenue"]),
                _ratio(row["roas"]),
            )
            for row in days.iter_rows(named=True)
        ],
    )
    return table, chart


def _shares_section(comparison: pl.DataFrame, order: list[str]) -> tuple[str, alt.LayerChart]:
    models = comparison["model"].unique(maintain_order=True).to_list()
    base = alt.Chart(comparison.select("model", "channel_name", "share", "share_low", "share_high"))
    y = alt.Y("channel_name:N", sort=order, title=None)
    y_offset = alt.YOffset("model:N", sort=models)
    color = alt.Color("model:N", sort=models, title="Model")
    intervals = base.mark_rule().encode(
        y=y, yOffset=y_offset, color=color, x="share_low:Q", x2="share_high:Q"
    )
    points = base.mark_point(filled=True, size=30).encode(
        y=y,
        yOffset=y_offset,
        color=color,
        x=alt.X("share:Q", title="Share of conversions", axis=alt.Axis(format=".0%")),
        tooltip=[
            alt.Tooltip("channel_name:N", title="Channel"),
            alt.Tooltip("model:N", title="Model"),
            alt.Tooltip("share:Q", title="Share", format=".1%"),
            alt.Tooltip("share_low:Q", title="95 % from", format=".1%"),
            alt.Tooltip("share_high:Q", title="95 % to", format=".1%"),
        ],
    )
    chart = alt.layer(intervals, points).properties(width=CHART_WIDTH, height=alt.Step(5))

    def cell(row: dict[str, Any]) -> str:
        if row["share"] is None:
            return "–"
        if row["share_low"] is None:
            return _percent(row["share"])
        return (
            f"{_percent(row['share'])} ({_percent(row['share_low'])}–{_percent(row['share_high'])})"
        )

    cells = {(r["channel_name"], r["model"]): cell(r) for r in comparison.iter_rows(named=True)}
    table = _table(
        ["Channel", *models],
        [[channel, *(cells.get((channel, m), "–") for m in models)] for channel in order],
    )
    return table, chart


def _section(title: str, how_to_read: str, chart_id: str | None, table: str) -> str:
    chart = f'<div class="chart" id="{chart_id}"></div>' if chart_id else ""
    return (
        f"<section><h2>{html.escape(title)}</h2>"
        f'<p class="how">{html.escape(how_to_read)}</p>{chart}{table}</section>'
    )


def _script_json(value: object) -> str:
    # "</" inside a script element would end it early: JSON allows "<\/" instead.
    return json.dumps(value).replace("</", "<\\/")


def _render_page(
    channel_report: pl.DataFrame,
    comparison: pl.DataFrame,
    *,
    title_info: dict[str, object],
    cache_dir: Path | None,
) -> str:
    """The report page as text (see ``write_html_report``)."""
    totals = channel_totals(channel_report)
    order = totals["channel_name"].to_list()
    order += sorted(set(comparison["channel_name"].to_list()) - set(order))
    sections: list[str] = []
    specs: dict[str, dict[str, Any]] = {}

    def add(title: str, how: str, built: tuple[str, alt.TopLevelMixin] | None, empty: str) -> None:
        if built is None:
            sections.append(_section(title, how, None, f"<p>{html.escape(empty)}</p>"))
            return
        chart_id = f"chart-{len(specs) + 1}"
        table, chart = built
        specs[chart_id] = chart.to_dict()
        sections.append(_section(title, how, chart_id, table))

    has_report = not channel_report.is_empty()
    add(
        "Spend and attributed revenue per channel",
        "Each channel's marketing spend next to the revenue the IHC attribution gives it; "
        "where the revenue bar is longer than the spend bar, the channel paid back.",
        _spend_revenue_section(totals, order) if has_report else None,
        "The channel report has no rows.",
    )
    add(
        "Return on ad spend (ROAS) and cost per order (CPO)",
        "ROAS above 1 means each euro spent brought back more than a euro of attributed "
        "revenue; CPO is what one attributed order cost. No spend: no ROAS; "
        "no attributed order: no CPO.",
        _efficiency_section(totals, order) if has_report else None,
        "The channel report has no rows.",
    )
    add(
        "Daily spend and attributed revenue",
        "Spend and IHC-attributed revenue of all channels per day (UTC, by session date); "
        "a gap that widens or closes shows the return changing over time.",
        _daily_section(report_totals(channel_report, "date").sort("date")) if has_report else None,
        "The channel report has no rows.",
    )
    add(
        "Channel shares under each model",
        "Each dot is the share of conversions a model gives the channel, the line through "
        "it its 95 % bootstrap interval; where the models' dots agree, the story does not "
        "hinge on the choice of model.",
        _shares_section(comparison, order) if not comparison.is_empty() else None,
        "No model comparison in this run.",
    )
    about = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"
        for key, value in title_info.items()
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Marketing attribution report</title>
<style>{STYLE}</style>
<script>{_vega_bundle(cache_dir)}</script>
</head>
<body>
<header><h1>Marketing attribution report</h1><table class="about">{about}</table></header>
{"".join(sections)}
<script>
const specs = {_script_json(specs)};
const options = {_script_json(EMBED_OPTIONS)};
for (const [id, spec] of Object.entries(specs)) {{
  vegaEmbed("#" + id, spec, options).catch((error) => {{
    document.getElementById(id).textContent = "This chart could not be drawn: " + error;
  }});
}}
</script>
</body>
</html>
"""


def write_html_report(
    channel_report: pl.DataFrame,
    comparison: pl.DataFrame,
    path: Path,
    *,
    title_info: dict[str, object],
    cache_dir: Path | None = None,
) -> Path:
    """Write the report page to ``path`` atomically.

    ``channel_report`` is the exported report (channel_name, date, cost, ihc, ihc_revenue,
    cpo, roas), ``comparison`` is ``tasks.models.compare_models``'s frame (may be empty),
    ``title_info`` the header's facts in display order (e.g. range, generated at,
    provider, synthetic data); ``cache_dir`` keeps the Vega bundle between runs.
    """
    page = _render_page(channel_report, comparison, title_info=title_info, cache_dir=cache_dir)
    write_atomically(path, lambda p: p.write_text(page, encoding="utf-8"))
    return path
