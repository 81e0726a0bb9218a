"""The run summary: counts and totals for the log and the Prefect UI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl
from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

REPORT_ARTIFACT_KEY = "channel-report"
SUMMARY_ARTIFACT_KEY = "attribution-run-summary"


@dataclass
class RunSummary:
    start_date: str | None
    end_date: str | None
    provider: str
    synthetic_data: bool = False
    source_cache_hit: bool = False
    conversions_in_range: int = 0
    conversions_with_journey: int = 0
    journey_sessions: int = 0
    unattributed_no_journey: int = 0
    already_attributed_skipped: int = 0
    sent_conversions: int = 0
    attributed_conversions: int = 0
    failed_conversions: int = 0
    failure_reasons: dict[str, int] = field(default_factory=dict)
    truncated_journeys: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    invalid_rows: dict[str, int] = field(default_factory=dict)
    rows_written: int = 0
    report_rows_exported: int = 0
    total_cost: float = 0.0
    total_ihc: float = 0.0
    attributed_revenue: float = 0.0
    overall_cpo: float | None = None
    overall_roas: float | None = None
    best_channels: list[dict[str, Any]] = field(default_factory=list)
    worst_channels: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def log_lines(self) -> list[str]:
        cpo = "n/a" if self.overall_cpo is None else f"{self.overall_cpo:,.2f}"
        roas = "n/a" if self.overall_roas is None else f"{self.overall_roas:,.4f}"
        lines = [
            f"range {self.start_date or 'start'} .. {self.end_date or 'end'}, "
            f"provider {self.provider}",
            f"conversions in range {self.conversions_in_range}: with journey "
            f"{self.conversions_with_journey} ({self.journey_sessions} sessions), "
            f"without journey (unattributed) {self.unattributed_no_journey}, "
            f"already attributed {self.already_attributed_skipped}",
            f"sent {self.sent_conversions}, attributed {self.attributed_conversions}, "
            f"failed {self.failed_conversions}, truncated journeys {self.truncated_journeys}, "
            f"requests {self.requests}, retries {self.retries}",
            f"report: cost {self.total_cost:,.2f} EUR, ihc {self.total_ihc:,.4f}, "
            f"attributed revenue {self.attributed_revenue:,.2f} EUR, CPO {cpo}, ROAS {roas}",
        ]
        if self.failure_reasons:
            lines.append(f"failure reasons: {self.failure_reasons}")
        if self.invalid_rows:
            lines.append(f"excluded source rows: {self.invalid_rows}")
        return lines

    def to_markdown(self) -> str:
        def money(value: float | None) -> str:
            return "—" if value is None else f"{value:,.2f}"

        def ratio(value: float | None) -> str:
            return "—" if value is None else f"{value:,.4f}"

        rows = [
            ("Range (conversion dates)", f"{self.start_date or '—'} … {self.end_date or '—'}"),
            ("Provider", self.provider),
            ("Synthetic sample data", "yes" if self.synthetic_data else "no"),
            ("Source tables served from cache", "yes" if self.source_cache_hit else "no"),
            ("Conversions in range", self.conversions_in_range),
            ("Conversions with a journey", self.conversions_with_journey),
            ("Journey sessions", self.journey_sessions),
            ("Unattributed (no session before the conversion)", self.unattributed_no_journey),
            ("Already attributed, not sent again", self.already_attributed_skipped),
            ("Sent for attribution", self.sent_conversions),
            ("Attributed in this run", self.attributed_conversions),
            ("Failed conversions", self.failed_conversions),
            ("Truncated journeys", self.truncated_journeys),
            (
                "API requests / retries / cache hits",
                f"{self.requests} / {self.retries} / {self.cache_hits}",
            ),
            ("Total cost (EUR)", money(self.total_cost)),
            ("Attributed conversions (Σ ihc)", ratio(self.total_ihc)),
            ("Attributed revenue (EUR)", money(self.attributed_revenue)),
            ("Overall CPO (EUR)", money(self.overall_cpo)),
            ("Overall ROAS", ratio(self.overall_roas)),
        ]
        out = ["# Attribution run summary", "", "| | |", "|---|---|"]
        out += [f"| {name} | {value} |" for name, value in rows]
        if self.failure_reasons:
            out += ["", "## Failed conversions", "", "| reason | conversions |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in sorted(self.failure_reasons.items())]
        if self.invalid_rows:
            out += ["", "## Excluded source rows", "", "| table: reason | rows |", "|---|---|"]
            out += [f"| {k} | {v} |" for k, v in sorted(self.invalid_rows.items())]
        for title, channels in (
            ("Best channels by ROAS", self.best_channels),
            ("Worst channels by ROAS", self.worst_channels),
        ):
            out += ["", f"## {title}", "", "| channel | cost | ihc | revenue | ROAS |"]
            out += ["|---|---|---|---|---|"]
            out += [
                f"| {c['channel_name']} | {money(c['cost'])} | {ratio(c['ihc'])} | "
                f"{money(c['ihc_revenue'])} | {ratio(c['roas'])} |"
                for c in channels
            ]
        out += ["", "## Files", ""] + [f"- `{f}`" for f in self.files]
        return "\n".join(out) + "\n"


def add_report_totals(summary: RunSummary, report: pl.DataFrame) -> None:
    """Totals, overall CPO/ROAS and the three best and worst channels by ROAS."""
    cost = float(report["cost"].sum())
    ihc = float(report["ihc"].sum())
    revenue = float(report["ihc_revenue"].sum())
    summary.report_rows_exported = report.height
    summary.total_cost = cost
    summary.total_ihc = ihc
    summary.attributed_revenue = revenue
    summary.overall_cpo = cost / ihc if ihc else None
    summary.overall_roas = revenue / cost if cost else None
    per_channel = (
        report.group_by("channel_name")
        .agg(pl.col("cost", "ihc", "ihc_revenue").sum())
        .filter(pl.col("cost") > 0)
        .with_columns(roas=pl.col("ihc_revenue") / pl.col("cost"))
        .sort(["roas", "channel_name"], descending=[True, False])
    )
    summary.best_channels = per_channel.head(3).to_dicts()
    summary.worst_channels = per_channel.reverse().head(3).to_dicts()


def report_table(report: pl.DataFrame) -> list[dict[str, Any]]:
    """JSON-safe rows: dates as text, NULL cpo/roas as empty strings."""
    return report.with_columns(
        pl.col("date").dt.strftime("%Y-%m-%d"),
        *[
            pl.col(c).round(6).cast(pl.String).fill_null("")
            for c in ("cost", "ihc", "ihc_revenue", "cpo", "roas")
        ],
    ).to_dicts()


@task(name="publish-run-artifacts", cache_policy=NO_CACHE)
def publish_artifacts_task(summary: RunSummary, report: pl.DataFrame) -> None:
    create_table_artifact(
        key=REPORT_ARTIFACT_KEY,
        table=report_table(report),
        description="channel_reporting with CPO and ROAS for the run's date range",
    )
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown=summary.to_markdown(),
        description="What this attribution run did",
    )
