"""The run summary: counts and totals for the log and the Prefect UI."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from config.errors import AttributionRunError
from tasks.attribution import AttributionOutcome
from tasks.export import FAILED_CSV
from tasks.journeys import JourneySet
from tasks.persist import WriteOutcome
from tasks.sources import Sources

REPORT_ARTIFACT_KEY = "channel-report"
SUMMARY_ARTIFACT_KEY = "attribution-run-summary"


@dataclass
class RunSummary:
    start_date: str | None
    end_date: str | None
    provider: str
    synthetic_data: bool = False
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


def summarize(
    *,
    start: date | None,
    end: date | None,
    synthetic: bool,
    sources: Sources,
    journey_set: JourneySet,
    skipped: int,
    outcome: AttributionOutcome,
    written: WriteOutcome,
    report: pl.DataFrame,
    files: list[Path | None],
) -> RunSummary:
    """The run summary from the stages' outcomes, logged line by line."""
    summary = RunSummary(
        start_date=start.isoformat() if start else None,
        end_date=end.isoformat() if end else None,
        provider=outcome.provider,
        synthetic_data=synthetic,
        conversions_in_range=journey_set.conversions_in_range.height,
        conversions_with_journey=journey_set.conversion_count,
        journey_sessions=journey_set.journeys.height,
        unattributed_no_journey=journey_set.without_journey.height,
        already_attributed_skipped=skipped,
        sent_conversions=journey_set.conversion_count - skipped,
        attributed_conversions=outcome.results["conversion_id"].n_unique(),
        failed_conversions=outcome.failed.height,
        failure_reasons=outcome.failure_reasons(),
        truncated_journeys=outcome.truncated_journeys,
        requests=outcome.requests,
        retries=outcome.retries,
        cache_hits=outcome.cache_hits,
        invalid_rows=sources.invalid_row_counts(),
        rows_written=written.rows_written,
        files=[str(path) for path in files if path is not None],
    )
    _add_report_totals(summary, report)
    logger = get_run_logger()
    for line in summary.log_lines():
        logger.info(line)
    return summary


def _add_report_totals(summary: RunSummary, report: pl.DataFrame) -> None:
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


def publish_summary(summary: RunSummary, report: pl.DataFrame) -> None:
    """The run's artifacts; call it from the flow, so they belong to the flow run."""
    create_table_artifact(
        key=REPORT_ARTIFACT_KEY,
        table=report_table(report),
        description="channel_reporting with CPO and ROAS",
    )
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown=summary.to_markdown(),
        description="What this attribution run did",
    )


def raise_for_failed_conversions(summary: RunSummary) -> None:
    """Fail the run (after its writes) when conversions failed attribution."""
    if summary.failed_conversions:
        failed_file = next((f for f in summary.files if f.endswith(FAILED_CSV)), None)
        raise AttributionRunError(
            f"{summary.failed_conversions} conversion(s) failed ({summary.failure_reasons}); "
            f"they are listed in {failed_file} and are sent again by the next run"
        )
