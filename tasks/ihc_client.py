"""Each journey's credit per session from the IHC attribution API (provider "api").

``attribute_journeys`` packs journeys into requests (``tasks.batching``); C workers
(``api.concurrency``) take batches from one queue and post them through one stock
``httpx.AsyncClient``, so proxies, TLS and ``SSL_CERT_FILE`` work as httpx documents.
What each status means (``shared/spec/ihc-api.md``) is decided in one place,
``_Run._attempt``; retries are tenacity's (exponential backoff with full jitter, or the
server's ``Retry-After``), declared in ``_Run._send``. Every answer is validated by
``tasks.attribution.check_results``, the local model's check too.

Choices where the contract is silent: ``partialFailureErrors`` entries are read
tolerantly (``_ID_KEYS``, ``_MESSAGE_KEYS``, ``_CODE_KEYS``); result rows for
conversions not in the batch are dropped and logged; a ``Retry-After`` longer than
``backoff_max_s`` fails the batch at once (the next run sends it); only batches whose
every conversion validated are cached, so failed conversions get their retry. The key
leaves its ``SecretStr`` only for the request header, and a server that quotes it back
has it replaced by ``***``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import httpx
import orjson
import polars as pl
from pydantic import SecretStr
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from config.errors import ApiKeyRejected
from config.secrets import API_KEY_ENV, SECRET_BLOCK
from config.settings import ApiSettings
from tasks.attribution import check_results
from tasks.batching import FAILED_SCHEMA, PackResult, pack_batches
from tasks.local_model import OUTPUT_SCHEMA as RESULT_SCHEMA

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/compute_ihc"
FLAG_COLUMNS = ("holder_engagement", "closer_engagement", "conversion", "impression_interaction")
_ID_KEYS = ("conversion_id", "conversionId", "customer_journey_id")
_MESSAGE_KEYS = ("message", "error", "detail")
_CODE_KEYS = ("statusCode", "status_code", "status")


class _Transient(Exception):
    """An attempt that failed for a reason worth retrying; ``kind`` counts it by type."""

    def __init__(self, kind: str, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.kind, self.reason, self.retry_after = kind, reason, retry_after


class _BatchFailed(Exception):
    """The batch's conversions fail with this reason, without another attempt."""


@dataclass
class ApiStats:
    """Counts of one run, and where it stands (``on_progress`` gets a copy after each
    batch). ``retry_reasons`` counts retries by kind (e.g. ``http_503``)."""

    batches: int = 0
    done_batches: int = 0
    done_conversions: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    failed_conversions: int = 0
    truncated_journeys: int = 0
    conversions_sent: int = 0
    sessions_sent: int = 0
    elapsed_s: float = 0.0
    retry_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def percent(self) -> float:
        return 100.0 * self.done_batches / self.batches if self.batches else 100.0


@dataclass(frozen=True)
class ApiAttribution:
    """Validated results per session (in the journeys' order), failed conversions with
    their reason, and counts. ``truncated`` lists the conversions sent with only their
    most recent sessions (``long_journey_policy: keep_recent``)."""

    results: pl.DataFrame
    failed: pl.DataFrame
    stats: ApiStats
    truncated: list[str] = field(default_factory=list)


class BatchCache(Protocol):
    """Validated results of earlier requests by request key (``tasks.attribution`` keeps
    them in Prefect's result storage)."""

    async def get(self, key: str) -> pl.DataFrame | None: ...

    async def put(self, key: str, results: pl.DataFrame) -> None: ...


def request_body(sessions: pl.DataFrame, redistribution: bytes) -> bytes:
    """The JSON body for one batch; equal batches give equal bytes (the cache relies on it)."""
    timestamp = pl.col("timestamp")
    if getattr(sessions.schema["timestamp"], "time_zone", None) is not None:
        timestamp = timestamp.dt.convert_time_zone("UTC")
    wire = sessions.select(
        pl.col("conversion_id", "session_id").cast(pl.String),
        timestamp.dt.strftime("%Y-%m-%d %H:%M:%S"),
        pl.col("channel_label").cast(pl.String),
        pl.col(FLAG_COLUMNS).cast(pl.Int64),
    )
    journeys = wire.write_json().encode() if wire.height else b"[]"
    return b'{"customer_journeys":%b,"redistribution_parameter":%b}' % (journeys, redistribution)


