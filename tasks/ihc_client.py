"""Each journey's credit per session from the IHC attribution API (provider "api").

``attribute_journeys`` packs the journeys into requests (``tasks.batching``), sends
them with ``api.concurrency`` workers, each with one keep-alive connection (so at
most that many requests are in flight; the workers start spread over
``api.ramp_up_s``; httpx over ``tasks.ihc_transport``), reads and
validates the answers in a thread while the workers go on sending, and handles every
status of the contract (``shared/spec/ihc-api.md``):

- 200 / 206: the results are validated per conversion — every returned
  (conversion_id, session_id) was sent, every sent session came back once, each ihc
  lies in [0, 1] and they sum to 1 (1e-6) — and conversions that break this, or that
  the server lists in ``partialFailureErrors``, are failed with the reason (never
  renormalised); the rest of the batch is kept.
- 400 and other 4xx: no retry; the batch's conversions are failed with the server's message.
- 401 / 403: ``ApiKeyRejected`` at once; requests in flight are cancelled.
- 429: retried after ``Retry-After`` (seconds or HTTP-date), and every worker holds
  back until then; without the header, like 5xx. A ``Retry-After`` longer than
  ``backoff_max_s`` is not waited for: the batch fails now and the next run sends it.
- 5xx, timeouts, connection errors, unreadable bodies: retried with exponential
  backoff and full jitter (uniform in [0, min(backoff_max_s, backoff_base_s·2^n)]),
  at most ``max_retries`` times; then the batch's conversions fail with the last reason
  and the run goes on.

Choices where the contract is silent:

- ``partialFailureErrors`` entries are read tolerantly: the conversion id from
  ``conversion_id``, ``conversionId`` or ``customer_journey_id``; the text from
  ``message``, ``error`` or ``detail``; the code from ``statusCode``, ``status_code``
  or ``status``. An entry without a recognisable id fails no conversion by itself,
  but its conversion's sessions are then missing from ``value`` and it fails validation.
- Result rows for conversions that were not in the batch are dropped (and logged).
- Only batches whose every conversion validated are cached; a batch with failures
  is sent again next time, so its failed conversions get their retry.

The API key is held as a ``SecretStr`` and leaves it only for the request header;
reasons, exceptions and log lines name the status and error type, never headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import io
import logging
import os
import random
import ssl
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlencode

import httpx
import orjson
import polars as pl
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr, ValidationError

from config.settings import ApiSettings, SettingsError
from tasks.attribution import SUM_TOLERANCE, invalid_results, rows_frame
from tasks.batching import FAILED_SCHEMA, PackResult, pack_batches
from tasks.ihc_transport import ConnectionTransport, proxied

if TYPE_CHECKING:
    from prefect.results import ResultStore

logger = logging.getLogger(__name__)

ENDPOINT = "/v1/compute_ihc"
API_KEY_ENV = "IHC_API_KEY"
API_URL_ENV = "IHC_API_URL"
CONV_TYPE_ENV = "IHC_CONV_TYPE_ID"
SECRET_BLOCK = "ihc-api-key"
PROGRESS_ARTIFACT_KEY = "ihc-api-progress"
# How much lower than the event loop's the priority of the thread that makes requests
# ahead is (a nice value, Linux): it works while the first requests are out, and at
# equal priority it took the cores from the event loop and the server just then.
MAKER_NICENESS = 10


def _lower_priority() -> None:
    # On Linux a thread has its own nice value; elsewhere the thread keeps its priority.
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(
                os.PRIO_PROCESS,
                threading.get_native_id(),
                os.getpriority(os.PRIO_PROCESS, 0) + MAKER_NICENESS,
            )


# Threads for what runs do off their event loop: kept for the process, as a pool of
# each run's own would add its start-up and shut-down to the run's time. One reads and
# checks answers; one makes requests ahead, at a lower priority.
_THREADS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ihc-api")
_MAKER = ThreadPoolExecutor(
    max_workers=1, thread_name_prefix="ihc-api-maker", initializer=_lower_priority
)
# Requests are made ahead of the workers for up to this many sessions (about 20 MB of
# JSON), in a thread: a run of ~20,000 conversions has them all made while its first
# requests are out, when the event loop has little else to do.
LOOKAHEAD_SESSIONS = 100_000
# Answers arriving within ``api.ramp_up_s`` and this margin (for answers a little late)
# of a round's first one are validated together.
CHECK_ROUND_MARGIN_S = 0.005
RESULT_SCHEMA = pl.Schema(
    {
        "conversion_id": pl.String,
        "session_id": pl.String,
        "initializer": pl.Float64,
        "holder": pl.Float64,
        "closer": pl.Float64,
        "ihc": pl.Float64,
    }
)
FLAG_COLUMNS = ("holder_engagement", "closer_engagement", "conversion", "impression_interaction")
_ID_KEYS = ("conversion_id", "conversionId", "customer_journey_id")
_MESSAGE_KEYS = ("message", "error", "detail")
_CODE_KEYS = ("statusCode", "status_code", "status")


class ApiKeyRejected(Exception):
    """The IHC API refused the API key (401/403): the run cannot go on."""


class _Retryable(Exception):
    """A transient failure of one attempt; ``delay`` overrides the backoff when set."""

    def __init__(self, kind: str, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.delay = delay


class _BatchFailed(Exception):
    """The whole batch fails with this reason, without another attempt."""


@dataclass
class ApiStats:
    """Counts of one run. ``retry_reasons`` counts retries by kind (e.g. ``http_503``)."""

    batches: int = 0
    requests: int = 0
    retries: int = 0
    cache_hits: int = 0
    failed_conversions: int = 0
    truncated_journeys: int = 0
    conversions_sent: int = 0
    sessions_sent: int = 0
    elapsed_s: float = 0.0
    retry_reasons: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ProgressEvent:
    """Where a run stands after a batch completed."""

    done_batches: int
    total_batches: int
    requests: int
    retries: int
    failed_conversions: int
    cache_hits: int
    elapsed_s: float

    @property
    def percent(self) -> float:
        return 100.0 * self.done_batches / self.total_batches if self.total_batches else 100.0


@dataclass(frozen=True)
class ApiAttribution:
    """Validated results per session, failed conversions with their reason, and counts.

    ``truncated`` lists the conversions sent with only their most recent sessions
    (``long_journey_policy: keep_recent``): their results cover the sessions sent.
    """

    results: pl.DataFrame
    failed: pl.DataFrame
    stats: ApiStats
    truncated: list[str] = field(default_factory=list)


class BatchCache(Protocol):
    """Validated results of earlier requests, by request key."""

    async def get(self, key: str) -> pl.DataFrame | None: ...

    async def put(self, key: str, results: pl.DataFrame) -> None: ...


class ResultStoreBatchCache:
    """Batch results in Prefect's result storage (local files unless a block is configured).

    Without ``store``, the current run's result store (or the default storage)
    is used. Entries expire after ``ttl`` (``None``: never), so a retrained model is
    asked again after a while.
    """

    prefix = "ihc-api-batch-"

    def __init__(
        self, store: ResultStore | None = None, ttl: timedelta | None = timedelta(days=7)
    ) -> None:
        from prefect.results import get_default_result_storage, get_result_store

        store = store if store is not None else get_result_store()
        if store.result_storage is None:
            # Resolve now, outside the event loop: resolving may call the Prefect API.
            storage = get_default_result_storage(_sync=True)
            store = store.model_copy(update={"result_storage": storage})
        self._store = store
        self._ttl = ttl

    async def get(self, key: str) -> pl.DataFrame | None:
        storage_key = self.prefix + key
        if not await self._store.aexists(storage_key):
            return None
        record = await self._store.aread(storage_key)
        return pl.DataFrame(record.result, schema=RESULT_SCHEMA)

    async def put(self, key: str, results: pl.DataFrame) -> None:
        expiration = datetime.now(UTC) + self._ttl if self._ttl is not None else None
        # Plain lists, so any result serializer (pickle or json) can store them.
        await self._store.awrite(
            results.select(RESULT_SCHEMA.names()).to_dict(as_series=False),
            key=self.prefix + key,
            expiration=expiration,
        )


def _secret(api_key: SecretStr | str) -> SecretStr:
    return api_key if isinstance(api_key, SecretStr) else SecretStr(api_key)


def _redact(text: str, secret: str) -> str:
    return text.replace(secret, "***") if secret else text


def wire_sessions(sessions: pl.DataFrame) -> pl.DataFrame:
    """The session fields the API expects, typed as it wants them on the wire.

    Column by column (Series operations run on the calling thread): a ``select``
    spreads the columns over polars' pool, whose threads then spin — 0.85 ms of CPU for
    5,500 rows instead of 0.57 ms, taken from the cores the event loop and the server use.
    """
    timestamp = sessions["timestamp"]
    if getattr(timestamp.dtype, "time_zone", None) is not None:
        timestamp = timestamp.dt.convert_time_zone("UTC")
    return pl.DataFrame(
        [
            sessions["conversion_id"].cast(pl.String),
            sessions["session_id"].cast(pl.String),
            timestamp.dt.strftime("%Y-%m-%d %H:%M:%S"),
            sessions["channel_label"].cast(pl.String),
            *(sessions[name].cast(pl.Int64) for name in FLAG_COLUMNS),
        ]
    )


def request_body(wire: pl.DataFrame, redistribution: bytes) -> bytes:
    """The JSON body for one batch; equal batches give equal bytes (the cache relies on it)."""
    return b"".join(
        (
            b'{"customer_journeys":',
            wire.write_json().encode() if wire.height else b"[]",
            b',"redistribution_parameter":',
            redistribution,
            b"}",
        )
    )


def cache_key(settings: ApiSettings, body: bytes) -> str:
    """sha256 of what determines the answer: endpoint, conversion type and body."""
    digest = hashlib.sha256()
    for part in (b"ihc-batch-v1", settings.base_url.encode(), settings.conv_type_id.encode(), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def _first(entry: Mapping[str, Any], keys: tuple[str, ...]) -> Any:
    return next((entry[key] for key in keys if entry.get(key) is not None), None)


_ANSWER_SCHEMA = pl.Schema(
    {
        "value": pl.List(pl.Struct(RESULT_SCHEMA)),
        "partialFailureErrors": pl.List(
            pl.Struct(dict.fromkeys((*_ID_KEYS, *_MESSAGE_KEYS, *_CODE_KEYS), pl.String))
        ),
    }
)


@dataclass(frozen=True)
class Answer:
    """A 200/206 body, read: its result rows (``RESULT_SCHEMA``) and its partial failures."""

    results: pl.DataFrame
    failures: list[tuple[str, str]]


def read_answer(content: bytes) -> Answer:
    """The results and partial failures [(conversion_id, reason)] of a 200/206 body.

    polars reads the body in one pass, without building Python objects and without
    holding the GIL (the checker thread goes on meanwhile); a body it cannot take that
    way (a value of another type, a null row, broken JSON) is read again with orjson,
    which says what is wrong: values of the wrong type become null (and fail
    validation), a wrong shape raises ``ValueError`` (worth a retry).
    """
    if content[:64].lstrip()[:1] == b"{":
        try:
            frame = pl.read_json(io.BytesIO(content), schema=_ANSWER_SCHEMA)
        except pl.exceptions.PolarsError:
            frame = None
        if frame is not None and frame.height == 1:
            value = frame["value"][0]
            errors = frame["partialFailureErrors"][0]
            if value is not None and not value.null_count():
                entries = errors.to_list() if errors is not None else []
                return Answer(value.struct.unnest(), _failures(entries))
    return _read_answer_with_orjson(content)


def _read_answer_with_orjson(content: bytes) -> Answer:
    try:
        payload = orjson.loads(content)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"response is not valid JSON ({exc.msg})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("value"), list):
        raise ValueError("response has no list 'value'")
    rows = payload["value"]
    errors = payload.get("partialFailureErrors") or []
    if not all(isinstance(row, dict) for row in rows) or not isinstance(errors, list):
        raise ValueError("response 'value' or 'partialFailureErrors' has the wrong shape")
    return Answer(rows_frame(rows, RESULT_SCHEMA), _failures(errors))


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


@dataclass(frozen=True)
class _Checked:
    """The outcome of validating the answers of some batches together."""

    good: pl.DataFrame
    failed: pl.DataFrame
    # Results of each batch whose every conversion is valid (cacheable).
    clean: dict[int, pl.DataFrame]
    foreign_rows: int
    # Every batch is clean and its results hold its sent rows in the sent order.
    in_order: bool = False


# Far above the rounding of a running sum over a check round's rows (< 1e-9).
_SUM_MARGIN = 1e-7


def checked_in_order(sent: pl.DataFrame, answers: dict[int, Answer]) -> _Checked | None:
    """The common case, in a few vectorised steps; ``None`` when it is not the case.

    That is: no partial failures, the answers hold the sent pairs in the sent order
    (the batches' answers concatenated in the order of ``sent``), and every value is
    valid. ``sent`` as for ``check_answers``; its ``_batch`` is not needed. About
    0.6 ms for 16 answers of 100 journeys, against 1.7 ms for the full check.
    """
    results = pl.concat([answer.results for answer in answers.values()], rechunk=False)
    if not _aligned(sent, answers, results):
        return None
    # A conversion's rows are consecutive (sent order): its sum is the difference of
    # the running sum at its last row and at the last row before it. That differs from
    # a plain sum by far less than _SUM_MARGIN; sums closer than that to the tolerance
    # go to the full check, which decides them as it always does. One select: each
    # Series operation would set up a query plan of its own (about twice the time).
    ihc, ids = pl.col("ihc"), pl.col("conversion_id")
    running = ihc.cum_sum().filter(ids.ne_missing(ids.shift(-1)))
    bad_values, bad_sums = results.select(
        ihc.is_null().any() | (ihc.is_nan() | (ihc < 0) | (ihc > 1)).any(),
        ((running.diff().fill_null(running.first()) - 1).abs() > SUM_TOLERANCE - _SUM_MARGIN)
        .any()
        .alias("sums"),
    ).row(0)
    if bad_values or bad_sums:
        return None
    return _Checked(
        results.hstack(sent.select("_row")),
        pl.DataFrame(schema=FAILED_SCHEMA),
        {index: answer.results for index, answer in answers.items()},
        0,
        in_order=True,
    )


def _aligned(sent: pl.DataFrame, answers: dict[int, Answer], results: pl.DataFrame) -> bool:
    """Whether ``results`` (the answers' rows, concatenated) hold exactly the sent pairs
    in the sent order, with no partial failures."""
    return (
        not any(answer.failures for answer in answers.values())
        and results.height == sent.height
        and results["conversion_id"].equals(sent["conversion_id"], check_names=False)
        and results["session_id"].equals(sent["session_id"], check_names=False)
    )


def check_answers(sent: pl.DataFrame, answers: dict[int, Answer]) -> _Checked:
    """Validate the answers of several batches in one vectorised pass.

    ``sent`` has the (conversion_id, session_id) pairs of exactly the batches in
    ``answers``, with their ``_batch`` and their ``_row`` in the run's sessions. A
    conversion sits in one batch only. ``good`` keeps ``_row``, so the run's results
    are put in order by a sort rather than a join.
    """
    return checked_in_order(sent, answers) or _check_fully(sent, answers)


def _check_fully(sent: pl.DataFrame, answers: dict[int, Answer]) -> _Checked:
    """``check_answers`` when ``checked_in_order`` did not settle it."""
    results = pl.concat([answer.results for answer in answers.values()])
    sent_pairs = sent.lazy()
    batch_of = sent_pairs.select("conversion_id", "_batch").unique("conversion_id")
    # Answers holding the sent pairs in the sent order, with invalid values: only the
    # values need checking, and each result row's place is that of its sent row.
    if _aligned(sent, answers, results):
        partial = pl.LazyFrame(schema=FAILED_SCHEMA)
        ours = results.lazy()
        invalid = invalid_results(sent_pairs, ours, aligned=True)
        tagged = (
            results.hstack(sent.select("_batch", "_row"))
            .lazy()
            .join(invalid, on="conversion_id", how="anti")
        )
    else:
        partial = (
            pl.LazyFrame(
                [failure for answer in answers.values() for failure in answer.failures],
                schema=FAILED_SCHEMA,
                orient="row",
            )
            .unique("conversion_id", keep="first", maintain_order=True)
            .join(batch_of, on="conversion_id", how="semi")
        )
        expected = sent_pairs.join(partial, on="conversion_id", how="anti")
        ours = results.lazy().join(expected, on="conversion_id", how="semi")
        invalid = invalid_results(expected, ours)
        # A valid conversion's rows are its sent pairs, each once: the join adds their place.
        tagged = ours.join(invalid, on="conversion_id", how="anti").join(
            expected.select("conversion_id", "session_id", "_batch", "_row"),
            on=["conversion_id", "session_id"],
        )
    failed_lazy = pl.concat([partial, invalid])
    # One query plan for all outputs; the in-memory engine sets up in a fraction of
    # the time of the streaming default, which is most of the time on a few answers.
    tagged, failed, dirty_batches, ours_rows = pl.collect_all(
        [
            tagged,
            failed_lazy,
            failed_lazy.join(batch_of, on="conversion_id").select("_batch"),
            ours.select(pl.len()),
        ],
        engine="in-memory",
    )
    dirty = set(dirty_batches["_batch"].to_list())
    clean_ids = [index for index in answers if index not in dirty]
    clean: dict[int, pl.DataFrame] = {}
    if clean_ids:
        clean = {
            key[0]: part.drop("_row")
            for key, part in tagged.filter(pl.col("_batch").is_in(clean_ids))
            .partition_by("_batch", as_dict=True, include_key=False)
            .items()
        }
        empty = tagged.clear().drop("_batch", "_row")
        clean.update({index: empty for index in clean_ids if index not in clean})
    return _Checked(tagged.drop("_batch"), failed, clean, results.height - ours_rows.item())


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
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


def _server_message(response: httpx.Response) -> str:
    """A response's error text: ``message``/``error``/``detail`` of a JSON body, or the text."""
    try:
        payload = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        payload = None
    if isinstance(payload, dict):
        message = _first(payload, _MESSAGE_KEYS)
        if message is not None:
            return str(message)[:500]
    return response.text[:500].strip() or response.reason_phrase


@dataclass(frozen=True)
class _Request:
    """A batch's request body and cache key, the attempts made so far and, once one is
    answered, the answer's body (read by the checker)."""

    index: int
    body: bytes
    key: str
    attempts: int
    content: bytes = b""


@dataclass(frozen=True)
class _Prepared:
    """Made while the first wave is out: the later rows' wire form, the sent pairs."""

    wire_rest: pl.DataFrame
    pairs: pl.DataFrame


class _Run:
    """The state of one attribution run, shared by its workers and its checker.

    Workers send requests and hand each answer's body over without reading it; the
    checker reads and validates whatever answers have arrived in one pass in a thread,
    so a worker's connection never idles while results are checked, and the event loop
    does little more than HTTP. An answer that cannot be read goes back to the workers
    to be asked for again; so a worker with nothing left to send closes its connection
    and waits for the answers not read yet before it stops. The requests after the
    first wave are made in a thread as well, ahead of the workers (``LOOKAHEAD_SESSIONS``).
    """

    def __init__(
        self,
        packed: PackResult,
        settings: ApiSettings,
        api_key: SecretStr,
        cache: BatchCache | None,
        on_progress: Callable[[ProgressEvent], None] | None,
        log: logging.Logger | logging.LoggerAdapter[Any],
        started: float,
    ) -> None:
        self.packed = packed
        self.settings = settings
        self.api_key = api_key
        self.cache = cache
        self.on_progress = on_progress
        self.log = log
        self.started = started
        # The requests of the first wave of batches are made by the workers as they go;
        # the later ones in a thread, a wave at a time, ahead of the workers.
        self._wave = min(settings.concurrency, len(packed))
        first_rows = packed.bounds[self._wave - 1][1] if packed else 0
        self._wire_head = wire_sessions(packed.sessions.slice(0, first_rows))
        # The waves of requests after the first, in order, as they are made.
        self._waves: list[asyncio.Future[dict[int, tuple[bytes, str]]]] = []
        self._prepared: asyncio.Future[_Prepared] | None = None
        query = urlencode({"conv_type_id": settings.conv_type_id})
        # Parsed once, not on every request.
        self.url = httpx.URL(f"{settings.base_url}{ENDPOINT}?{query}")
        parameter = settings.redistribution_parameter
        self.redistribution = orjson.dumps(parameter.as_payload() if parameter else {})
        self.stats = ApiStats(
            batches=len(packed),
            truncated_journeys=len(packed.truncated),
            failed_conversions=packed.failed.height,
            conversions_sent=packed.journeys,
            sessions_sent=packed.sessions.height,
        )
        # Validated results: with their ``_row``, or (most) by batch in the sent order.
        self.results: list[pl.DataFrame] = []
        self._in_order: dict[int, pl.DataFrame] = {}
        self.failed: list[pl.DataFrame] = [packed.failed]
        self.done = 0
        self._next = 0
        self._not_before = 0.0
        self._cache_broken = False
        # Answers not read yet, by batch; batches to send again (an unreadable answer).
        self._answers: dict[int, _Request] = {}
        self._again: deque[tuple[_Request, _Retryable]] = deque()
        self._unread = 0
        self._arrived = asyncio.Event()
        self._round_done = asyncio.Event()
        self._all_out = asyncio.Event()
        self._sending = True
        self._workers = 0

    # ---- workers ---------------------------------------------------------------------

    async def worker(self, number: int, connect: Callable[[], httpx.AsyncClient]) -> None:
        """Send batches one after another on one connection until none is left.

        Worker ``number`` starts ``number / concurrency`` of ``ramp_up_s`` late, so the
        first requests (and their answers) do not all come at once.
        """
        self._workers += 1
        try:
            await asyncio.sleep(number * self.settings.ramp_up_s / self.settings.concurrency)
            while True:
                async with connect() as client:
                    while self._again or self._next < len(self.packed.bounds):
                        if self._again:
                            await self._attempts(client, *self._again.popleft())
                        else:
                            index = self._next
                            self._next += 1
                            if self._next == len(self.packed.bounds):
                                self._all_out.set()  # the checker stops gathering
                            await self._batch(client, index)
                # Nothing to send: the connection is closed now rather than at the end,
                # but an answer not read yet may have to be asked for again.
                while self._unread and not self._again:
                    await self._round_done.wait()
                if not self._again:
                    return
        finally:
            self._workers -= 1
            if not self._workers:
                self.sending_done()

    def prepare(self) -> None:
        """Start making, in a thread, what the requests after the first wave and the
        checker need: their wire form and the sent pairs."""
        if self._prepared is None:
            self._prepared = asyncio.get_running_loop().run_in_executor(_MAKER, self._prepare)
            if self._wave < len(self.packed):
                self._make_ahead(self._wave)

    def _prepare(self) -> _Prepared:
        sessions = self.packed.sessions
        return _Prepared(
            wire_rest=wire_sessions(sessions.slice(self._wire_head.height)),
            # Every sent (conversion_id, session_id) with its row number.
            pairs=pl.DataFrame(
                [
                    sessions["conversion_id"].cast(pl.String),
                    sessions["session_id"].cast(pl.String),
                    pl.Series("_row", range(sessions.height), pl.Int64),
                ]
            ),
        )

    async def _ready(self) -> _Prepared:
        self.prepare()
        assert self._prepared is not None
        return await asyncio.shield(self._prepared)

    def _make_ahead(self, index: int) -> None:
        """Start making the waves of requests up to ``LOOKAHEAD_SESSIONS`` past batch
        ``index``'s start, the wave of ``index`` at least."""
        bounds = self.packed.bounds
        limit = bounds[index][0] + LOOKAHEAD_SESSIONS
        while (first := self._wave * (len(self._waves) + 1)) < len(bounds) and (
            bounds[first][0] <= limit
        ):
            last = min(first + self._wave, len(bounds))
            self._waves.append(asyncio.ensure_future(self._make_wave(first, last)))

    async def _make_wave(self, first: int, last: int) -> dict[int, tuple[bytes, str]]:
        """The requests of batches ``first`` to ``last`` (excluded), made in a thread."""
        wire = (await self._ready()).wire_rest
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(_MAKER, self._requests, wire, first, last)

    def _requests(self, wire: pl.DataFrame, first: int, last: int) -> dict[int, tuple[bytes, str]]:
        """(body, cache key) of batches ``first`` to ``last`` (excluded) by batch, from the
        wire form of the rows after the first wave."""
        bounds = self.packed.bounds
        offset = self._wire_head.height
        return {
            index: self._made(wire.slice(start - offset, end - start))
            for index in range(first, last)
            for start, end in [bounds[index]]
        }

    def _made(self, wire: pl.DataFrame) -> tuple[bytes, str]:
        """A batch's request body and its cache key (only with a cache: else unused)."""
        body = request_body(wire, self.redistribution)
        return body, cache_key(self.settings, body) if self.cache is not None else ""

    async def _request(self, index: int) -> tuple[bytes, str]:
        """The body of batch ``index``'s request and its cache key."""
        if index < self._wave:
            start, end = self.packed.bounds[index]
            return self._made(self._wire_head.slice(start, end - start))
        self._make_ahead(index)
        return (await asyncio.shield(self._waves[index // self._wave - 1])).pop(index)

    def _sent(self, pairs: pl.DataFrame, indexes: Collection[int]) -> pl.DataFrame:
        """The (conversion_id, session_id) pairs of these batches, with their ``_row``."""
        return pl.concat(
            [
                pairs.slice(start, end - start)
                for start, end in map(self.packed.bounds.__getitem__, indexes)
            ],
            rechunk=False,
        )

    def _check(
        self, pairs: pl.DataFrame, contents: dict[int, bytes]
    ) -> tuple[_Checked | None, dict[int, str]]:
        """Read and validate these answers: the common case first, else the full check.

        Also returns why the answers that could not be read could not be.
        """
        answers: dict[int, Answer] = {}
        unreadable: dict[int, str] = {}
        for index, content in contents.items():
            try:
                answers[index] = read_answer(content)
            except ValueError as exc:
                unreadable[index] = str(exc)
        if not answers:
            return None, unreadable
        sent = self._sent(pairs, answers)
        checked = checked_in_order(sent, answers)
        if checked is not None:
            return checked, unreadable
        lengths = [end - start for start, end in map(self.packed.bounds.__getitem__, answers)]
        batch = pl.Series("_batch", list(answers), pl.Int64).repeat_by(
            pl.Series(lengths, dtype=pl.UInt32)
        )
        return _check_fully(sent.insert_column(2, batch.explode()), answers), unreadable

    def _conversions(self, index: int) -> pl.DataFrame:
        start, end = self.packed.bounds[index]
        return self.packed.sessions.slice(start, end - start)

    def _fail(self, conversions: pl.DataFrame, reason: str) -> None:
        failed = conversions.select(
            pl.col("conversion_id").unique(maintain_order=True), reason=pl.lit(reason)
        )
        self.failed.append(failed)
        self.stats.failed_conversions += failed.height
        self._completed()

    async def _batch(self, client: httpx.AsyncClient, index: int) -> None:
        body, key = await self._request(index)
        cached = await self._cached(key)
        if cached is not None:
            self.stats.cache_hits += 1
            self.results.append(
                cached.join(
                    self._sent((await self._ready()).pairs, [index]),
                    on=["conversion_id", "session_id"],
                    how="left",
                )
            )
            self._completed()
            return
        await self._attempts(client, _Request(index, body, key, 0), None)

    async def _attempts(
        self, client: httpx.AsyncClient, request: _Request, failure: _Retryable | None
    ) -> None:
        """Send until an answer comes (handed to the checker) or the batch fails.

        ``request.attempts`` were made so far; ``failure`` is why the last one failed.
        """
        attempts = self.settings.max_retries + 1
        made = request.attempts
        while True:
            if failure is not None:
                if made >= attempts:
                    self._fail(
                        self._conversions(request.index),
                        f"gave up after {attempts} attempt(s): {failure.reason}",
                    )
                    return
                if not await self._back_off(request.index, failure, made - 1):
                    return
            try:
                content = await self._send(client, request.body)
            except _BatchFailed as exc:
                self._fail(self._conversions(request.index), str(exc))
                return
            except _Retryable as exc:
                failure = exc
                made += 1
                continue
            self._answers[request.index] = _Request(
                request.index, request.body, request.key, made + 1, content
            )
            self._unread += 1
            self._arrived.set()
            return

    async def _back_off(self, index: int, failure: _Retryable, attempt: int) -> bool:
        """Wait before the next attempt after ``attempt`` (0-based) failed; False: fail now."""
        delay = failure.delay
        if delay is None:
            cap = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2**attempt)
            delay = random.uniform(0, cap)
        elif delay > self.settings.backoff_max_s:
            self._fail(
                self._conversions(index),
                f"{failure.reason}; the server asks to wait {delay:.0f} s, longer than "
                f"backoff_max_s ({self.settings.backoff_max_s:g} s)",
            )
            return False
        else:
            loop = asyncio.get_running_loop()
            self._not_before = max(self._not_before, loop.time() + delay)
        self.stats.retries += 1
        self.stats.retry_reasons[failure.kind] += 1
        await asyncio.sleep(delay)
        return True

    async def _send(self, client: httpx.AsyncClient, body: bytes) -> bytes:
        """One attempt: a 200/206 body, or _Retryable, _BatchFailed or ApiKeyRejected raised."""
        hold = self._not_before - asyncio.get_running_loop().time()
        if hold > 0:
            await asyncio.sleep(hold)
        self.stats.requests += 1
        try:
            response = await client.post(self.url, content=body)
        except httpx.TimeoutException as exc:
            raise _Retryable(
                "timeout", f"timed out after {self.settings.timeout_s:g} s ({type(exc).__name__})"
            ) from None
        except httpx.RequestError as exc:
            # What the connection said (a refused port, an untrusted certificate, …):
            # about the socket, never the request's headers.
            detail = str(exc)[:200]
            reason = f"connection error ({type(exc).__name__}{': ' + detail if detail else ''})"
            raise _Retryable("connection_error", reason) from None
        status = response.status_code
        self.stats.statuses[status] += 1
        if status in (200, 206):
            return response.content
        message = _redact(_server_message(response), self.api_key.get_secret_value())
        if status in (401, 403):
            raise ApiKeyRejected(
                f"the IHC API rejected the API key (HTTP {status}: {message}); check "
                f"{API_KEY_ENV} or the Prefect Secret block '{SECRET_BLOCK}'"
            )
        if status == 429:
            raise _Retryable(
                "http_429",
                f"HTTP 429: {message}",
                _retry_after(response.headers.get("retry-after")),
            )
        if status >= 500:
            raise _Retryable(f"http_{status}", f"HTTP {status}: {message}")
        raise _BatchFailed(f"HTTP {status}: {message}")

    # ---- checker ---------------------------------------------------------------------

    def sending_done(self) -> None:
        self._sending = False
        self._all_out.set()
        self._arrived.set()

    async def checker(self) -> None:
        """Validate arrived answers in rounds until the workers are done and all are checked.

        A round costs about the same for one answer as for twenty, so it takes what
        arrives within ``api.ramp_up_s`` (and ``CHECK_ROUND_MARGIN_S``) of its first
        answer. The workers' answers come spread over the ramp-up: a round takes one wave
        of them and runs in the quiet before the next wave, not over the first answers
        of the next one, which are those of the workers that send the last requests
        (same-process A/B at C = 16: +0.1 to +0.3 points against a fixed 0.05 s). Once
        every batch has gone out, a round takes what is there at once, so little is left
        to check when the last answer comes.
        """
        window = self.settings.ramp_up_s + CHECK_ROUND_MARGIN_S
        while self._sending or self._answers:
            await self._arrived.wait()
            if self._next < len(self.packed.bounds):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_out.wait(), window)
            self._arrived.clear()
            if not self._answers:
                continue
            taken, self._answers = self._answers, {}
            pairs = (await self._ready()).pairs
            checked, unreadable = await asyncio.get_running_loop().run_in_executor(
                _THREADS,
                self._check,
                pairs,
                {index: arrived.content for index, arrived in taken.items()},
            )
            for index, reason in unreadable.items():
                failure = _Retryable("malformed_response", f"unreadable response: {reason}")
                self._again.append((taken[index], failure))
            self._unread -= len(taken)
            # Workers waiting for the last answers go on (send again, or stop).
            self._round_done.set()
            self._round_done.clear()
            if checked is None:
                continue
            if checked.foreign_rows:
                self.log.warning(
                    "IHC API returned %d row(s) for conversions not asked about; ignored",
                    checked.foreign_rows,
                )
            if checked.in_order:
                self._in_order.update(checked.clean)
            else:
                self.results.append(checked.good)
            if checked.failed.height:
                self.failed.append(checked.failed)
                self.stats.failed_conversions += checked.failed.height
            for index, results in checked.clean.items():
                await self._remember(taken[index].key, results)
            for _ in range(len(taken) - len(unreadable)):
                self._completed()

    # ---- cache -----------------------------------------------------------------------

    async def _cached(self, key: str) -> pl.DataFrame | None:
        if self.cache is None or self._cache_broken:
            return None
        try:
            return await self.cache.get(key)
        except Exception as exc:
            self._cache_broken = True
            self.log.warning("IHC API batch cache unreadable, not used in this run: %r", exc)
            return None

    async def _remember(self, key: str, results: pl.DataFrame) -> None:
        if self.cache is None or self._cache_broken:
            return
        try:
            await self.cache.put(key, results)
        except Exception as exc:
            self._cache_broken = True
            self.log.warning("IHC API batch cache not writable, not used in this run: %r", exc)

    # ---- progress and outcome --------------------------------------------------------

    def _completed(self) -> None:
        self.done += 1
        stats = self.stats
        stats.elapsed_s = time.perf_counter() - self.started
        if self.done % self.settings.progress_every_batches == 0 or self.done == stats.batches:
            self.log.info(
                "IHC API: %d/%d batches, %d requests (%.1f/s), %d retries, "
                "%d failed conversions, %d cache hits",
                self.done,
                stats.batches,
                stats.requests,
                stats.requests_per_s,
                stats.retries,
                stats.failed_conversions,
                stats.cache_hits,
            )
        if self.on_progress is not None:
            self.on_progress(
                ProgressEvent(
                    done_batches=self.done,
                    total_batches=stats.batches,
                    requests=stats.requests,
                    retries=stats.retries,
                    failed_conversions=stats.failed_conversions,
                    cache_hits=stats.cache_hits,
                    elapsed_s=stats.elapsed_s,
                )
            )

    def outcome(self) -> ApiAttribution:
        """Results in the journeys' session order; failures by conversion_id."""
        batches = [(index, self._in_order[index]) for index in sorted(self._in_order)]
        if self.results:
            bounds = self.packed.bounds
            numbered = [
                part.with_columns(_row=pl.int_range(bounds[index][0], bounds[index][1]))
                for index, part in batches
            ]
            results = (
                pl.concat(
                    [
                        pl.DataFrame(schema={**RESULT_SCHEMA, "_row": pl.Int64}),
                        *numbered,
                        *self.results,
                    ]
                )
                .sort("_row")
                .drop("_row")
            )
        else:
            # Batches hold consecutive rows: in batch order they are in the run's order.
            # (Left in chunks: what comes next rechunks if it needs to.)
            results = pl.concat(
                [pl.DataFrame(schema=RESULT_SCHEMA), *(part for _, part in batches)],
                rechunk=False,
            )
        failed = pl.concat([part for part in self.failed if part.height] or self.failed[:1])
        if failed.height:
            failed = failed.unique("conversion_id", keep="first", maintain_order=True).sort(
                "conversion_id"
            )
        self.stats.failed_conversions = failed.height
        self.stats.elapsed_s = time.perf_counter() - self.started
        return ApiAttribution(
            results=results, failed=failed, stats=self.stats, truncated=self.packed.truncated
        )


@contextlib.contextmanager
def _gc_frozen() -> Iterator[None]:
    """Keep the cyclic GC off the objects that exist now, until the block ends.

    They (Prefect, polars, …) outlive an attribution run; a full GC pass over them
    stalls every request in flight for ~40 ms, a few times a minute at 320 requests/s.
    """
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


async def _until_done_or_error(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    """Run the coroutines; on the first error cancel the others and raise it."""
    tasks = [asyncio.create_task(coroutine) for coroutine in coroutines]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for finished in done:
            error = finished.exception()
            if error is not None:
                raise error
    finally:
        for pending in tasks:
            pending.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def attribute_journeys_async(
    journeys: pl.DataFrame,
    settings: ApiSettings,
    api_key: SecretStr | str,
    *,
    cache: BatchCache | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> ApiAttribution:
    """Attribute every journey of ``journeys`` with the IHC API.

    ``journeys`` is sorted by (conversion_id, timestamp, session_id) with the session
    columns of the contract (others are ignored). ``cache`` serves and keeps validated
    batch results; ``on_progress`` is called after each batch. ``ApiKeyRejected`` stops
    the run.
    """
    with _gc_frozen():
        started = time.perf_counter()
        log = log if log is not None else logger
        packed = pack_batches(
            journeys,
            settings.max_journeys_per_request,
            settings.max_sessions_per_request,
            settings.long_journey_policy,
        )
        run = _Run(packed, settings, _secret(api_key), cache, on_progress, log, started)
        if packed.truncated:
            log.warning(
                "%d journey(s) have more than %d sessions: only their most recent sessions "
                "are sent",
                len(packed.truncated),
                settings.max_sessions_per_request,
            )
        workers = min(settings.concurrency, len(packed))
        if not workers:
            return run.outcome()
        run.prepare()
        # One client per worker, each with one keep-alive connection of its own
        # (``tasks.ihc_transport``): C connections in all, and no pool to manage. They
        # share one TLS context; plain http (a local server) needs none, and loading the
        # CA bundle would cost more than the first requests.
        tls: ssl.SSLContext | None = (
            httpx.create_ssl_context() if settings.base_url.startswith("https://") else None
        )
        headers = {"x-api-key": run.api_key.get_secret_value(), "content-type": "application/json"}
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        # With a proxy from the environment to be used, httpx's own transport (which
        # honours it) with the same one connection.
        stock = proxied(settings.base_url)

        def connect() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                verify=tls or False,
                headers=headers,
                limits=limits,
                timeout=httpx.Timeout(settings.timeout_s),
                transport=None if stock else ConnectionTransport(tls),
            )

        # The last worker to stop tells the checker, which then checks what is left.
        await _until_done_or_error(
            [*(run.worker(number, connect) for number in range(workers)), run.checker()]
        )
        return run.outcome()


def attribute_journeys(
    journeys: pl.DataFrame,
    settings: ApiSettings,
    api_key: SecretStr | str,
    *,
    cache: BatchCache | None = None,
    on_progress: Callable[[ProgressEvent], None] | None = None,
    log: logging.Logger | logging.LoggerAdapter[Any] | None = None,
) -> ApiAttribution:
    """``attribute_journeys_async`` on a fresh event loop (call it where none is running)."""
    return asyncio.run(
        attribute_journeys_async(
            journeys,
            settings,
            api_key,
            cache=cache,
            on_progress=on_progress,
            log=log,
        )
    )


@task(name="attribute-with-ihc-api", cache_policy=NO_CACHE)
def attribute_with_api(
    journeys: pl.DataFrame, settings: ApiSettings, api_key: SecretStr | str
) -> ApiAttribution:
    """The API attribution as a Prefect task, with a progress artifact and a batch cache."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    run_logger = get_run_logger()
    artifact_id = create_progress_artifact(
        progress=0.0,
        key=PROGRESS_ARTIFACT_KEY,
        description=f"IHC API requests to {settings.base_url}",
        _sync=True,
    )
    last_update = 0.0

    def show(event: ProgressEvent) -> None:
        nonlocal last_update
        # Each update is a blocking API call inside the event loop: at most one a second.
        now = time.monotonic()
        if now - last_update < 1.0 and event.done_batches < event.total_batches:
            return
        last_update = now
        try:
            update_progress_artifact(artifact_id=artifact_id, progress=event.percent, _sync=True)
        except Exception as exc:
            run_logger.debug("progress artifact not updated: %r", exc)

    attribution = attribute_journeys(
        journeys,
        settings,
        api_key,
        cache=ResultStoreBatchCache(),
        on_progress=show,
        log=run_logger,
    )
    stats = attribution.stats
    run_logger.info(
        "IHC API done: %d conversions in %d batches, %d requests, %d retries %s, "
        "%d cache hits, %d failed conversions, %d truncated journeys, %.1f s",
        stats.conversions_sent,
        stats.batches,
        stats.requests,
        stats.retries,
        dict(stats.retry_reasons),
        stats.cache_hits,
        stats.failed_conversions,
        stats.truncated_journeys,
        stats.elapsed_s,
    )
    return attribution


def resolve_api_key(environ: Mapping[str, str] | None = None) -> SecretStr | None:
    """The IHC API key: ``IHC_API_KEY``, else the Prefect Secret block ``ihc-api-key``.

    The block is only asked for when a Prefect API is known to be there (a
    ``PREFECT_API_URL`` or a running flow or task), so a run without one does not start
    a temporary server just to look. A missing block means no key; a block that cannot
    be read is logged as a warning (without the value) and also means no key.
    """
    env = os.environ if environ is None else environ
    value = env.get(API_KEY_ENV, "").strip()
    if value:
        return SecretStr(value)
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.settings import get_current_settings

    if not (get_current_settings().api.url or FlowRunContext.get() or TaskRunContext.get()):
        return None
    from prefect.blocks.system import Secret

    try:
        block = Secret.load(SECRET_BLOCK, _sync=True)
    except ValueError as exc:
        if "Unable to find block document" not in str(exc):
            logger.warning("Prefect Secret block '%s' could not be read: %s", SECRET_BLOCK, exc)
        return None
    except Exception as exc:
        logger.warning(
            "Prefect Secret block '%s' could not be read (%s)", SECRET_BLOCK, type(exc).__name__
        )
        return None
    secret = str(block.get()).strip()
    return SecretStr(secret) if secret else None


def api_settings_from_env(
    settings: ApiSettings, environ: Mapping[str, str] | None = None
) -> ApiSettings:
    """``settings`` with ``IHC_API_URL`` (base_url) and ``IHC_CONV_TYPE_ID`` applied."""
    env = os.environ if environ is None else environ
    updates = {
        key: env[name].strip()
        for name, key in ((API_URL_ENV, "base_url"), (CONV_TYPE_ENV, "conv_type_id"))
        if env.get(name, "").strip()
    }
    if not updates:
        return settings
    try:
        return ApiSettings.model_validate({**settings.model_dump(), **updates})
    except ValidationError as exc:
        problems = "; ".join(f"{item['loc'][0]}: {item['msg']}" for item in exc.errors())
        raise SettingsError(f"{API_URL_ENV}/{CONV_TYPE_ENV}: {problems}") from None
