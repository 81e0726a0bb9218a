"""An IHC-compatible attribution server on loopback, with fault injection, for tests and benchmarks.

The contract of ``shared/spec/ihc-api.md`` answered by the local model, as a Starlette app
served by uvicorn, one model call per request in a worker thread. Run it with ``python -m
tasks.ihc_server --port 8765 --api-key KEY [fault options]``, or from tests with
``run_server(ServerConfig(...))``.

Choices where the contract is silent:

- The HTTP status equals the body's ``statusCode``; errors answer ``{"statusCode": code,
  "message": …}``. ``GET /_stats`` returns what the server saw, as JSON.
- A journey is answered with 406 in ``partialFailureErrors`` when a session lacks
  ``session_id`` or ``channel_label``, has a timestamp that is not ``%Y-%m-%d %H:%M:%S``
  (optionally `` %z``) or a flag outside {0, 1}, repeats a ``session_id``, or when the
  journey has not exactly one session with ``conversion = 1`` or a session after it.
- ``latency_ms`` is a floor on the response time from the request's arrival.
- Injected partial failures are listed with statusCode 500; injected wrong sums scale a
  journey's ihc by 0.8. "drop" closes the connection without an answer; "timeout" holds
  it for ``timeout_hold_s`` (or until the client leaves), then closes; "malformed" sends
  half the body.
- Faults are deterministic under ``seed``: they depend only on the seed, the body and how
  often that exact body was seen before. ``script`` fixes the faults of the first
  attempts of every distinct body; after it, the rates apply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import logging
import random
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from email.utils import formatdate
from typing import Any

import orjson
import polars as pl
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from config.settings import LocalModelSettings, RedistributionParameter
from tasks.local_model import INPUT_COLUMNS, compute_ihc

logger = logging.getLogger(__name__)

PATH = "/v1/compute_ihc"
FAULTS = ("ok", "429", "500", "503", "malformed", "drop", "timeout")
FLAGS = ("holder_engagement", "closer_engagement", "impression_interaction", "conversion")
WRONG_SUM_FACTOR = 0.8
INJECTED_MESSAGE = "journey could not be attributed (injected partial failure)"


@dataclass(frozen=True)
class ServerConfig:
    """What the server accepts and which faults it injects (rates are probabilities)."""

    api_key: str
    host: str = "127.0.0.1"
    port: int = 0
    max_journeys: int = 100
    max_sessions: int = 3000
    model: LocalModelSettings = field(default_factory=LocalModelSettings)
    seed: int = 0
    latency_ms: float = 0.0
    # Per request, in this order of precedence when drawn.
    rate_429: float = 0.0
    rate_500: float = 0.0
    rate_503: float = 0.0
    malformed_rate: float = 0.0
    drop_rate: float = 0.0
    timeout_rate: float = 0.0
    # Per journey of an answered request.
    partial_failure_rate: float = 0.0
    wrong_sums_rate: float = 0.0
    # Retry-After sent with 429: seconds, or "date:<seconds>" for an HTTP-date that far ahead.
    retry_after: str = "1"
    # How long a "timeout" fault holds the request before closing without an answer.
    timeout_hold_s: float = 30.0
    script: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.script if kind not in FAULTS]
        if unknown:
            raise ValueError(f"unknown fault(s) in script: {unknown}; known: {FAULTS}")


@dataclass
class RequestRecord:
    """One request to the endpoint, as the server saw it."""

    arrived: float
    conversion_ids: list[str]
    sessions: int
    # The HTTP status sent, or the fault: "drop", "timeout" (no answer), "malformed".
    outcome: str = "pending"
    # When the answer was handed to uvicorn (None without an answer).
    answered: float | None = None


@dataclass
class ServerStats:
    """What the server saw; read it after the requests of interest have finished."""

    requests: int = 0
    # Statuses answered by the endpoint (not 404s, 405s or /_stats).
    by_status: Counter[int] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    # Requests to the endpoint in arrival order (conversion ids empty if unreadable).
    log: list[RequestRecord] = field(default_factory=list)
    # Conversions answered in partialFailureErrors (parse errors and injected ones).
    partial_failures: dict[str, str] = field(default_factory=dict)
    # Conversions whose ihc was scaled so it does not sum to 1.
    wrong_sums: set[str] = field(default_factory=set)

    @property
    def journeys_per_request(self) -> list[int]:
        return [len(record.conversion_ids) for record in self.log]

    @property
    def sessions_per_request(self) -> list[int]:
        return [record.sessions for record in self.log]

    def requests_for(self, conversion_id: str) -> list[RequestRecord]:
        """The requests that carried this conversion."""
        return [record for record in self.log if conversion_id in record.conversion_ids]

    def response_ms(self) -> list[float]:
        """Time from request arrival to answer, of the answered requests."""
        return [(r.answered - r.arrived) * 1000 for r in self.log if r.answered is not None]

    def as_dict(self) -> dict[str, Any]:
        times = sorted(self.response_ms())
        return {
            "requests": self.requests,
            "by_status": dict(self.by_status),
            "faults": dict(self.faults),
            "max_in_flight": self.max_in_flight,
            "journeys_per_request": self.journeys_per_request,
            "sessions_per_request": self.sessions_per_request,
            "response_ms_p50": times[len(times) // 2] if times else None,
            "response_ms_p90": times[len(times) * 9 // 10] if times else None,
            "response_ms_max": times[-1] if times else None,
        }


def _read_sessions(rows: list[dict[str, Any]]) -> pl.DataFrame:
    """The sessions as typed columns; unreadable values become null (their journey fails)."""
    # Column by column, polars turns any JSON value into text (a list or a huge integer
    # too), where building the frame from the rows fails on some.
    text = pl.DataFrame(
        [
            pl.Series(name, [row.get(name) for row in rows], pl.String, strict=False)
            for name in INPUT_COLUMNS
        ]
    )
    stamp = pl.col("timestamp").str
    return text.with_columns(
        pl.coalesce(
            stamp.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us"),
            stamp.to_datetime("%Y-%m-%d %H:%M:%S %z", strict=False, time_unit="us")
            .dt.convert_time_zone("UTC")
            .dt.replace_time_zone(None),
        ),
        pl.col("timestamp").alias("_timestamp_text"),
        *(pl.col(flag).cast(pl.Float64, strict=False) for flag in FLAGS),
    )


def _journey_errors(sessions: pl.DataFrame) -> pl.DataFrame:
    """[conversion_id, message] of the journeys the server cannot attribute (406)."""
    bad_flag = ~pl.all_horizontal(pl.col(f).is_in([0.0, 1.0]).fill_null(False) for f in FLAGS)
    row_problem = (
        pl.when(pl.col("session_id").is_null())
        .then(pl.lit("a session has no session_id"))
        .when(pl.col("channel_label").is_null())
        .then(pl.format("session {}: missing channel_label", "session_id"))
        .when(pl.col("timestamp").is_null())
        .then(
            pl.format(
                "session {}: timestamp {} is not '%Y-%m-%d %H:%M:%S'",
                "session_id",
                pl.col("_timestamp_text").fill_null("(missing)"),
            )
        )
        .when(bad_flag)
        .then(pl.format("session {}: engagement and conversion flags must be 0 or 1", "session_id"))
    )
    conversion_ts = pl.col("timestamp").filter(pl.col("conversion") == 1).max()
    return (
        sessions.group_by("conversion_id", maintain_order=True)
        .agg(
            row_problem=row_problem.drop_nulls().first(),
            duplicates=pl.col("session_id").is_duplicated().any(),
            conversions=(pl.col("conversion") == 1).sum(),
            after_conversion=(pl.col("timestamp") > conversion_ts).any(),
        )
        .select(
            "conversion_id",
            message=pl.when(pl.col("row_problem").is_not_null())
            .then(pl.col("row_problem"))
            .when(pl.col("duplicates"))
            .then(pl.lit("a session_id appears twice in the journey"))
            .when(pl.col("conversions") != 1)
            .then(pl.format("journey has {} sessions with conversion = 1, not 1", "conversions"))
            .when(pl.col("after_conversion"))
            .then(pl.lit("journey has sessions after the conversion")),
        )
        .filter(pl.col("message").is_not_null())
    )


def _drawn(ids: list[str], rate: float, rng: random.Random, skip: list[str]) -> list[str]:
    """The ids drawn at ``rate``; no draw is made at rate 0 or for a skipped id."""
    return [one for one in ids if rate > 0 and one not in skip and rng.random() < rate]


@dataclass(frozen=True)
class _Answer:
    """A request's status and body, and the journeys failed or mis-summed on purpose."""

    status: int
    body: bytes
    failures: dict[str, str] = field(default_factory=dict)
    wrong_sums: list[str] = field(default_factory=list)