def cache_key(settings: ApiSettings, body: bytes) -> str:
    """sha256 of what determines the answer: endpoint, conversion type and body."""
    digest = hashlib.sha256()
    for part in (b"ihc-batch-v1", settings.base_url.encode(), settings.conv_type_id.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


@dataclass(frozen=True)
class Answer:
    """A 200/206 body, read: its result rows (``RESULT_SCHEMA``) and partial failures."""

    results: pl.DataFrame
    failures: list[tuple[str, str]]


def _first(entry: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((entry[key] for key in keys if entry.get(key) is not None), None)


def read_answer(content: bytes) -> Answer:
    """The results and partial failures [(conversion_id, reason)] of a 200/206 body.

    Read as a JSON reader would: values of the wrong type become null (and fail
    validation); a body of the wrong shape raises ``ValueError`` (worth a retry).
    """
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"response is not valid JSON ({exc.msg})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("value"), list):
        raise ValueError("response has no list 'value'")
    rows, errors = payload["value"], payload.get("partialFailureErrors") or []
    if not all(isinstance(row, dict) for row in rows) or not isinstance(errors, list):
        raise ValueError("response 'value' or 'partialFailureErrors' has the wrong shape")
    columns = [
        pl.Series(name, [row.get(name) for row in rows], dtype=dtype, strict=False)
        for name, dtype in RESULT_SCHEMA.items()
    ]
    return Answer(pl.DataFrame(columns), _failures(errors))


def _failures(entries: list[Any]) -> list[tuple[str, str]]:
    return [
        (
            str(_first(entry, _ID_KEYS)),
            f"API partial failure ({_first(entry, _CODE_KEYS) or '?'}): "
            f"{_first(entry, _MESSAGE_KEYS) or 'no message'}",
        )
        for entry in entries
        if isinstance(entry, dict) and _first(entry, _ID_KEYS) is not None
    ]


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _server_message(response: httpx.Response, secret: str) -> str:
    """An error response's text (``message``/``error``/``detail`` of a JSON body), key-free."""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        payload = None
    message = _first(payload, _MESSAGE_KEYS) if isinstance(payload, dict) else None
    text = str(message)[:500] if message is not None else response.text[:500].strip()
    text = text or response.reason_phrase
    return text.replace(secret, "***") if secret else text


class _Run:
    """One attribution run: C workers take batches from a queue until it is empty."""

    def __init__(
        self,
        packed: PackResult,
        settings: ApiSettings,
        api_key: SecretStr,
        cache: BatchCache | None,
        on_progress: Callable[[ApiStats], None] | None,
        log: logging.Logger | logging.LoggerAdapter[Any],
    ) -> None:
        self.packed = packed
        self.settings = settings
        self.api_key = api_key
        self.cache = cache
        self.on_progress = on_progress
        self.log = log
        parameter = settings.redistribution_parameter
        self.redistribution = orjson.dumps(parameter.as_payload() if parameter else {})
        self.stats = ApiStats(
            batches=len(packed),
            truncated_journeys=len(packed.truncated),
            conversions_sent=packed.journeys,
            sessions_sent=packed.sessions.height,
        )
        self.started = time.perf_counter()
        # Validated rows, per batch.
        self.results: list[pl.DataFrame] = []
        self.failed: list[pl.DataFrame] = [packed.failed]
        self._not_before = 0.0  # loop time before which no request goes out (429)

    async def run(self) -> ApiAttribution:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for index in range(len(self.packed)):
            queue.put_nowait(index)
        workers = min(self.settings.concurrency, len(self.packed))
        limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
        headers = {"x-api-key": self.api_key.get_secret_value()}
        async with httpx.AsyncClient(
            headers=headers, limits=limits, timeout=self.settings.timeout_s
        ) as client:
            try:
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
                        group.create_task(self._worker(client, queue))
            except* ApiKeyRejected as rejected:
                raise rejected.exceptions[0] from None
        return self.outcome()

    async def _worker(self, client: httpx.AsyncClient, queue: asyncio.Queue[int]) -> None:
        while not queue.empty():
            await self._batch(client, queue.get_nowait())

    async def _batch(self, client: httpx.AsyncClient, index: int) -> None:
        start, end = self.packed.bounds[index]
        sessions = self.packed.sessions.slice(start, end - start)
        sent = sessions.select(pl.col("conversion_id", "session_id").cast(pl.String))
        body = request_body(sessions, self.redistribution)
        key = cache_key(self.settings, body) if self.cache is not None else ""
        cached = await self._cached(key)
        if cached is not None:
            self.stats.cache_hits += 1
            self.results.append(cached)
        else:
            try:
                answer = await self._send(client, body)
            except _BatchFailed as failure:
                self._fail(sent, str(failure))
            else:
                await self._accept(sent, answer, key)
        self._progress(sent["conversion_id"].n_unique())

    async def _accept(self, sent: pl.DataFrame, answer: Answer, key: str) -> None:
        """Keep the answer's valid conversions, fail the rest, cache a clean batch."""
        results = answer.results
        failed = check_results(sent, results)
        if failed.height or answer.failures:
            batch = sent.select("conversion_id").unique()
            foreign = results.join(batch, on="conversion_id", how="anti").height
            if foreign:
                self.log.warning(
                    "IHC API returned %d row(s) for conversions not asked about; ignored",
                    foreign,
                )
            # The server's own reason first, for conversions it says it could not do; the
            # rows of failed and foreign conversions are not kept.
            partial = pl.DataFrame(answer.failures, schema=FAILED_SCHEMA, orient="row")
            failed = pl.concat([partial, failed])
            results = results.join(failed, on="conversion_id", how="anti")
            failed = failed.join(batch, on="conversion_id", how="semi").unique(
                "conversion_id", keep="first", maintain_order=True
            )
        self.results.append(results)
        if failed.height:
            self.failed.append(failed)
            self.stats.failed_conversions += failed.height
        else:
            await self._remember(key, results)

    def _fail(self, sent: pl.DataFrame, reason: str) -> None:
        failed = sent.select(
            pl.col("conversion_id").unique(maintain_order=True), reason=pl.lit(reason)
        )
        self.failed.append(failed)
        self.stats.failed_conversions += failed.height

    async def _send(self, client: httpx.AsyncClient, body: bytes) -> Answer:
        """The batch's answer, retried as the contract says; ``_BatchFailed`` if none comes."""
        attempts = self.settings.max_retries + 1
        jitter = wait_random_exponential(
            multiplier=self.settings.backoff_base_s, max=self.settings.backoff_max_s
        )

        def wait(state: RetryCallState) -> float:
            failure = state.outcome.exception() if state.outcome else None
            if isinstance(failure, _Transient) and failure.retry_after is not None:
                return failure.retry_after
            return jitter(state)

        def count(state: RetryCallState) -> None:
            failure = state.outcome.exception() if state.outcome else None
            self.stats.retries += 1
            self.stats.retry_reasons[getattr(failure, "kind", "unknown")] += 1

        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=count,
            reraise=True,
        )
        try:
            return await retrying(self._attempt, client, body)
        except _Transient as failure:
            raise _BatchFailed(f"gave up after {attempts} attempt(s): {failure.reason}") from None

    async def _attempt(self, client: httpx.AsyncClient, body: bytes) -> Answer:
        """One request: its answer, or ``_Transient``, ``_BatchFailed``, ``ApiKeyRejected``."""
        loop = asyncio.get_running_loop()
        if (hold := self._not_before - loop.time()) > 0:
            await asyncio.sleep(hold)
        self.stats.requests += 1
        url = f"{self.settings.base_url}{ENDPOINT}"
        params = {"conv_type_id": self.settings.conv_type_id}
        headers = {"content-type": "application/json"}
        try:
            response = await client.post(url, params=params, content=body, headers=headers)
        except httpx.TimeoutException as exc:
            reason = f"timed out after {self.settings.timeout_s:g} s ({type(exc).__name__})"
            raise _Transient("timeout", reason) from None
        except httpx.RequestError as exc:
            # What the connection said (a refused port, an untrusted certificate, …).
            detail = str(exc)[:200]
            reason = f"connection error ({type(exc).__name__}{': ' + detail if detail else ''})"
            raise _Transient("connection_error", reason) from None
        status = response.status_code
        if status in (200, 206):
            try:
                return read_answer(response.content)
            except ValueError as exc:
                raise _Transient("malformed_response", f"unreadable response: {exc}") from None
        message = _server_message(response, self.api_key.get_secret_value())
        if status in (401, 403):
            raise ApiKeyRejected(
                f"the IHC API rejected the API key (HTTP {status}: {message}); check "
                f"{API_KEY_ENV} or the Prefect Secret block '{SECRET_BLOCK}'"
            )
        if status == 429:
            delay = retry_after_seconds(response.headers.get("retry-after"))
            if delay is not None and delay > self.settings.backoff_max_s:
                raise _BatchFailed(
                    f"HTTP 429: {message}; the server asks to wait {delay:.0f} s, longer than "
                    f"backoff_max_s ({self.settings.backoff_max_s:g} s)"
                )
            if delay is not None:
                self._not_before = max(self._not_before, loop.time() + delay)
            raise _Transient("http_429", f"HTTP 429: {message}", delay)
        if status >= 500:
            raise _Transient(f"http_{status}", f"HTTP {status}: {message}")
        raise _BatchFailed(f"HTTP {status}: {message}")

    async def _cached(self, key: str) -> pl.DataFrame | None:
        try:
            return await self.cache.get(key) if key and self.cache else None
        except Exception as exc:
            self._broken_cache(exc)
            return None

    async def _remember(self, key: str, results: pl.DataFrame) -> None:
        try:
            if key and self.cache:
                await self.cache.put(key, results)
        except Exception as exc:
            self._broken_cache(exc)

    def _broken_cache(self, exc: Exception) -> None:
        # A cache is a saving, not a need: the run goes on without it.
        self.cache = None
        self.log.warning("IHC API batch cache not usable, not used in this run: %r", exc)

    def _progress(self, conversions: int) -> None:
        stats = self.stats
        stats.done_batches += 1
        stats.done_conversions += conversions
        stats.elapsed_s = time.perf_counter() - self.started
        every = self.settings.progress_every_batches
        if stats.done_batches % every == 0 or stats.done_batches == stats.batches:
            self.log.info(
                "IHC API: %d/%d batches (%d/%d conversions), %d requests (%.1f/s), "
                "%d retries, %d failed conversions, %d cache hits",
                stats.done_batches,
                stats.batches,
                stats.done_conversions,
                stats.conversions_sent,
                stats.requests,
                stats.requests_per_s,
                stats.retries,
                stats.failed_conversions,
                stats.cache_hits,
            )
        if self.on_progress is not None:
            self.on_progress(replace(stats, retry_reasons=Counter(stats.retry_reasons)))

    def outcome(self) -> ApiAttribution:
        """Results in the journeys' session order; failures by conversion_id."""
        # Each answer's rows in the order sent, by one join for the whole run.
        order = self.packed.sessions.select(
            pl.col("conversion_id", "session_id").cast(pl.String), _row=pl.int_range(pl.len())
        )
        results = (
            pl.concat([pl.DataFrame(schema=RESULT_SCHEMA), *self.results])
            .join(order, on=["conversion_id", "session_id"])
            .sort("_row")
            .drop("_row")
        )
        failed = pl.concat(self.failed).unique("conversion_id", keep="first").sort("conversion_id")
        self.stats.failed_conversions = failed.height
        self.stats.elapsed_s = time.perf_counter() - self.started
        return ApiAttribution(results, failed, self.stats, self.packed.truncated)


def attribute_journeys(
    journeys: pl.DataFrame,
    settings: ApiSettings,
    api_key: SecretStr | str,
    *,
    cache: BatchCache | None = None,
    on_progress: Callable[[ApiStats], None] | None = None,
    log: logging.Logger | logging.LoggerAdapter[Any] = logger,
) -> ApiAttribution:
    """Attribute every journey of ``journeys`` with the IHC API (call it where no event
    loop runs).

    ``journeys`` is sorted by (conversion_id, timestamp, session_id) with the session
    columns of the contract (others are ignored). ``cache`` serves and keeps validated
    batch results; ``on_progress`` is called after each batch. ``ApiKeyRejected`` stops
    the run.
    """
    packed = pack_batches(
        journeys,
        settings.max_journeys_per_request,
        settings.max_sessions_per_request,
        settings.long_journey_policy,
    )
    if packed.truncated:
        log.warning(
            "%d journey(s) have more than %d sessions: only their most recent sessions are sent",
            len(packed.truncated),
            settings.max_sessions_per_request,
        )
    key = api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)
    return asyncio.run(_Run(packed, settings, key, cache, on_progress, log).run())
