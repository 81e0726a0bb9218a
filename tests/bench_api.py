"""Throughput of the IHC client against the local server with a fixed latency.

With latency L and concurrency C the best a client can do is C / L requests per
second; this reports each run's requests/s, its share of that ideal, its speed-up
over sending one request at a time (C = 1), and, measured in the same command, what
a bare httpx loop posting the same bodies reaches (``bare_httpx_pct_of_ideal``) and
the client's time as a ratio of that loop's (``vs_bare_httpx``).

    python -m tests.bench_api [--conversions 20000] [--latency-ms 50] [--concurrency 1 4 16]
                              [--repeat 5]

The server runs in its own process by default (``--server thread`` keeps it in this
one), so the client's CPU time is measured, not the server's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Literal

import httpx
import polars as pl

from config.settings import ApiSettings
from tasks.batching import pack_batches
from tasks.ihc_client import ENDPOINT, attribute_journeys, request_body, wire_sessions
from tasks.ihc_server import ServerConfig, run_server
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


@contextlib.contextmanager
def _server(latency_ms: float, mode: Literal["process", "thread"]) -> Iterator[str]:
    if mode == "process":
        with ihc_server_process(BENCH_KEY, "--latency-ms", str(latency_ms)) as url:
            yield url
    else:
        with run_server(ServerConfig(api_key=BENCH_KEY, latency_ms=latency_ms)) as handle:
            yield handle.url


async def _bare_httpx(url: str, bodies: list[bytes], settings: ApiSettings) -> float:
    """Seconds for a plain loop of httpx posts of ``bodies``, C at a time.

    The same connections, ramp-up and request bytes as the client, and nothing else:
    no packing, no reading or checking of answers, no results. What any httpx client
    reaches against this server on this machine; the client's distance to it is its
    own cost.
    """
    target = f"{url}{ENDPOINT}?conv_type_id={settings.conv_type_id}"
    queue = iter(bodies)

    async def worker(number: int) -> None:
        await asyncio.sleep(number * settings.ramp_up_s / settings.concurrency)
        async with httpx.AsyncClient(
            verify=False,  # plain http: no TLS context to load (the client does the same)
            headers={"x-api-key": BENCH_KEY, "content-type": "application/json"},
            limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
            timeout=settings.timeout_s,
        ) as client:
            for body in queue:
                response = await client.post(target, content=body)
                response.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(worker(number) for number in range(settings.concurrency)))
    return time.perf_counter() - started


def run_api_benchmark(
    journeys: pl.DataFrame,
    latency_ms: float = 50,
    concurrencies: tuple[int, ...] = (1, 4, 16),
    server: Literal["process", "thread"] = "process",
    repeat: int = 1,
) -> list[dict[str, float]]:
    """Attributions of all ``journeys`` per concurrency; a row of figures for each.

    With ``repeat`` > 1 each concurrency runs that many times (client and bare loop
    alternating) and the row has the median run of each.
    """
    rows: list[dict[str, float]] = []
    packed = pack_batches(journeys, 100, 3000, "keep_recent")
    wire = wire_sessions(packed.sessions)
    bodies = [request_body(wire.slice(start, end - start), b"{}") for start, end in packed.bounds]
    with _server(latency_ms, server) as url:
        # Warm up the server and the client (imports, first connections) off the clock.
        warm = journeys.filter(
            pl.col("conversion_id").is_in(journeys["conversion_id"].head(50).implode())
        )
        attribute_journeys(warm, ApiSettings(base_url=url), BENCH_KEY)
        for concurrency in concurrencies:
            settings = ApiSettings(base_url=url, concurrency=concurrency)
            runs: list[tuple[float, float, float, int]] = []
            bare: list[tuple[float, float]] = []
            for _ in range(repeat):
                # The event loop runs in this thread: its CPU time is the loop's.
                cpu, loop_cpu = time.process_time(), time.thread_time()
                started = time.perf_counter()
                outcome = attribute_journeys(journeys, settings, BENCH_KEY)
                elapsed = time.perf_counter() - started
                cpu, loop_cpu = time.process_time() - cpu, time.thread_time() - loop_cpu
                if outcome.failed.height:
                    raise RuntimeError(f"benchmark run had failures: {outcome.failed.head()}")
                runs.append((elapsed, cpu, loop_cpu, outcome.stats.requests))
                bare_cpu = time.thread_time()
                bare_elapsed = asyncio.run(_bare_httpx(url, bodies, settings))
                bare.append((bare_elapsed, time.thread_time() - bare_cpu))
            elapsed, cpu, loop_cpu, requests = sorted(runs)[len(runs) // 2]
            bare_s, bare_loop_cpu = sorted(bare)[len(bare) // 2]
            rate = requests / elapsed
            ideal = concurrency / (latency_ms / 1000)
            rows.append(
                {
                    "concurrency": concurrency,
                    "requests": requests,
                    "elapsed_s": round(elapsed, 3),
                    "requests_per_s": round(rate, 1),
                    "ideal_per_s": round(ideal, 1),
                    "pct_of_ideal": round(100 * rate / ideal, 1),
                    # A client that cost nothing, against a server answering in exactly L:
                    # the requests go out in ceil(requests / C) rounds of L each.
                    "ceiling_pct_of_ideal": round(
                        100 * requests / (math.ceil(requests / concurrency) * concurrency), 1
                    ),
                    "conversions_per_s": round(outcome.stats.conversions_sent / elapsed, 1),
                    # Client CPU per request, all threads, and the event loop's alone.
                    "client_cpu_ms_per_request": round(1000 * cpu / requests, 2),
                    "loop_cpu_ms_per_request": round(1000 * loop_cpu / requests, 2),
                    "bare_loop_cpu_ms_per_request": round(1000 * bare_loop_cpu / len(bodies), 2),
                    "bare_httpx_pct_of_ideal": round(100 * len(bodies) / bare_s / ideal, 1),
                    "vs_bare_httpx": round(bare_s / elapsed, 3),
                    "runs_pct_of_ideal": [round(100 * n / e / ideal, 1) for e, _, _, n in runs],
                }
            )
    sequential = next((row["requests_per_s"] for row in rows if row["concurrency"] == 1), None)
    for row in rows:
        row["vs_sequential"] = round(row["requests_per_s"] / sequential, 2) if sequential else 0.0
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_api", description=__doc__)
    parser.add_argument("--conversions", type=int, default=20_000)
    parser.add_argument("--latency-ms", type=float, default=50)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per concurrency; the median is reported"
    )
    args = parser.parse_args(argv)
    journeys = synthetic_journeys(args.conversions)
    print(
        f"{args.conversions} conversions, {journeys.height} sessions, "
        f"latency {args.latency_ms:g} ms, server in a {args.server}",
        flush=True,
    )
    rows = run_api_benchmark(
        journeys, args.latency_ms, tuple(args.concurrency), server=args.server, repeat=args.repeat
    )
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
