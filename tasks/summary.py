"""The run summary: counts and totals for the log, and a page that explains itself in the UI.

The summary sets the run's range (conversion dates) beside the whole report (every
session date with spend or attribution): report dates are session dates, so a run of
one day's conversions changes report rows of earlier days too, and the report always
holds every date.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import polars as pl
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from config.errors import AttributionRunError, PipelineError
from tasks.attribution import AttributionOutcome
from tasks.export import FAILED_CSV, channel_totals
from tasks.journeys import JourneySet
from tasks.sources import Sources

REPORT_ARTIFACT_KEY = "channel-report"
SUMMARY_ARTIFACT_KEY = "attribution-run-summary"
# Channels named in the summary as the models' largest disagreements.
DISAGREEMENTS_SHOWN = 3


def eur(value: float | None) -> str:
    return "n/a" if value is None else f"€{value:,.2f}"


def number(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


@dataclass
class RunSummary:
    """What a run did. Figures named ``total_*``, ``attributed_revenue`` and ``overall_*``
    are the whole report's; ``range_*`` the conversions of the run's range."""

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
    range_attributed_conversions: int = 0
    range_attributed_revenue: float = 0.0
    report_rows_exported: int = 0
    report_first_date: str | None = None
    report_last_date: str | None = None
    total_cost: float = 0.0
    total_ihc: float = 0.0
    attributed_revenue: float = 0.0
    overall_cpo: float | None = None
    overall_roas: float | None = None
    channels: list[dict[str, Any]] = field(default_factory=list)
    model_disagreements: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def range_text(self) -> str:
        if self.start_date is None and self.end_date is None:
            return "all conversion dates"
        return f"conversion dates {self.start_date or 'first'} to {self.end_date or 'last'}"

    def log_lines(self) -> list[str]:
        lines = [
            f"Run of {self.range_text}, provider {self.provider}"
            + (", SYNTHETIC sample data" if self.synthetic_data else ""),
            f"conversions in range {self.conversions_in_range}: with journey "
            f"{self.conversions_with_journey} ({self.journey_sessions} sessions), "
            f"without journey (unattributed) {self.unattributed_no_journey}, "
            f"already attributed {self.already_attributed_skipped}",
            f"sent {self.sent_conversions}, attributed {self.attributed_conversions}, "
            f"failed {self.failed_conversions}, truncated journeys {self.truncated_journeys}, "
            f"requests {self.requests}, retries {self.retries}",
            f"whole report ({self.report_rows_exported} channel-days): spend "
            f"{eur(self.total_cost)}, attributed orders {number(self.total_ihc)}, attributed "
            f"revenue {eur(self.attributed_revenue)}, CPO {eur(self.overall_cpo)}, "
            f"ROAS {number(self.overall_roas, 2)}",
        ]
        if self.failure_reasons:
            lines.append(f"failure reasons: {self.failure_reasons}")
        if self.invalid_rows:
            lines.append(f"excluded source rows: {self.invalid_rows}")
        return lines

    def to_markdown(self) -> str:
        out = [f"# Attribution run: {self.range_text}", ""]
        if self.synthetic_data:
            out += ["> **SYNTHETIC sample data**: this report is not based on real data.", ""]
        if self.conversions_in_range == 0:
            out += ["> **No conversions in this range**: nothing was attributed.", ""]
        failed_file = next((f for f in self.files if f.endswith(FAILED_CSV)), None)
        if self.failed_conversions and failed_file:
            out += [
                f"> **The run failed**: {self.failed_conversions:,} conversion(s) could not be "
                f"attributed; they are listed in [{FAILED_CSV}]({_link(failed_file)}) "
                "and sent again by the next run. The rest was written.",
                "",
            ]
        api = f"{self.requests} / {self.retries} / {self.cache_hits}"
        out += [
            f"## This run: {self.range_text}",
            "",
            "| | |",
            "|---|---|",
            f"| Conversions in the range | {self.conversions_in_range:,} |",
            f"| … with a journey | {self.conversions_with_journey:,} "
            f"({self.journey_sessions:,} sessions) |",
            f"| … without a session before them (unattributed) | "
            f"{self.unattributed_no_journey:,} |",
            f"| Already attributed, not sent again | {self.already_attributed_skipped:,} |",
            f"| Attributed in this run | {self.attributed_conversions:,} "
            f"({self.provider} provider) |",
            f"| Failed (sent again by the next run) | {self.failed_conversions:,} |",
            f"| Journeys cut to their most recent sessions | {self.truncated_journeys:,} |",
            f"| IHC API requests / retries / cache hits | {api} |",
            f"| Conversions of the range attributed now | "
            f"{self.range_attributed_conversions:,}, revenue "
            f"{eur(self.range_attributed_revenue)} |",
            "",
            f"## The whole report: session dates {self.report_first_date or 'n/a'} to "
            f"{self.report_last_date or 'n/a'}",
            "",
            "The exported report always holds every channel and day. Its dates are the "
            "sessions' dates: a conversion's journey reaches back to earlier days, so this "
            "run's range and the report's dates differ, and the report's totals include "
            "every conversion attributed so far.",
            "",
            "| Spend | Attributed orders | Attributed revenue | CPO | ROAS |",
            "|---:|---:|---:|---:|---:|",
            f"| {eur(self.total_cost)} | {number(self.total_ihc)} | "
            f"{eur(self.attributed_revenue)} | {eur(self.overall_cpo)} | "
            f"{number(self.overall_roas, 2)} |",
            "",
            "### Channels, by spend",
            "",
            "| Channel | Spend | Attributed orders | Attributed revenue | CPO | ROAS |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {c['channel_name']} | {eur(c['cost'])} | {number(c['ihc'])} | "
            f"{eur(c['ihc_revenue'])} | {eur(c['cpo'])} | {number(c['roas'], 2)} |"
            for c in self.channels
        ]
        html = next((f for f in self.files if f.endswith(".html")), None)
        if self.model_disagreements or html:
            out += ["", "## Other attribution models", ""]
            if self.model_disagreements:
                out += [
                    "Where the models disagree most on a channel's share of the range's "
                    "conversions:",
                    "",
                    *[f"- {line}" for line in self.model_disagreements],
                    "",
                ]
            if html:
                out += [
                    f"Charts and every model's shares with intervals: [report.html]({_link(html)})"
                ]
        if self.failure_reasons:
            out += ["", "## Failed conversions", "", "| Reason | Conversions |", "|---|---:|"]
            out += [f"| {k} | {v:,} |" for k, v in sorted(self.failure_reasons.items())]
        if self.invalid_rows:
            out += ["", "## Excluded source rows", "", "| Table: reason | Rows |", "|---|---:|"]
            out += [f"| {k} | {v:,} |" for k, v in sorted(self.invalid_rows.items())]
        out += ["", "## Files", ""] + [f"- [{Path(f).name}]({_link(f)}): `{f}`" for f in self.files]
        return "\n".join(out) + "\n"


def _link(path: str) -> str:
    return Path(path).resolve().as_uri()


def model_disagreements(comparison: pl.DataFrame, shown: int = DISAGREEMENTS_SHOWN) -> list[str]:
    """The channels whose share differs most between models, as sentences."""
    if comparison.is_empty():
        return []
    spread = (
        comparison.group_by("channel_name")
        .agg(
            low=pl.col("share").min(),
            low_model=pl.col("model").sort_by("share").first(),
            high=pl.col("share").max(),
            high_model=pl.col("model").sort_by("share").last(),
            ihc=pl.col("share").filter(pl.col("model") == "ihc").first(),
        )
        .with_columns(gap=pl.col("high") - pl.col("low"))
        .filter(pl.col("gap") > 0)
        .sort(["gap", "channel_name"], descending=[True, False])
        .head(shown)
    )
    return [
        f"**{row['channel_name']}**: {percent(row['low'])} ({row['low_model']}) to "
        f"{percent(row['high'])} ({row['high_model']}); IHC {percent(row['ihc'])}"
        for row in spread.to_dicts()
    ]


def summarize(
    *,
    start: date | None,
    end: date | None,
    synthetic: bool,
    sources: Sources,
    journey_set: JourneySet,
    attributed: pl.DataFrame,
    skipped: int,
    outcome: AttributionOutcome,
    report: pl.DataFrame,
    comparison: pl.DataFrame,
    files: list[Path | None],
) -> RunSummary:
    """The run summary from the stages' outcomes, logged line by line.

    ``attributed`` holds the attribution rows written before this run.
    """
    done_now = pl.concat(
        [attributed["conv_id"], outcome.results["conversion_id"].alias("conv_id")]
    ).unique()
    range_done = journey_set.conversions_in_range.filter(
        pl.col("conv_id").is_in(done_now.implode())
    )
    cost, ihc = float(report["cost"].sum()), float(report["ihc"].sum())
    revenue = float(report["ihc_revenue"].sum())
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
        range_attributed_conversions=range_done.height,
        range_attributed_revenue=float(range_done["revenue"].sum()),
        report_rows_exported=report.height,
        report_first_date=str(report["date"].min()) if report.height else None,
        report_last_date=str(report["date"].max()) if report.height else None,
        total_cost=cost,
        total_ihc=ihc,
        attributed_revenue=revenue,
        overall_cpo=_ratio(cost, ihc),
        overall_roas=_ratio(revenue, cost),
        channels=channel_totals(report).to_dicts(),
        model_disagreements=model_disagreements(comparison),
        files=[str(path) for path in files if path is not None],
    )
    logger = get_run_logger()
    for line in summary.log_lines():
        logger.info(line)
    if summary.conversions_in_range == 0:
        logger.warning("No conversions in the range (%s): nothing to attribute", summary.range_text)
    return summary


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
        description="channel_reporting with CPO and ROAS, every channel and day",
    )
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown=summary.to_markdown(),
        description="What this attribution run did",
    )


def publish_failure(error: PipelineError) -> None:
    """The summary of a run that stopped for a known reason before its own summary."""
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT_KEY,
        markdown=(
            "# Attribution run failed\n\n"
            f"**{type(error).__name__}**: {error}\n\n"
            "The run stopped before its summary: the database and the report files are as "
            "the last run that wrote them left them.\n"
        ),
        description="Why this attribution run failed",
    )


def raise_for_failed_conversions(summary: RunSummary) -> None:
    """Fail the run (after its writes) when conversions failed attribution."""
    if summary.failed_conversions:
        failed_file = next((f for f in summary.files if f.endswith(FAILED_CSV)), None)
        raise AttributionRunError(
            f"{summary.failed_conversions} conversion(s) failed ({summary.failure_reasons}); "
            f"they are listed in {failed_file} and are sent again by the next run"
        )