def _answer(
    config: ServerConfig, conv_type_id: str | None, payload: Any, rng: random.Random
) -> _Answer:
    """The answer to a request's body; ``HTTPException`` (400) for an invalid request."""
    rows = _journey_rows(payload)
    if not conv_type_id:
        raise HTTPException(400, "query parameter conv_type_id is required")
    if rows is None:
        raise HTTPException(
            400, "body must be a JSON object with a list 'customer_journeys' of objects"
        )
    redistribution = None
    if parameter := payload.get("redistribution_parameter"):
        try:
            redistribution = RedistributionParameter.model_validate(parameter)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, item['loc']))}: {item['msg']}" for item in exc.errors()
            )
            raise HTTPException(400, f"invalid redistribution_parameter: {problems}") from None
    if any(row.get("conversion_id") is None for row in rows):
        raise HTTPException(400, "every session needs a conversion_id")
    journeys = len({str(row["conversion_id"]) for row in rows})
    if journeys > config.max_journeys:
        raise HTTPException(
            400,
            f"too many customer journeys in one request: {journeys} "
            f"(at most {config.max_journeys})",
        )
    if len(rows) > config.max_sessions:
        raise HTTPException(
            400, f"too many sessions in one request: {len(rows)} (at most {config.max_sessions})"
        )

    sessions = _read_sessions(rows)
    errors = _journey_errors(sessions)
    good = sessions.join(errors, on="conversion_id", how="anti")
    results = compute_ihc(good, config.model, redistribution)
    answered = results["conversion_id"].unique(maintain_order=True).to_list()
    injected = _drawn(answered, config.partial_failure_rate, rng, [])
    wrong = _drawn(answered, config.wrong_sums_rate, rng, injected)
    ihc, ids = pl.col("ihc"), pl.col("conversion_id")
    results = results.filter(~ids.is_in(injected)).with_columns(
        pl.when(ids.is_in(wrong)).then(ihc * WRONG_SUM_FACTOR).otherwise(ihc)
    )
    failures = [
        {"conversion_id": conversion_id, "statusCode": 406, "message": message}
        for conversion_id, message in errors.iter_rows()
    ] + [{"conversion_id": one, "statusCode": 500, "message": INJECTED_MESSAGE} for one in injected]
    status = 206 if failures else 200
    body = {
        "statusCode": status,
        "value": orjson.Fragment(results.write_json()),
        "partialFailureErrors": failures,
    }
    messages = {failure["conversion_id"]: failure["message"] for failure in failures}
    return _Answer(status, orjson.dumps(body), messages, wrong)


