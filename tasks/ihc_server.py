"""An IHC-compatible attribution server on loopback, with fault injection, for tests and benchmarks.

It speaks the contract in ``shared/spec/ihc-api.md``: ``POST /v1/compute_ihc?conv_type_id=…``
with the ``x-api-key`` header (missing → 401, wrong → 403), the journey and session
limits enforced with 400, journeys it cannot read reported in ``partialFailureErrors``
(statusCode 406) with HTTP 206 while the rest are answered, and results from the
local model (``tasks.local_model.compute_ihc``) with the request's
``redistribution_parameter``.

Run it with ``python -m tasks.ihc_server --port 8765 --api-key KEY [fault options]``
(``--help`` lists them), or in-process from tests with ``run_server(ServerConfig(...))``.

Choices where the contract is silent:

- Response body: ``{"statusCode": 200|206, "value": [{conversion_id, session_id,
  initializer, holder, closer, ihc}], "partialFailureErrors": [{"conversion_id",
  "statusCode", "message"}]}``; the HTTP status equals ``statusCode``. Errors (4xx/5xx)
  answer ``{"statusCode": code, "message": …}``.
- A journey is rejected (406) when a session lacks ``session_id`` or ``channel_label``,
  has a timestamp that is not ``%Y-%m-%d %H:%M:%S`` (optionally `` %z``), a flag
  outside {0, 1}, repeats a ``session_id``, when the journey does not have exactly one
  session with ``conversion = 1``, or has a session after that one. A session without
  ``conversion_id`` cannot be assigned to a journey: the whole request gets 400.
- ``latency_ms`` is the response-time floor: a response leaves no earlier than
  ``latency_ms`` after its request began to arrive (its head was read); reading the
  body and running the model happen during that time, as at a remote service.
  Requests arriving within a quarter of the latency are attributed together (one
  ``compute_ihc`` call per round, off the event loop, journeys keyed by request), so
  the server's own work adds little on top; the command-line server's timers fire
  within ~0.15 ms (a select() loop), so its responses are not late either.
- Injected partial failures are listed with statusCode 500; injected wrong sums
  scale a journey's ihc by 0.8. ``GET /_stats`` (outside the contract) returns the
  counts as JSON, for benchmarks that run the server in its own process.

Faults are deterministic under ``seed``: the fault of a request depends only on the
seed, the request body and how many times that exact body was seen before, not on
the arrival order of concurrent requests. ``script`` fixes the faults of the first
attempts of every distinct body (``("503", "ok")``: each batch fails once, then
succeeds); after the script, the rates apply.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import logging
import random
import selectors
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field, fields
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import polars as pl
from pydantic import ValidationError

from config.settings import LocalModelSettings, RedistributionParameter
from tasks.attribution import rows_frame
from tasks.local_model import INPUT_COLUMNS, compute_ihc

logger = logging.getLogger(__name__)

PATH = "/v1/compute_ihc"
STATS_PATH = "/_stats"
FAULTS = ("ok", "429", "500", "503", "malformed", "drop", "timeout")
# The fields of one session in a request: the local model's input columns.
SESSION_FIELDS = INPUT_COLUMNS
FLAGS = ("holder_engagement", "closer_engagement", "impression_interaction", "conversion")
MAX_BODY_BYTES = 64 * 1024 * 1024
WRONG_SUM_FACTOR = 0.8
INJECTED_MESSAGE = "journey could not be attributed (injected partial failure)"
# A journey while requests share a model call: the request's number and its conversion_id.
_KEY = ("_job", "conversion_id")


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
    # Serve https with this context (tests of the client over TLS); plain http without.
    tls: ssl.SSLContext | None = None

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
    # The HTTP status sent, or the fault without an answer: "drop", "timeout";
    # "malformed" for a 200 whose body was cut.
    outcome: str = "pending"
    # When the answer was written (None without an answer).
    answered: float | None = None


@dataclass
class ServerStats:
    """What the server saw; read it after the requests of interest have finished."""

    requests: int = 0
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
        """Time from request read to answer written, of the answered requests."""
        return [
            (record.answered - record.arrived) * 1000
            for record in self.log
            if record.answered is not None
        ]

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


class _Reply(Exception):
    """Answer the request now with this status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Answer:
    """A request's response body and the faults injected into it."""

    status: int
    body: bytes
    failures: dict[str, str]
    wrong_sums: list[str]


