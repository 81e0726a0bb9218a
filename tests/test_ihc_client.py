"""The IHC API client against the local IHC-compatible server, over real loopback HTTP."""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable
from typing import Any

import polars as pl
import pytest
from polars.testing import assert_frame_equal
from prefect import flow
from prefect.blocks.system import Secret
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)
from prefect.filesystems import LocalFileSystem
from prefect.results import ResultStore
from pydantic import SecretStr

from config.errors import ApiKeyRejected, SettingsError
from config.secrets import resolve_api_key
from config.settings import (
    ApiSettings,
    LocalModelSettings,
    RedistributionParameter,
    load_settings,
)
from tasks.attribution import (
    PROGRESS_ARTIFACT_KEY,
    ResultStoreBatchCache,
    attribute,
    check_results,
)
from tasks.batching import pack_batches
from tasks.ihc_client import ApiStats, attribute_journeys, read_answer
from tasks.ihc_server import ServerHandle
from tasks.local_model import compute_ihc

REDISTRIBUTION = RedistributionParameter.model_validate(
    {
        "holder": {
            "direction": "any_session",
            "receive_threshold": 0,
            "redistribution_channel_labels": ["Direct Traffic"],
        }
    }
)
Server = Callable[..., ServerHandle]


def api_settings(server: ServerHandle, **overrides: Any) -> ApiSettings:
    values: dict[str, Any] = {
        "base_url": server.url,
        "conv_type_id": "shop",
        "concurrency": 4,
        "max_retries": 3,
        "backoff_base_s": 0.001,
        "backoff_max_s": 2.0,
        "timeout_s": 5.0,
    }
    return ApiSettings(**(values | overrides))


def sizes(count: int) -> list[int]:
    return [1 + (n * 7) % 9 for n in range(count)]


def local_results(journeys: pl.DataFrame, redistribution=None) -> pl.DataFrame:
    return compute_ihc(journeys, LocalModelSettings(), redistribution)


def test_results_equal_the_servers_model_session_by_session(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    journeys = make_journeys(sizes(60), shared=True)
    settings = api_settings(
        server, max_journeys_per_request=7, redistribution_parameter=REDISTRIBUTION
    )
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, local_results(journeys, REDISTRIBUTION))
    assert outcome.stats.requests == outcome.stats.batches == 9
    assert outcome.stats.conversions_sent == 60
    assert outcome.stats.sessions_sent == journeys.height


def test_requests_respect_the_limits_and_never_split_a_journey(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    # The server refuses (400) anything over the limits, so a violation fails the run.
    server = ihc_server(max_journeys=7, max_sessions=25)
    # Short journeys first (the journey cap binds), then longer ones (the session cap binds).
    journeys = make_journeys([1] * 30 + sizes(50))
    settings = api_settings(server, max_journeys_per_request=7, max_sessions_per_request=25)
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    assert outcome.failed.height == 0
    log = server.stats.log
    assert {record.outcome for record in log} == {"200"}
    assert max(server.stats.journeys_per_request) == 7
    assert max(server.stats.sessions_per_request) <= 25
    carried = [cid for record in log for cid in record.conversion_ids]
    assert sorted(carried) == sorted(journeys["conversion_id"].unique().to_list())
    assert len(log) == len(pack_batches(journeys, 7, 25, "keep_recent"))
    assert sum(server.stats.sessions_per_request) == journeys.height


@pytest.mark.parametrize("concurrency", [1, 4])
def test_the_concurrency_setting_is_reached_and_never_exceeded(
    ihc_server: Server, ihc_api_key: str, make_journeys, concurrency: int
) -> None:
    server = ihc_server(latency_ms=80)
    journeys = make_journeys([2] * 12)
    settings = api_settings(server, concurrency=concurrency, max_journeys_per_request=1)
    started = time.perf_counter()
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    elapsed = time.perf_counter() - started
    assert outcome.failed.height == 0
    assert server.stats.max_in_flight == concurrency
    waves = 12 // concurrency
    assert elapsed >= waves * 0.08
    if concurrency > 1:
        assert elapsed < 12 * 0.08  # faster than one request at a time could be


@pytest.mark.parametrize(("retry_after", "at_least_s"), [("0.4", 0.4), ("date:2", 1.0)])
def test_429_is_retried_after_the_retry_after_delay(
    ihc_server: Server, ihc_api_key: str, make_journeys, retry_after: str, at_least_s: float
) -> None:
    server = ihc_server(script=("429",), retry_after=retry_after)
    journeys = make_journeys([3, 2])
    outcome = attribute_journeys(journeys, api_settings(server, concurrency=1), ihc_api_key)
    first, second = server.stats.log
    assert (first.outcome, second.outcome) == ("429", "200")
    assert second.arrived - first.arrived >= at_least_s
    assert outcome.stats.retries == 1
    assert outcome.stats.retry_reasons == {"http_429": 1}
    assert_frame_equal(outcome.results, local_results(journeys))


def test_a_retry_after_beyond_backoff_max_fails_the_batch_without_waiting(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("429",), retry_after="3600")
    started = time.perf_counter()
    outcome = attribute_journeys(make_journeys([2]), api_settings(server), ihc_api_key)
    assert time.perf_counter() - started < 1.5
    assert server.stats.requests == 1
    assert outcome.failed["reason"].to_list() == [
        "HTTP 429: too many requests; the server asks to wait 3600 s, longer than "
        "backoff_max_s (2 s)"
    ]


def test_server_errors_are_retried_until_success(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("500", "503"))
    journeys = make_journeys([2, 4, 1])
    settings = api_settings(server, max_journeys_per_request=1)
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, local_results(journeys))
    assert outcome.stats.retries == 6
    assert outcome.stats.retry_reasons == {"http_500": 3, "http_503": 3}
    assert server.stats.by_status == {500: 3, 503: 3, 200: 3}