def _journey_rows(payload: Any) -> list[dict[str, Any]] | None:
    rows = payload.get("customer_journeys") if isinstance(payload, dict) else None
    if isinstance(rows, list) and all(isinstance(row, dict) for row in rows):
        return rows
    return None


def _error(status: int, message: str) -> _Answer:
    return _Answer(status, orjson.dumps({"statusCode": status, "message": message}))


def _json(answer: _Answer, headers: dict[str, str] | None = None) -> Response:
    return Response(answer.body, answer.status, headers, media_type="application/json")


class _Server(uvicorn.Server):
    """The API as a Starlette app, served by uvicorn."""

    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.ihc = config  # uvicorn's own options are self.config
        self.stats = stats
        self._attempts: Counter[str] = Counter()
        app = Starlette(
            routes=[
                Route(PATH, self._compute, methods=["POST"]),
                Route("/_stats", self._stats, methods=["GET"]),
            ],
            exception_handlers={HTTPException: self._http_error},
        )
        super().__init__(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                lifespan="off",
                access_log=False,
                log_config=None,
                log_level="warning",
                # Longer than httpx's 5 s keep-alive expiry: the client closes idle
                # connections first, so it never reuses one the server is closing.
                timeout_keep_alive=60,
            )
        )

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # A held "timeout" request would otherwise keep the server up for timeout_hold_s.
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        await super().shutdown(sockets)

    async def _stats(self, request: Request) -> Response:
        body = orjson.dumps(self.stats.as_dict(), option=orjson.OPT_NON_STR_KEYS)
        return _json(_Answer(200, body))

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return _json(_error(exc.status_code, exc.detail), exc.headers)

    async def _compute(self, request: Request) -> Response:
        arrived = time.monotonic()
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._respond(request, arrived)
        finally:
            self.stats.in_flight -= 1

    async def _respond(self, request: Request, arrived: float) -> Response:
        body = await request.body()
        try:
            payload = orjson.loads(body)
        except orjson.JSONDecodeError:
            payload = None
        rows = _journey_rows(payload) or []
        ids = list(dict.fromkeys(str(row.get("conversion_id")) for row in rows))
        record = RequestRecord(arrived, ids, len(rows))
        self.stats.log.append(record)
        self.stats.requests += 1
        key = request.headers.get("x-api-key")
        if not key:
            return self._send(record, _error(401, "missing x-api-key header"))
        if key != self.ihc.api_key:
            return self._send(record, _error(403, "invalid API key"))

        digest = hashlib.sha256(body).hexdigest()
        attempt = self._attempts[digest]
        self._attempts[digest] += 1
        rng = random.Random(f"{self.ihc.seed}:{digest}:{attempt}")
        fault = self._fault(attempt, rng)
        if fault != "ok":
            self.stats.faults[fault] += 1
        if fault in ("drop", "timeout"):
            record.outcome = fault
            await self._hang_up(request, self.ihc.timeout_hold_s if fault == "timeout" else 0)
            return Response()  # never sent: the connection is closed
        if fault in ("429", "500", "503"):
            answer = _error(
                int(fault), "too many requests" if fault == "429" else "injected server error"
            )
        else:
            answer = await self._attribute(request, payload, rng)
        await asyncio.sleep(arrived + self.ihc.latency_ms / 1000 - time.monotonic())
        return self._send(record, answer, fault)

    async def _attribute(self, request: Request, payload: Any, rng: random.Random) -> _Answer:
        conv_type_id = request.query_params.get("conv_type_id")
        try:
            answer = await asyncio.to_thread(_answer, self.ihc, conv_type_id, payload, rng)
        except HTTPException as exc:
            return _error(exc.status_code, exc.detail)
        except Exception as exc:
            logger.exception("IHC server: request failed")
            return _error(500, f"internal error ({type(exc).__name__})")
        self.stats.partial_failures.update(answer.failures)
        self.stats.wrong_sums.update(answer.wrong_sums)
        return answer

    def _send(self, record: RequestRecord, answer: _Answer, fault: str = "ok") -> Response:
        self.stats.by_status[answer.status] += 1
        record.outcome = "malformed" if fault == "malformed" else str(answer.status)
        record.answered = time.monotonic()
        if fault == "malformed":
            return _json(_Answer(answer.status, answer.body[: max(1, len(answer.body) // 2)]))
        if fault != "429":
            return _json(answer)
        retry_after = self.ihc.retry_after
        if retry_after.startswith("date:"):
            ahead = float(retry_after.removeprefix("date:"))
            retry_after = formatdate(time.time() + ahead, usegmt=True)
        return _json(answer, {"retry-after": retry_after})

    async def _hang_up(self, request: Request, after_s: float) -> None:
        """Close the connection without an answer after ``after_s`` (or once the client leaves)."""
        if after_s > 0:
            with contextlib.suppress(TimeoutError):
                # With the body read, receive() returns only when the client disconnects.
                await asyncio.wait_for(request.receive(), after_s)
        # ASGI has no way to drop a request: abort the transport of this client's connection.
        for connection in list(self.server_state.connections):
            if connection.client == request.scope["client"]:
                connection.transport.abort()
        # Return once uvicorn has seen the disconnect: it then writes nothing of the
        # placeholder response (raising instead would make it answer 500).
        await request.receive()

    def _fault(self, attempt: int, rng: random.Random) -> str:
        c = self.ihc
        if attempt < len(c.script):
            return c.script[attempt]
        rates = (c.rate_429, c.rate_500, c.rate_503, c.malformed_rate, c.drop_rate, c.timeout_rate)
        draw = rng.random()
        for kind, rate in zip(FAULTS[1:], rates, strict=True):
            if draw < rate:
                return kind
            draw -= rate
        return "ok"


def _url(config: ServerConfig, listener: socket.socket) -> str:
    return f"http://{config.host}:{listener.getsockname()[1]}"


@dataclass
class ServerHandle:
    """A running server: its base URL, what it saw so far, and how to stop it."""

    url: str
    stats: ServerStats
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


@contextlib.contextmanager
def run_server(config: ServerConfig) -> Iterator[ServerHandle]:
    """The server in a background thread on ``config.port`` (0 = a free port) until exit."""
    # Bound here, so the port is known at once; uvicorn serves what waits on it.
    listener = socket.create_server((config.host, config.port))
    stats = ServerStats()
    server = _Server(config, stats)
    thread = threading.Thread(target=server.run, args=([listener],), daemon=True)
    thread.start()
    handle = ServerHandle(_url(config, listener), stats, server, thread)
    try:
        yield handle
    finally:
        handle.stop()
        listener.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.ihc_server",
        description="IHC-compatible attribution server (local model) with fault injection.",
    )
    defaults = ServerConfig(api_key="")
    parser.add_argument("--api-key", required=True, help="the key clients must send")
    parser.add_argument("--port", type=int, default=8765, help="0 = any free port")
    for item in fields(ServerConfig):
        default = getattr(defaults, item.name)
        flag = "--" + item.name.replace("_", "-")
        if item.name not in ("api_key", "port", "model", "script"):
            parser.add_argument(
                flag, type=type(default), default=default, help=f"default {default}"
            )
    parser.add_argument(
        "--script",
        default="",
        help=f"comma-separated faults for the first attempts of each request body, of {FAULTS}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    script = tuple(kind for kind in args.pop("script").split(",") if kind)
    config = ServerConfig(**args, script=script)
    listener = socket.create_server((config.host, config.port))
    print(f"IHC server listening on {_url(config, listener)}", flush=True)
    stats = ServerStats()
    with contextlib.suppress(KeyboardInterrupt):
        _Server(config, stats).run([listener])
    print(orjson.dumps(stats.as_dict(), option=orjson.OPT_NON_STR_KEYS).decode(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