@dataclass
class _Job:
    """One request's sessions waiting for the model, with its fault draws."""

    sessions: list[dict[str, Any]]
    redistribution: RedistributionParameter | None
    rng: random.Random
    done: asyncio.Future[_Answer]


def _read_sessions(jobs: list[_Job]) -> pl.DataFrame:
    """All jobs' sessions as typed columns, with the ``_job`` number in front.

    Unreadable values become null (and their journey is then rejected).
    """
    text = rows_frame(
        [row for job in jobs for row in job.sessions],
        pl.Schema(dict.fromkeys(SESSION_FIELDS, pl.String)),
    )
    numbers = pl.Series(
        "_job", [number for number, job in enumerate(jobs) for _ in job.sessions], pl.Int32
    )
    stamp = text["timestamp"]
    parsed = stamp.str.to_datetime("%Y-%m-%d %H:%M:%S", strict=False, time_unit="us")
    if parsed.null_count() > stamp.null_count():
        # Some carry a UTC offset (or are unreadable): those as UTC wall time.
        zoned = (
            stamp.str.to_datetime("%Y-%m-%d %H:%M:%S %z", strict=False, time_unit="us")
            .dt.convert_time_zone("UTC")
            .dt.replace_time_zone(None)
        )
        parsed = parsed.fill_null(zoned)
    return text.with_columns(
        parsed.alias("timestamp"),
        stamp.alias("_timestamp_text"),
        *(pl.col(flag).cast(pl.Float64, strict=False) for flag in FLAGS),
    ).insert_column(0, numbers)


