"""The HTML report: its numbers, its offline page, and its charts drawn by a real browser."""

from __future__ import annotations

import re
import shutil
import subprocess
from datetime import date
from pathlib import Path

import polars as pl
import pytest

from tasks.models import COMPARISON_SCHEMA
from tasks.report_html import write_html_report

CHANNEL_REPORT = pl.DataFrame(
    {
        "channel_name": ["Email", "Email", "Search <Brand>", "Search <Brand>", "Display"],
        "date": [date(2023, 9, 1), date(2023, 9, 2)] * 2 + [date(2023, 9, 2)],
        "cost": [0.0, 0.0, 12_000.0, 345.67, 500.0],
        "ihc": [1.5, 0.5, 10.0, 2.0, 0.0],
        "ihc_revenue": [150.0, 50.0, 20_000.0, 1_000.0, 0.0],
    }
).with_columns(
    cpo=pl.when(pl.col("ihc") != 0).then(pl.col("cost") / pl.col("ihc")),
    roas=pl.when(pl.col("cost") != 0).then(pl.col("ihc_revenue") / pl.col("cost")),
)


def comparison_rows() -> pl.DataFrame:
    rows = []
    for model, shares in {"linear": (0.123, 0.8, 0.077), "markov_1": (0.2, 0.7, 0.1)}.items():
        for channel, share in zip(["Display", "Email", "Search <Brand>"], shares, strict=True):
            rows.append(
                (model, channel, share * 14, share * 21_200, share, share * 0.9, share * 1.1)
            )
    return pl.DataFrame(
        [(*r, 0.0, None, None) for r in rows], schema=COMPARISON_SCHEMA, orient="row"
    )


TITLE_INFO = {
    "Range": "2023-09-01 – 2023-09-02",
    "Generated at": "2023-09-03 06:00 UTC",
    "Provider": "local model",
    "Synthetic data": "yes",
}


@pytest.fixture
def page(tmp_path: Path) -> Path:
    return write_html_report(
        CHANNEL_REPORT, comparison_rows(), tmp_path / "out" / "report.html", title_info=TITLE_INFO
    )


def test_the_page_needs_no_network(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\ssrc=", text)
    assert not re.search(r"<link[^>]*href=[\"']?(https?:)?//", text)
    assert not re.search(r"url\([\"']?(https?:)?//", text)
    assert "@import" not in text
    # Only the page, written through a temporary file that is gone.
    assert [p.name for p in page.parent.iterdir()] == ["report.html"]


def test_numbers_are_formatted_for_people(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    # Search <Brand>: spend 12,345.67, revenue 21,000, 12 orders → CPO 1,028.81, ROAS 1.70.
    assert '<td>Search &lt;Brand&gt;</td><td class="n">€12,345.67</td>' in text
    assert "€21,000.00" in text
    assert "€1,028.81" in text
    assert ">1.70<" in text
    # Email has no spend: no ROAS; Display no attributed order: no CPO.
    assert '<td>Email</td><td class="n">–</td><td class="n">€0.00</td>' in text
    assert '<td>Display</td><td class="n">0.00</td><td class="n">–</td>' in text
    # Shares with their interval, per model.
    assert "12.3% (11.1%–13.5%)" in text
    for key, value in TITLE_INFO.items():
        assert f"<th>{key}</th><td>{value}</td>" in text


def test_channels_are_sorted_by_spend(page: Path) -> None:
    text = page.read_text(encoding="utf-8")
    table = text.split("<h2>Spend and attributed revenue per channel</h2>")[1].split("</table>")[0]
    assert table.index("Search &lt;Brand&gt;") < table.index("Display") < table.index("Email")


def test_an_empty_comparison_says_so(tmp_path: Path) -> None:
    empty = pl.DataFrame(schema=COMPARISON_SCHEMA)
    text = write_html_report(
        CHANNEL_REPORT, empty, tmp_path / "report.html", title_info=TITLE_INFO
    ).read_text(encoding="utf-8")
    assert "No model comparison in this run." in text
    assert text.count('class="chart"') == 3


def page_with_cache(path: Path, cache_dir: Path) -> str:
    """A new process's page: the per-process memo of the bundle cleared first."""
    from tasks import report_html

    report_html._vega_bundle.cache_clear()
    page = write_html_report(
        CHANNEL_REPORT, comparison_rows(), path, title_info=TITLE_INFO, cache_dir=cache_dir
    )
    return page.read_text(encoding="utf-8")


def test_later_runs_read_the_vega_bundle_from_the_cache_folder(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    first = page_with_cache(tmp_path / "a.html", cache_dir)
    (bundle,) = cache_dir.glob("vega-bundle-*.js")
    assert bundle.read_text(encoding="utf-8") in first
    # A later run takes the file, not a new build.
    bundle.write_text("/* from the cache */" + bundle.read_text(encoding="utf-8"))
    assert "/* from the cache */" in page_with_cache(tmp_path / "b.html", cache_dir)
    assert [p.name for p in cache_dir.iterdir()] == [bundle.name]


def test_a_cache_folder_that_cannot_be_written_does_not_stop_the_report(tmp_path: Path) -> None:
    from tasks.report_html import _vega_bundle

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    text = page_with_cache(tmp_path / "report.html", blocked / "cache")
    # The bundle built on the spot is in the page; the file in the way is untouched.
    assert _vega_bundle(None) in text
    assert blocked.read_text() == "not a folder"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(
    _chromium() is None, reason="chromium is not installed (apt-get install -y chromium)"
)
def test_charts_render_offline_in_a_browser(page: Path, tmp_path: Path) -> None:
    chromium = _chromium()
    assert chromium is not None
    result = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            # Network off: every host resolves to nothing and every proxy connection fails.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=http://127.0.0.1:9",
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    dom = result.stdout
    charts = re.findall(r'<div class="chart[^"]*" id="(chart-\d+)"', dom)
    assert charts == ["chart-1", "chart-2", "chart-3", "chart-4"]
    # vega-embed draws each chart as one <svg class="marks"> inside its div.
    assert len(re.findall(r'<svg[^>]*class="marks"', dom)) == len(charts)
    assert not re.search(r'id="chart-\d+">This chart could not be drawn', dom)
