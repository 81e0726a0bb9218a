"""Throughput of the IHC client against a bare loop of stock httpx posts.

Against the local IHC server in its own process with a fixed latency L, for each
(concurrency C, L) case it times ``attribute_journeys`` on synthetic journeys and, in the
same command, a bare loop that posts the very same request bodies through one stock
``httpx.AsyncClient`` with C workers and does nothing else (no packing, no reading or
checking of answers). ``client_vs_bare`` is the client's throughput as a share of the
bare loop's: what the client's own work costs. Runs alternate client and bare loop; the
median of ``--repeat`` runs is reported.

    python -m tests.bench_api [--conversions 20000] [--case 16:100 4:300] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from datetime import datetime

import httpx
import polars as pl

from config.settings import ApiSettings
from tasks.batching import pack_batches
from tasks.ihc_client import ENDPOINT, attribute_journeys, request_body
from tests.helpers import ihc_server_process

BENCH_KEY = "bench-key"
CHANNELS = ["Direct Traffic", "Paid Search Brand", "SEO", "Email", "Display", "Social Paid"]


def synthetic_journeys(conversions: int = 20_000, seed: int = 7) -> pl.DataFrame:
    """Journeys of 1–12 sessions (mean ≈ 4), sorted as the pipeline hands them over."""
    rng = random.Random(seed)
    sizes = [min(12, 1 + int(rng.expovariate(1 / 3))) for _ in range(conversions)]
    frame = pl.DataFrame({"conversion": range(conversions), "sessions": sizes})
    sessions = (
        frame.select(pl.col("conversion").repeat_by("sessions").explode())
        .with_columns(position=pl.int_range(pl.len()).over("conversion"))
        .with_columns(last=pl.col("position") == pl.len().over("conversion") - 1)
    )
    mix = (pl.col("conversion") * 7919 + pl.col("position") * 104729) % 1000
    return sessions.select(
        conversion_id=pl.format("conv-{}", pl.col("conversion").cast(pl.String).str.zfill(6)),
        session_id=pl.format("sess-{}-{}", "conversion", "position"),
        timestamp=pl.lit(datetime(2023, 9, 1))
        + pl.duration(hours=pl.col("conversion") % 500 + pl.col("position") * 9 + mix % 7),
        channel_label=pl.lit(pl.Series(CHANNELS)).gather(mix % len(CHANNELS)),
        holder_engagement=(mix % 3 == 0).cast(pl.Int8),
        closer_engagement=(mix % 4 == 0).cast(pl.Int8),
        impression_interaction=(mix % 5 == 0).cast(pl.Int8),
        conversion=pl.col("last").cast(pl.Int8),
    ).sort("conversion_id", "timestamp", "session_id")


async def _bare_httpx(url: str, bodies: list[bytes], settings: ApiSettings) -> float:
    """Seconds for C workers posting ``bodies`` through one stock client, nothing else."""
    pending = iter(bodies)
    limits = httpx.Limits(
        max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency
    )
    async with httpx.AsyncClient(
        headers={"x-api-key": BENCH_KEY}, limits=limits, timeout=settings.timeout_s
    ) as client:

        async def worker() -> None:
            for body in pending:
                response = await client.post(
                    f"{url}{ENDPOINT}",
                    params={"conv_type_id": settings.conv_type_id},
                    content=body,
                    headers={"content-type": "application/json"},
                )
                response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(settings.concurrency)))
        return time.perf_counter() - started


def run_api_benchmark(
    journeys: pl.DataFrame, cases: list[tuple[int, float]], repeat: int = 3
) -> list[dict[str, object]]:
    """One row of figures per (concurrency, latency_ms) case."""
    packed = pack_batches(journeys, 100, 3000, "keep_recent")
    bodies = [request_body(batch, b"{}") for batch in packed.batches]
    rows: list[dict[str, object]] = []
    for concurrency, latency_ms in cases:
        with ihc_server_process(BENCH_KEY, "--latency-ms", str(latency_ms)) as url:
            settings = ApiSettings(base_url=url, concurrency=concurrency)
            # Imports, first connections and the server's first model calls, off the clock.
            attribute_journeys(journeys.head(500), settings, BENCH_KEY)
            client_s: list[float] = []
            bare_s: list[float] = []
            for _ in range(repeat):
                started = time.perf_counter()
                outcome = attribute_journeys(journeys, settings, BENCH_KEY)
                client_s.append(time.perf_counter() - started)
                if outcome.failed.height:
                    raise RuntimeError(f"benchmark run had failures: {outcome.failed.head()}")
                bare_s.append(asyncio.run(_bare_httpx(url, bodies, settings)))
        client, bare = statistics.median(client_s), statistics.median(bare_s)
        ideal = concurrency / (latency_ms / 1000)
        rows.append(
            {
                "concurrency": concurrency,
                "latency_ms": latency_ms,
                "requests": len(bodies),
                "client_requests_per_s": round(len(bodies) / client, 1),
                "bare_requests_per_s": round(len(bodies) / bare, 1),
                "ideal_requests_per_s": round(ideal, 1),
                "client_vs_bare_pct": round(100 * bare / client, 1),
                "runs_client_vs_bare_pct": [
                    round(100 * b / c, 1) for c, b in zip(client_s, bare_s, strict=True)
                ],
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_api", description=__doc__)
    parser.add_argument("--conversions", type=int, default=20_000)
    parser.add_argument(
        "--case",
        nargs="+",
        default=["16:100", "4:300"],
        help="CONCURRENCY:LATENCY_MS pairs (default: the targets' cases)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per case; median reported")
    args = parser.parse_args(argv)
    cases = [(int(c), float(latency)) for c, latency in (case.split(":") for case in args.case)]
    journeys = synthetic_journeys(args.conversions)
    print(f"{args.conversions} conversions, {journeys.height} sessions", flush=True)
    for row in run_api_benchmark(journeys, cases, args.repeat):
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