def _journey_errors(sessions: pl.DataFrame) -> pl.DataFrame:
    """[_job, conversion_id, message] of the journeys the server cannot attribute (406)."""
    flags_ok = pl.all_horizontal(pl.col(flag).is_in([0.0, 1.0]).fill_null(False) for flag in FLAGS)
    present = pl.all_horizontal(
        pl.col(name).is_not_null() for name in ("session_id", "channel_label", "timestamp")
    )
    conversion_ts = pl.col("timestamp").filter(pl.col("conversion") == 1).max()
    # Cheap checks first: the messages are only built for the journeys that fail one.
    suspects = (
        sessions.group_by(_KEY)
        .agg(
            ok=(present & flags_ok).all()
            & (pl.col("session_id").n_unique() == pl.len())
            & ((pl.col("conversion") == 1).sum() == 1)
            & (pl.col("timestamp") <= conversion_ts).all()
        )
        .filter(~pl.col("ok"))
    )
    if suspects.height == 0:
        return pl.DataFrame(schema={**sessions.select(_KEY).schema, "message": pl.String})
    bad_flag = ~flags_ok
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
    return (
        sessions.join(suspects, on=_KEY, how="semi")
        .group_by(_KEY, maintain_order=True)
        .agg(
            row_problem=row_problem.drop_nulls().first(),
            duplicates=pl.col("session_id").is_duplicated().any(),
            conversions=(pl.col("conversion") == 1).sum(),
            after_conversion=(pl.col("timestamp") > conversion_ts).any(),
        )
        .select(
            *_KEY,
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


def _injected(
    jobs: list[_Job],
    answered: list[tuple[int, str]],
    rate: float,
    skip: Collection[tuple[int, str]] = (),
) -> list[tuple[int, str]]:
    """(job, conversion_id) pairs drawn at ``rate``, each from its own job's random stream."""
    if rate <= 0:
        return []
    return [pair for pair in answered if pair not in skip and jobs[pair[0]].rng.random() < rate]


def _pairs(pairs: list[tuple[int, str]]) -> pl.DataFrame:
    return pl.DataFrame(pairs, schema={"_job": pl.Int32, "conversion_id": pl.String}, orient="row")


def _attribute_jobs(jobs: list[_Job], config: ServerConfig) -> list[_Answer]:
    """The answers of several requests from one model call per redistribution parameter.

    Journeys are keyed by (job number, conversion_id), which keeps equal ids of
    different requests apart; everything after reading the rows is vectorised over
    all jobs.
    """
    sessions = _read_sessions(jobs)
    errors = _journey_errors(sessions)
    good = sessions.join(errors, on=_KEY, how="anti") if errors.height else sessions
    groups: dict[str, list[int]] = {}
    for number, job in enumerate(jobs):
        rule = job.redistribution.model_dump_json() if job.redistribution else ""
        groups.setdefault(rule, []).append(number)
    results = pl.concat(
        [
            compute_ihc(
                good if len(groups) == 1 else good.filter(pl.col("_job").is_in(numbers)),
                config.model,
                jobs[numbers[0]].redistribution,
                by=("_job",),
            )
            for numbers in groups.values()
        ]
    )
    injected: list[tuple[int, str]] = []
    wrong: list[tuple[int, str]] = []
    if config.partial_failure_rate > 0 or config.wrong_sums_rate > 0:
        answered = results.select(_KEY).unique(maintain_order=True).rows()
        injected = _injected(jobs, answered, config.partial_failure_rate)
        wrong = _injected(jobs, answered, config.wrong_sums_rate, frozenset(injected))
        results = (
            results.join(_pairs(injected), on=_KEY, how="anti")
            .join(_pairs(wrong).with_columns(_wrong=pl.lit(True)), on=_KEY, how="left")
            .with_columns(
                pl.when(pl.col("_wrong")).then(pl.col("ihc") * WRONG_SUM_FACTOR).otherwise("ihc")
            )
            .drop("_wrong")
        )
    failures = pl.concat(
        [
            errors.with_columns(statusCode=pl.lit(406, pl.Int64)),
            _pairs(injected).with_columns(
                message=pl.lit(INJECTED_MESSAGE), statusCode=pl.lit(500, pl.Int64)
            ),
        ]
    ).select(*_KEY, "statusCode", "message")
    rows_of = results.partition_by("_job", as_dict=True, include_key=False)
    failed_of = failures.partition_by("_job", as_dict=True, include_key=False)
    wrong_by_job: dict[int, list[str]] = {}
    for number, conversion_id in wrong:
        wrong_by_job.setdefault(number, []).append(conversion_id)
    answers = []
    for number in range(len(jobs)):
        rows = rows_of.get((number,))
        failed = failed_of.get((number,))
        status = 206 if failed is not None else 200
        body = b"".join(
            (
                b'{"statusCode":',
                str(status).encode(),
                b',"value":',
                rows.write_json().encode() if rows is not None else b"[]",
                b',"partialFailureErrors":',
                failed.write_json().encode() if failed is not None else b"[]",
                b"}",
            )
        )
        failures_of_job = (
            dict(failed.select("conversion_id", "message").iter_rows())
            if failed is not None
            else {}
        )
        answers.append(_Answer(status, body, failures_of_job, wrong_by_job.get(number, [])))
    return answers


class _Model:
    """Answers the jobs of all requests that are waiting, in one round off the event loop."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()

    async def attribute(
        self,
        sessions: list[dict[str, Any]],
        redistribution: RedistributionParameter | None,
        rng: random.Random,
    ) -> _Answer:
        done: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(sessions, redistribution, rng, done))
        return await done

    async def run(self) -> None:
        # Requests wait out the latency anyway: gathering for a part of it lets one
        # model call serve more of them.
        window = self._config.latency_ms / 1000 / 4
        while True:
            jobs = [await self._queue.get()]
            if window > 0:
                await asyncio.sleep(window)
            while not self._queue.empty():
                jobs.append(self._queue.get_nowait())
            try:
                answers = await asyncio.to_thread(_attribute_jobs, jobs, self._config)
            except Exception as exc:
                for job in jobs:
                    if not job.done.done():
                        job.done.set_exception(exc)
                continue
            for job, answer in zip(jobs, answers, strict=True):
                if not job.done.done():
                    job.done.set_result(answer)


def _retry_after_header(value: str) -> str:
    if value.startswith("date:"):
        return formatdate(time.time() + float(value.removeprefix("date:")), usegmt=True)
    return value


class _Server:
    def __init__(self, config: ServerConfig, stats: ServerStats) -> None:
        self.config = config
        self.stats = stats
        self.model = _Model(config)
        self._attempts: Counter[str] = Counter()
        self._connections: set[asyncio.Task[None]] = set()

    # ---- HTTP plumbing -------------------------------------------------------------

    async def handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while await self._handle_request(reader, writer):
                pass
        except (
            ConnectionError,
            ValueError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def close_connections(self) -> None:
        """End every open connection (requests still held are dropped)."""
        connections = list(self._connections)
        for connection in connections:
            connection.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _handle_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; False when the connection is to be closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        # The latency clock starts when the request arrives: reading its body and the
        # server's own work happen within ``latency_ms``, as at a remote service.
        started = time.monotonic()
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = {}
        for line in header_lines:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY_BYTES:
            await self._send(writer, 413, _error_body(413, "request body too large"), close=True)
            return False
        body = await reader.readexactly(length) if length else b""
        keep_alive = headers.get("connection", "").lower() != "close"
        self.stats.in_flight += 1
        self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
        try:
            return await self._respond(method, target, headers, body, started, reader, writer) and (
                keep_alive
            )
        finally:
            self.stats.in_flight -= 1

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        record: RequestRecord | None = None,
        *,
        extra: dict[str, str] | None = None,
        close: bool = False,
    ) -> None:
        self.stats.by_status[status] += 1
        if record is not None:
            record.outcome = str(status)
            record.answered = time.monotonic()
        lines = [
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
            "content-type: application/json",
            f"content-length: {len(body)}",
            *(f"{name}: {value}" for name, value in (extra or {}).items()),
        ]
        if close:
            lines.append("connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await writer.drain()

    async def _hold_until(self, deadline: float) -> None:
        delay = deadline - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    # ---- the API ---------------------------------------------------------------------

    async def _respond(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        started: float,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> bool:
        url = urlsplit(target)
        if url.path == STATS_PATH and method == "GET":
            await self._send(
                writer, 200, orjson.dumps(self.stats.as_dict(), option=orjson.OPT_NON_STR_KEYS)
            )
            return True
        if url.path != PATH:
            await self._send(writer, 404, _error_body(404, f"no such endpoint: {url.path}"))
            return True
        if method != "POST":
            await self._send(writer, 405, _error_body(405, "use POST"))
            return True
        payload = _parse_json(body)
        rows = _journey_rows(payload)
        ids = (
            []
            if rows is None
            else list(dict.fromkeys(str(row.get("conversion_id")) for row in rows))
        )
        record = RequestRecord(started, ids, 0 if rows is None else len(rows))
        self.stats.log.append(record)
        self.stats.requests += 1
        key = headers.get("x-api-key")
        if not key:
            await self._send(writer, 401, _error_body(401, "missing x-api-key header"), record)
            return True
        if key != self.config.api_key:
            await self._send(writer, 403, _error_body(403, "invalid API key"), record)
            return True

        digest = hashlib.sha256(body).hexdigest()
        attempt = self._attempts[digest]
        self._attempts[digest] += 1
        rng = random.Random(f"{self.config.seed}:{digest}:{attempt}")
        fault = self._fault(attempt, rng)
        if fault != "ok":
            self.stats.faults[fault] += 1
        deadline = started + self.config.latency_ms / 1000
        if fault == "drop":
            record.outcome = fault
            writer.transport.abort()
            return False
        if fault == "timeout":
            record.outcome = fault
            # Hold the request, answer nothing; stop early if the client gives up.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), self.config.timeout_hold_s)
            return False
        if fault in ("429", "500", "503"):
            status = int(fault)
            extra = None
            if status == 429:
                extra = {"retry-after": _retry_after_header(self.config.retry_after)}
            message = "too many requests" if status == 429 else "injected server error"
            await self._hold_until(deadline)
            await self._send(writer, status, _error_body(status, message), record, extra=extra)
            return True

        try:
            status, answer = await self._attribute(url.query, payload, rows, rng)
        except _Reply as reply:
            status, answer = reply.status, _error_body(reply.status, reply.message)
        except Exception as exc:
            logger.exception("IHC server: request failed")
            status, answer = 500, _error_body(500, f"internal error ({type(exc).__name__})")
        await self._hold_until(deadline)
        if fault == "malformed":
            answer = answer[: max(1, len(answer) // 2)]
        await self._send(writer, status, answer, record)
        if fault == "malformed":
            record.outcome = fault
        return True

    def _fault(self, attempt: int, rng: random.Random) -> str:
        config = self.config
        if attempt < len(config.script):
            return config.script[attempt]
        draw = rng.random()
        for kind, rate in (
            ("429", config.rate_429),
            ("500", config.rate_500),
            ("503", config.rate_503),
            ("malformed", config.malformed_rate),
            ("drop", config.drop_rate),
            ("timeout", config.timeout_rate),
        ):
            if draw < rate:
                return kind
            draw -= rate
        return "ok"

    async def _attribute(
        self,
        query: str,
        payload: Any,
        rows: list[dict[str, Any]] | None,
        rng: random.Random,
    ) -> tuple[int, bytes]:
        conv_type = parse_qs(query).get("conv_type_id", [""])[0]
        if not conv_type:
            raise _Reply(400, "query parameter conv_type_id is required")
        if rows is None:
            raise _Reply(
                400, "body must be a JSON object with a list 'customer_journeys' of objects"
            )
        redistribution = _redistribution(payload.get("redistribution_parameter"))
        if any(row.get("conversion_id") is None for row in rows):
            raise _Reply(400, "every session needs a conversion_id")
        journeys = len({str(row["conversion_id"]) for row in rows})
        if journeys > self.config.max_journeys:
            raise _Reply(
                400,
                f"too many customer journeys in one request: {journeys} "
                f"(at most {self.config.max_journeys})",
            )
        if len(rows) > self.config.max_sessions:
            raise _Reply(
                400,
                f"too many sessions in one request: {len(rows)} "
                f"(at most {self.config.max_sessions})",
            )
        if not rows:
            return 200, b'{"statusCode":200,"value":[],"partialFailureErrors":[]}'
        answer = await self.model.attribute(rows, redistribution, rng)
        self.stats.partial_failures.update(answer.failures)
        self.stats.wrong_sums.update(answer.wrong_sums)
        return answer.status, answer.body


def _error_body(status: int, message: str) -> bytes:
    return orjson.dumps({"statusCode": status, "message": message})


def _parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def _journey_rows(payload: Any) -> list[dict[str, Any]] | None:
    if not isinstance(payload, dict):
        return None
    rows = payload.get("customer_journeys")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        return None
    return rows


def _redistribution(value: Any) -> RedistributionParameter | None:
    if not value:
        return None
    try:
        return RedistributionParameter.model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in item['loc'])}: {item['msg']}" for item in exc.errors()
        )
        raise _Reply(400, f"invalid redistribution_parameter: {problems}") from None


@dataclass
class ServerHandle:
    """A running server: its base URL, what it saw so far, and how to stop it."""

    url: str
    stats: ServerStats
    _stop: threading.Event
    _thread: threading.Thread

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


async def serve(
    config: ServerConfig,
    stats: ServerStats,
    stop: threading.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until ``stop`` is set (forever without one); ``on_ready(port)`` once listening."""
    server = _Server(config, stats)
    model_task = asyncio.create_task(server.model.run())
    listener = await asyncio.start_server(
        server.handle_connection,
        config.host,
        config.port,
        limit=1024 * 1024,
        backlog=1024,
        ssl=config.tls,
    )
    port = listener.sockets[0].getsockname()[1]
    if on_ready is not None:
        on_ready(port)
    try:
        while stop is None or not stop.is_set():
            await asyncio.sleep(0.02)
    finally:
        listener.close()
        model_task.cancel()
        await server.close_connections()
        await asyncio.gather(model_task, return_exceptions=True)
        await listener.wait_closed()


@contextlib.contextmanager
def run_server(config: ServerConfig) -> Iterator[ServerHandle]:
    """The server in a background thread on ``config.port`` (0 = a free port) until exit."""
    stats = ServerStats()
    stop = threading.Event()
    ready: dict[str, int] = {}
    started = threading.Event()
    failure: list[BaseException] = []

    def ready_at(port: int) -> None:
        ready["port"] = port
        started.set()

    def main() -> None:
        try:
            asyncio.run(serve(config, stats, stop, ready_at))
        except BaseException as exc:
            failure.append(exc)
            started.set()

    thread = threading.Thread(target=main, name="ihc-server", daemon=True)
    thread.start()
    started.wait(timeout=30)
    if failure or "port" not in ready:
        raise RuntimeError(f"IHC test server did not start: {failure[:1]}")
    scheme = "https" if config.tls else "http"
    handle = ServerHandle(f"{scheme}://{config.host}:{ready['port']}", stats, stop, thread)
    try:
        yield handle
    finally:
        handle.stop()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tasks.ihc_server",
        description="IHC-compatible attribution server (local model) with fault injection.",
    )
    defaults = ServerConfig(api_key="")
    parser.add_argument("--api-key", required=True, help="the key clients must send")
    parser.add_argument("--host", default=defaults.host)
    parser.add_argument("--port", type=int, default=8765, help="0 = any free port")
    for item in fields(ServerConfig):
        if item.name in ("api_key", "host", "port", "model", "script", "tls"):
            continue
        flag = "--" + item.name.replace("_", "-")
        default = getattr(defaults, item.name)
        parser.add_argument(flag, type=type(default), default=default, help=f"default {default}")
    parser.add_argument(
        "--script",
        default="",
        help=f"comma-separated faults for the first attempts of each request body, of {FAULTS}",
    )
    return parser


def _precise_loop() -> asyncio.AbstractEventLoop:
    """An event loop whose timers fire within microseconds, for ``latency_ms``.

    select() takes its timeout in microseconds, epoll in whole milliseconds (rounded
    up): responses leave ~0.15 ms after ``latency_ms`` instead of ~0.6 ms. select()
    watches file descriptors below 1,024 only: the command-line server takes about a
    thousand connections at once, plenty for tests and benchmarks.
    """
    return asyncio.SelectorEventLoop(selectors.SelectSelector())


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    script = tuple(kind for kind in args.pop("script").split(",") if kind)
    config = ServerConfig(**args, script=script)
    stats = ServerStats()

    def announce(port: int) -> None:
        print(f"IHC server listening on http://{config.host}:{port}", flush=True)

    # What is loaded now (polars, pydantic, …) lives as long as the process: keep the
    # cyclic GC off it, else a full collection stalls every response for ~40 ms.
    gc.freeze()
    with (
        contextlib.suppress(KeyboardInterrupt),
        asyncio.Runner(loop_factory=_precise_loop) as runner,
    ):
        runner.run(serve(config, stats, on_ready=announce))
    print(orjson.dumps(stats.as_dict(), option=orjson.OPT_NON_STR_KEYS).decode(), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