def test_exhausted_retries_fail_that_batch_and_the_run_goes_on(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(rate_503=0.5, seed=11)
    journeys = make_journeys(sizes(30))
    settings = api_settings(server, max_journeys_per_request=2, max_retries=1)
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    always_503 = {
        cid
        for record in server.stats.log
        for cid in record.conversion_ids
        if {r.outcome for r in server.stats.requests_for(cid)} == {"503"}
    }
    assert always_503
    assert set(outcome.failed["conversion_id"]) == always_503
    assert set(outcome.failed["reason"]) == {
        "gave up after 2 attempt(s): HTTP 503: injected server error"
    }
    attributed = set(outcome.results["conversion_id"])
    assert attributed == set(journeys["conversion_id"]) - always_503
    assert all(len(server.stats.requests_for(cid)) <= 2 for cid in always_503)


def test_a_bad_request_is_not_retried_and_fails_its_conversions_with_the_message(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(max_journeys=3)
    journeys = make_journeys([2] * 12)
    outcome = attribute_journeys(
        journeys, api_settings(server, max_journeys_per_request=5), ihc_api_key
    )
    # Batches of 5, 5 and 2 journeys: the two of 5 are refused, once each.
    assert [record.outcome for record in server.stats.log].count("400") == 2
    assert all(len(server.stats.requests_for(cid)) == 1 for cid in journeys["conversion_id"])
    assert outcome.failed.height == 10
    assert set(outcome.failed["reason"]) == {
        "HTTP 400: too many customer journeys in one request: 5 (at most 3)"
    }
    assert outcome.results["conversion_id"].n_unique() == 2
    assert outcome.stats.retries == 0


@pytest.mark.parametrize(("sent_key", "status"), [("wrong-key-0b1c", 403), ("", 401)])
def test_a_rejected_key_stops_the_run_at_once_and_is_never_shown(
    ihc_server: Server,
    ihc_api_key: str,
    make_journeys,
    caplog: pytest.LogCaptureFixture,
    sent_key: str,
    status: int,
) -> None:
    server = ihc_server(latency_ms=50)
    caplog.set_level(logging.DEBUG)
    settings = api_settings(server, max_journeys_per_request=1, concurrency=3)
    with pytest.raises(ApiKeyRejected) as raised:
        attribute_journeys(make_journeys([2] * 30), settings, SecretStr(sent_key))
    message = str(raised.value)
    assert message.startswith(f"the IHC API rejected the API key (HTTP {status}")
    assert "IHC_API_KEY" in message
    # Only the requests already in flight were made.
    assert server.stats.requests <= 3
    shown = "\n".join(
        [message, repr(raised.value), *traceback.format_exception(raised.value)]
        + [record.getMessage() for record in caplog.records]
    )
    for secret in {sent_key, ihc_api_key} - {""}:
        assert secret not in shown


def test_partial_failures_are_recorded_and_the_rest_kept(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(partial_failure_rate=0.3, seed=4)
    late = make_journeys([3], prefix="late").with_columns(
        conversion=pl.Series([0, 1, 0])  # converts before its last session: a 406
    )
    journeys = pl.concat([make_journeys(sizes(25)), late])
    outcome = attribute_journeys(journeys, api_settings(server), ihc_api_key)
    failed = dict(outcome.failed.iter_rows())
    assert set(failed) == set(server.stats.partial_failures)
    assert failed.pop("late-00000") == (
        "API partial failure (406): journey has sessions after the conversion"
    )
    assert failed
    assert set(failed.values()) == {
        "API partial failure (500): journey could not be attributed (injected partial failure)"
    }
    kept = journeys.filter(~pl.col("conversion_id").is_in(list(server.stats.partial_failures)))
    assert_frame_equal(outcome.results, local_results(kept))


def test_wrong_sums_fail_their_conversions_and_are_never_renormalised(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(wrong_sums_rate=0.3, seed=9)
    journeys = make_journeys(sizes(30))
    outcome = attribute_journeys(journeys, api_settings(server), ihc_api_key)
    assert server.stats.wrong_sums
    assert set(outcome.failed["conversion_id"]) == server.stats.wrong_sums
    assert all(reason.startswith("ihc sums to 0.8") for reason in outcome.failed["reason"])
    assert not set(outcome.results["conversion_id"]) & server.stats.wrong_sums
    kept = journeys.filter(~pl.col("conversion_id").is_in(list(server.stats.wrong_sums)))
    assert_frame_equal(outcome.results, local_results(kept))


def test_answers_are_read_tolerantly_and_a_wrong_shape_is_refused() -> None:
    # Numbers as integers or text, ids as numbers, extra and missing fields: read as a
    # JSON reader would (missing or unreadable values become null and fail validation).
    answer = read_answer(
        b'{"statusCode": 206, "value": ['
        b'{"conversion_id": 7, "session_id": "s1", "initializer": 1, "holder": "0.5",'
        b' "closer": 0, "ihc": 0.75, "extra": [1, 2]},'
        b'{"conversion_id": "c2", "session_id": "s2", "ihc": "n/a"}],'
        b' "partialFailureErrors": [{"conversionId": "c3", "status": 406, "error": "bad"},'
        b' {"statusCode": 500}]}'
    )
    assert answer.results.rows() == [
        ("7", "s1", 1.0, 0.5, 0.0, 0.75),
        ("c2", "s2", None, None, None, None),
    ]
    assert answer.failures == [("c3", "API partial failure (406): bad")]
    plain = read_answer(b'{"value": [{"conversion_id": "c", "session_id": "s", "ihc": 1}]}')
    assert plain.results.rows() == [("c", "s", None, None, None, 1.0)]
    assert plain.failures == []
    for body, problem in (
        (b'{"value": [{"conversion_id": "c", "ihc": 1}', "not valid JSON"),
        (b"", "not valid JSON"),
        (b'[{"value": []}]', "no list 'value'"),
        (b'{"statusCode": 200}', "no list 'value'"),
        (b'{"value": [null]}', "wrong shape"),
        (b'{"value": [], "partialFailureErrors": {"c": 1}}', "wrong shape"),
    ):
        with pytest.raises(ValueError, match=problem):
            read_answer(body)


def test_answers_are_checked_the_same_in_any_row_order(make_journeys) -> None:
    journeys = make_journeys([3, 1, 4, 2])
    expected = local_results(journeys)

    def check(results: pl.DataFrame) -> dict[str, str]:
        return dict(check_results(journeys, results).iter_rows())

    for results in (expected, expected.reverse()):  # as sent; in another order
        assert check(results) == {}
    wrong = expected.with_columns(
        ihc=pl.when(pl.col("conversion_id") == "conv-00002").then(0.0).otherwise("ihc")
    )
    for results in (wrong, wrong.reverse()):
        assert check(results) == {"conv-00002": "ihc sums to 0.0 instead of 1"}
    # The reversed frame's last row is conv-00000's first session.
    assert check(wrong.reverse().head(-1)) == {
        "conv-00000": "1 sent session(s) missing from the result",
        "conv-00002": "ihc sums to 0.0 instead of 1",
    }
    extra = pl.concat([expected, expected.head(1).with_columns(session_id=pl.lit("s-new"))])
    assert check(extra) == {"conv-00000": "1 returned session(s) were not sent"}
    assert check(pl.concat([expected, expected.head(1)])) == {
        "conv-00000": "a session is returned more than once"
    }
    # Values outside [0, 1] or not a number fail their conversion even when they sum to 1.
    assert (
        expected["conversion_id"][:8].to_list()
        == ["conv-00000"] * 3 + ["conv-00001"] + ["conv-00002"] * 4
    )
    for rows, values, reason in (
        (slice(0, 3), [1.5, -0.25, -0.25], "ihc outside [0, 1]"),
        (slice(4, 8), [float("nan"), 0.5, 0.25, 0.25], "ihc missing or not a number"),
        (slice(4, 8), [None, 0.5, 0.25, 0.25], "ihc missing or not a number"),
    ):
        ihc = expected["ihc"].to_list()
        ihc[rows] = values
        strange = expected.with_columns(ihc=pl.Series(ihc, dtype=pl.Float64))
        broken = strange["conversion_id"][rows.start]
        for results in (strange, strange.reverse()):
            assert check(results) == {broken: reason}


def test_timeouts_dropped_connections_and_unreadable_bodies_are_retried(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("timeout", "drop", "malformed"), timeout_hold_s=5)
    journeys = make_journeys([3, 1, 2])
    settings = api_settings(server, timeout_s=0.5, max_journeys_per_request=2)
    outcome = attribute_journeys(journeys, settings, ihc_api_key)
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, local_results(journeys))
    assert outcome.stats.retry_reasons == {
        "timeout": 2,
        "connection_error": 2,
        "malformed_response": 2,
    }
    assert outcome.stats.requests == 8


def test_a_cached_batch_costs_no_request(
    ihc_server: Server, ihc_api_key: str, make_journeys, tmp_path
) -> None:
    server = ihc_server()
    cache = ResultStoreBatchCache(
        ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    )
    journeys = make_journeys(sizes(20))
    settings = api_settings(server, max_journeys_per_request=6)
    first = attribute_journeys(journeys, settings, ihc_api_key, cache=cache)
    assert first.stats.requests == first.stats.batches == 4
    again = attribute_journeys(journeys, settings, ihc_api_key, cache=cache)
    assert server.stats.requests == 4
    assert (again.stats.requests, again.stats.cache_hits) == (0, 4)
    assert_frame_equal(again.results, first.results)
    # A fresh store over the same files (a re-run in a new process) hits as well.
    reopened = ResultStoreBatchCache(
        ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    )
    assert attribute_journeys(journeys, settings, ihc_api_key, cache=reopened).stats.requests == 0
    # Another conversion type is another question.
    other = attribute_journeys(
        journeys, settings.model_copy(update={"conv_type_id": "app"}), ihc_api_key, cache=cache
    )
    assert other.stats.requests == 4


def test_batches_with_failures_are_not_cached(
    ihc_server: Server, ihc_api_key: str, make_journeys, tmp_path
) -> None:
    server = ihc_server(partial_failure_rate=0.1, seed=6)
    cache = ResultStoreBatchCache(
        ResultStore(result_storage=LocalFileSystem(basepath=str(tmp_path)))
    )
    journeys = make_journeys(sizes(40))
    settings = api_settings(server, max_journeys_per_request=5)
    first = attribute_journeys(journeys, settings, ihc_api_key, cache=cache)
    failed_first = set(first.failed["conversion_id"])
    dirty = {
        index
        for index, record in enumerate(server.stats.log)
        if failed_first & set(record.conversion_ids)
    }
    assert 0 < len(dirty) < first.stats.batches
    again = attribute_journeys(journeys, settings, ihc_api_key, cache=cache)
    assert again.stats.requests == len(dirty)
    assert again.stats.cache_hits == first.stats.batches - len(dirty)


def test_progress_is_reported_per_batch_and_logged_every_n(
    ihc_server: Server, ihc_api_key: str, make_journeys, caplog: pytest.LogCaptureFixture
) -> None:
    server = ihc_server()
    events: list[ApiStats] = []
    settings = api_settings(server, max_journeys_per_request=1, progress_every_batches=4)
    caplog.set_level(logging.INFO, logger="tasks.ihc_client")
    attribute_journeys(make_journeys([2] * 10), settings, ihc_api_key, on_progress=events.append)
    assert [event.done_batches for event in events] == list(range(1, 11))
    assert {event.batches for event in events} == {10}
    assert events[-1].requests == 10
    assert events[-1].percent == 100.0
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("IHC API: ")]
    assert [line.split(" batches")[0] for line in lines] == [
        "IHC API: 4/10",
        "IHC API: 8/10",
        "IHC API: 10/10",
    ]
    assert "10 requests" in lines[-1]


def test_long_journeys_keep_their_most_recent_sessions_or_fail(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    journeys = make_journeys([2, 12, 3])
    long_id = "conv-00001"
    settings = api_settings(server, max_journeys_per_request=1, max_sessions_per_request=5)
    kept = attribute_journeys(journeys, settings, ihc_api_key)
    assert kept.truncated == [long_id]
    assert kept.stats.truncated_journeys == 1
    assert kept.failed.height == 0
    (record,) = server.stats.requests_for(long_id)
    assert record.sessions == 5
    recent = journeys.filter(pl.col("conversion_id") == long_id).tail(5)
    assert_frame_equal(
        kept.results.filter(pl.col("conversion_id") == long_id), local_results(recent)
    )
    failing = attribute_journeys(
        journeys, settings.model_copy(update={"long_journey_policy": "fail"}), ihc_api_key
    )
    assert failing.failed["conversion_id"].to_list() == [long_id]
    assert "long_journey_policy is 'fail'" in failing.failed["reason"][0]
    assert len(server.stats.requests_for(long_id)) == 1  # not sent the second time


def test_api_settings_from_the_ihc_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IHC_API_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("IHC_CONV_TYPE_ID", "app")
    monkeypatch.setenv("ATTRIBUTION_API__CONV_TYPE_ID", "web")  # the IHC name wins
    api = load_settings().api
    assert (api.base_url, api.conv_type_id) == ("http://127.0.0.1:9", "app")
    monkeypatch.setenv("IHC_API_URL", "ftp://example.com")
    with pytest.raises(SettingsError, match=r"api\.base_url"):
        load_settings()


def test_the_api_key_comes_from_the_environment_or_the_secret_block(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("IHC_API_KEY", " env-key-1 ")
    from_env = resolve_api_key()
    assert from_env is not None
    assert from_env.get_secret_value() == "env-key-1"
    assert "env-key-1" not in repr(from_env)
    monkeypatch.delenv("IHC_API_KEY")
    assert resolve_api_key() is None  # no block yet: quietly no key
    Secret(value="block-key-2").save("ihc-api-key", overwrite=True)
    try:
        from_block = resolve_api_key()
        assert from_block is not None
        assert from_block.get_secret_value() == "block-key-2"
    finally:
        Secret.delete("ihc-api-key")
    assert resolve_api_key() is None


def test_the_prefect_task_reports_progress_and_reuses_cached_batches(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    journeys = make_journeys(sizes(12))
    settings = api_settings(server, max_journeys_per_request=4)

    @flow
    def attribute_twice() -> tuple[Any, Any]:
        key = SecretStr(ihc_api_key)
        local = LocalModelSettings()
        return (
            attribute(journeys, "api", settings, local, key),
            attribute(journeys, "api", settings, local, key),
        )

    state = attribute_twice(return_state=True)
    first, second = state.result()
    assert_frame_equal(first.results, local_results(journeys))
    assert (first.requests, second.requests, second.cache_hits) == (3, 0, 3)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[PROGRESS_ARTIFACT_KEY]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
            )
        )
    # Created by the flow, so they belong to the flow run, not to a task run.
    assert len(artifacts) == 2
    assert {artifact.data for artifact in artifacts} == {100.0}
    assert {artifact.task_run_id for artifact in artifacts} == {None}
