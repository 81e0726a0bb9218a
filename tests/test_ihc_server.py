"""The local IHC-compatible server speaks the API contract, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.settings import LocalModelSettings, RedistributionParameter
from tasks.ihc_server import ServerHandle
from tasks.local_model import INPUT_COLUMNS, compute_ihc
from tests.helpers import ihc_server_process

Server = Callable[..., ServerHandle]
ENDPOINT = "/v1/compute_ihc?conv_type_id=shop"
# What a dropped or closed connection looks like to httpx, depending on timing.
CONNECTION_LOST = (httpx.RemoteProtocolError, httpx.ReadError)
REDISTRIBUTION = RedistributionParameter.model_validate(
    {
        "holder": {
            "direction": "any_session",
            "receive_threshold": 0,
            "redistribution_channel_labels": ["Direct Traffic"],
        },
        "closer": {
            "direction": "earlier_sessions_only",
            "receive_threshold": 0.05,
            "redistribution_channel_labels": ["Direct Traffic"],
        },
    }
)


def body_of(journeys: pl.DataFrame, redistribution: RedistributionParameter | None = None) -> bytes:
    sessions = journeys.select(INPUT_COLUMNS).with_columns(
        pl.col("timestamp").dt.strftime("%Y-%m-%d %H:%M:%S")
    )
    return orjson.dumps(
        {
            "customer_journeys": sessions.to_dicts(),
            "redistribution_parameter": redistribution.as_payload() if redistribution else {},
        }
    )


_http = httpx.Client(timeout=10)


def post(
    server: ServerHandle, body: bytes | dict[str, Any], key: str | None, **options: Any
) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"x-api-key": key} if key is not None else {}
    return _http.post(server.url + ENDPOINT, content=content, headers=headers, **options)


def session(conversion_id: str, session_id: str, timestamp: str, **overrides: Any) -> dict:
    row = {
        "conversion_id": conversion_id,
        "session_id": session_id,
        "timestamp": timestamp,
        "channel_label": "SEO",
        "holder_engagement": 1,
        "closer_engagement": 0,
        "conversion": 0,
        "impression_interaction": 0,
    }
    return row | overrides


def test_results_are_the_local_model_with_the_requests_redistribution(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    journeys = make_journeys([1, 4, 7, 2, 5], shared=True)
    response = post(server, body_of(journeys, REDISTRIBUTION), ihc_api_key)
    assert response.status_code == 200
    payload = response.json()
    assert payload["statusCode"] == 200
    assert payload["partialFailureErrors"] == []
    expected = compute_ihc(journeys, LocalModelSettings(), REDISTRIBUTION)
    assert_frame_equal(pl.DataFrame(payload["value"]), expected)
    # The parameter matters: without it the numbers differ.
    assert not compute_ihc(journeys)["ihc"].equals(expected["ihc"])
    assert server.stats.journeys_per_request == [5]
    assert server.stats.sessions_per_request == [journeys.height]


def test_api_key_missing_is_401_and_wrong_is_403(ihc_server: Server, make_journeys) -> None:
    server = ihc_server()
    body = body_of(make_journeys([2]))
    missing = post(server, body, None)
    assert missing.status_code == 401
    assert missing.json() == {"statusCode": 401, "message": "missing x-api-key header"}
    wrong = post(server, body, "not-the-key")
    assert wrong.status_code == 403
    assert wrong.json() == {"statusCode": 403, "message": "invalid API key"}
    assert [record.outcome for record in server.stats.log] == ["401", "403"]


def test_limits_are_enforced_with_400(ihc_server: Server, ihc_api_key: str, make_journeys) -> None:
    server = ihc_server(max_journeys=3, max_sessions=10)
    too_many_journeys = post(server, body_of(make_journeys([1, 1, 1, 1])), ihc_api_key)
    assert too_many_journeys.status_code == 400
    assert too_many_journeys.json() == {
        "statusCode": 400,
        "message": "too many customer journeys in one request: 4 (at most 3)",
    }
    too_many_sessions = post(server, body_of(make_journeys([6, 5])), ihc_api_key)
    assert too_many_sessions.status_code == 400
    assert "too many sessions in one request: 11 (at most 10)" in too_many_sessions.text
    assert post(server, body_of(make_journeys([6, 4])), ihc_api_key).status_code == 200
    assert server.stats.by_status == {400: 2, 200: 1}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body must be"),
        ({"customer_journeys": "nope"}, "body must be"),
        ({"customer_journeys": [1, 2]}, "body must be"),
        ({"customer_journeys": [{"session_id": "s"}]}, "every session needs a conversion_id"),
        (
            {"customer_journeys": [], "redistribution_parameter": {"holder": {"direction": "up"}}},
            "invalid redistribution_parameter: holder.direction",
        ),
    ],
)
def test_unreadable_requests_are_400(
    ihc_server: Server, ihc_api_key: str, body: Any, message: str
) -> None:
    response = post(ihc_server(), body, ihc_api_key)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_conv_type_id_is_required_and_other_paths_and_methods_are_refused(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    headers = {"x-api-key": ihc_api_key}
    body = body_of(make_journeys([2]))
    response = httpx.post(server.url + "/v1/compute_ihc", content=body, headers=headers)
    assert response.status_code == 400
    assert "conv_type_id" in response.json()["message"]
    elsewhere = httpx.post(server.url + "/v1/other", content=body, headers=headers)
    assert elsewhere.status_code == 404
    assert elsewhere.json()["statusCode"] == 404
    get = httpx.get(server.url + ENDPOINT, headers=headers)
    assert get.status_code == 405
    assert get.json()["statusCode"] == 405
    assert server.stats.requests == 1


def test_an_empty_request_is_answered_empty(ihc_server: Server, ihc_api_key: str) -> None:
    response = post(ihc_server(), {"customer_journeys": []}, ihc_api_key)
    assert response.json() == {"statusCode": 200, "value": [], "partialFailureErrors": []}


def test_unparseable_journeys_are_406_in_a_206_and_the_rest_answered(
    ihc_server: Server, ihc_api_key: str
) -> None:
    good = [
        session("good", "g1", "2023-09-01 10:00:00", closer_engagement=1),
        session("good", "g2", "2023-09-02 09:00:00 +0200", conversion=1),
    ]
    bad = {
        "bad-time": [session("bad-time", "t1", "01.09.2023 10:00", conversion=1)],
        "bad-flag": [session("bad-flag", "f1", "2023-09-01 10:00:00", holder_engagement=2)],
        "no-label": [session("no-label", "l1", "2023-09-01 10:00:00", channel_label=None)],
        "no-session-id": [session("no-session-id", None, "2023-09-01 10:00:00", conversion=1)],
        "after": [
            session("after", "a1", "2023-09-01 10:00:00", conversion=1),
            session("after", "a2", "2023-09-03 10:00:00"),
        ],
        "no-conversion": [session("no-conversion", "n1", "2023-09-01 10:00:00")],
        "twice": [
            session("twice", "d1", "2023-09-01 10:00:00"),
            session("twice", "d1", "2023-09-02 10:00:00", conversion=1),
        ],
    }
    rows = good + [row for journey in bad.values() for row in journey]
    server = ihc_server()
    response = post(server, {"customer_journeys": rows}, ihc_api_key)
    assert response.status_code == 206
    payload = response.json()
    assert payload["statusCode"] == 206
    errors = {entry["conversion_id"]: entry for entry in payload["partialFailureErrors"]}
    assert set(errors) == set(bad) == set(server.stats.partial_failures)
    assert {entry["statusCode"] for entry in errors.values()} == {406}
    assert "timestamp 01.09.2023 10:00 is not" in errors["bad-time"]["message"]
    assert "flags must be 0 or 1" in errors["bad-flag"]["message"]
    assert errors["no-label"]["message"] == "session l1: missing channel_label"
    assert errors["no-session-id"]["message"] == "a session has no session_id"
    assert errors["after"]["message"] == "journey has sessions after the conversion"
    assert "0 sessions with conversion = 1" in errors["no-conversion"]["message"]
    assert "appears twice" in errors["twice"]["message"]
    # The offset timestamp is read as UTC wall time (07:00), which changes the closer share.
    expected = compute_ihc(
        pl.DataFrame(good).with_columns(
            timestamp=pl.Series([dt.datetime(2023, 9, 1, 10), dt.datetime(2023, 9, 2, 7)])
        )
    )
    assert_frame_equal(pl.DataFrame(payload["value"]), expected)


def test_faults_are_deterministic_under_a_seed(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    bodies = [body_of(make_journeys([2, 3], prefix=f"b{n}")) for n in range(25)]
    options = {"rate_500": 0.3, "malformed_rate": 0.2, "partial_failure_rate": 0.3}

    def outcomes(seed: int, order: list[bytes]) -> set[tuple[str, str, int]]:
        server = ihc_server(seed=seed, **options)
        # Sent twice each: the second attempt of a body draws anew.
        for body in order + order:
            post(server, body, ihc_api_key)
        return {
            (record.outcome, ",".join(record.conversion_ids), attempt)
            for attempt, records in enumerate((server.stats.log[:25], server.stats.log[25:]))
            for record in records
        }

    first = outcomes(1, bodies)
    # The same draws whatever the order the bodies arrive in; other draws under another seed.
    assert outcomes(1, bodies[::-1]) == first
    assert outcomes(2, bodies) != first
    assert {"200", "206", "500", "malformed"} <= {outcome for outcome, _, _ in first}


def test_a_script_fixes_the_first_attempts_of_every_body(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("429", "503", "500"), retry_after="7")
    body = body_of(make_journeys([2]))
    first, second, third, fourth = (post(server, body, ihc_api_key) for _ in range(4))
    assert first.status_code == 429
    assert first.headers["retry-after"] == "7"
    assert first.json() == {"statusCode": 429, "message": "too many requests"}
    assert (second.status_code, third.status_code, fourth.status_code) == (503, 500, 200)
    assert post(server, body_of(make_journeys([3])), ihc_api_key).status_code == 429
    assert server.stats.faults == {"429": 2, "503": 1, "500": 1}


def test_retry_after_can_be_an_http_date(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("429",), retry_after="date:120")
    response = post(server, body_of(make_journeys([2])), ihc_api_key)
    assert response.status_code == 429
    ahead = parsedate_to_datetime(response.headers["retry-after"]) - dt.datetime.now(dt.UTC)
    assert 118 <= ahead.total_seconds() <= 120


def test_injected_partial_failures_and_wrong_sums(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(partial_failure_rate=0.3, wrong_sums_rate=0.5, seed=3)
    response = post(server, body_of(make_journeys([2] * 20)), ihc_api_key)
    assert response.status_code == 206
    failed = {entry["conversion_id"] for entry in response.json()["partialFailureErrors"]}
    assert failed == set(server.stats.partial_failures)
    assert {entry["statusCode"] for entry in response.json()["partialFailureErrors"]} == {500}
    sums = dict(
        pl.DataFrame(response.json()["value"])
        .group_by("conversion_id")
        .agg(pl.col("ihc").sum())
        .iter_rows()
    )
    assert failed and server.stats.wrong_sums and not failed & set(sums)
    assert len(failed) + len(sums) == 20
    for conversion_id, total in sums.items():
        expected = 0.8 if conversion_id in server.stats.wrong_sums else 1.0
        assert total == pytest.approx(expected)


def test_a_dropped_connection_gets_no_answer(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("drop",))
    body = body_of(make_journeys([2]))
    with pytest.raises(CONNECTION_LOST):
        post(server, body, ihc_api_key)
    assert post(server, body, ihc_api_key).status_code == 200
    assert [record.outcome for record in server.stats.log] == ["drop", "200"]
    assert server.stats.log[0].answered is None


def test_a_timeout_holds_the_request_then_closes_it(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    body = body_of(make_journeys([2]))
    held = ihc_server(script=("timeout",), timeout_hold_s=0.5)
    with pytest.raises(httpx.ReadTimeout):
        post(held, body, ihc_api_key, timeout=0.2)
    # A patient client sees the connection closed, without an answer, after the hold.
    started = time.perf_counter()
    with pytest.raises(CONNECTION_LOST):
        post(ihc_server(script=("timeout",), timeout_hold_s=0.5), body, ihc_api_key)
    assert 0.5 <= time.perf_counter() - started < 1.5
    assert held.stats.faults == {"timeout": 1}


def test_a_malformed_answer_is_a_200_with_half_a_body(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("malformed",))
    body = body_of(make_journeys([3]))
    malformed = post(server, body, ihc_api_key)
    assert malformed.status_code == 200
    whole = post(server, body, ihc_api_key).content
    assert malformed.content == whole[: len(whole) // 2]
    assert [record.outcome for record in server.stats.log] == ["malformed", "200"]


def test_stopping_the_server_ends_held_requests(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("timeout",), timeout_hold_s=30)
    errors: list[Exception] = []

    def held_request() -> None:
        try:
            post(server, body_of(make_journeys([2])), ihc_api_key)
        except httpx.HTTPError as exc:
            errors.append(exc)

    client = threading.Thread(target=held_request)
    client.start()
    while server.stats.in_flight == 0:
        time.sleep(0.01)
    started = time.perf_counter()
    server.stop()
    client.join(timeout=5)
    assert time.perf_counter() - started < 2
    assert len(errors) == 1 and isinstance(errors[0], CONNECTION_LOST)


def test_latency_is_a_floor_and_does_not_block_other_requests(
    ihc_server: Server, ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(latency_ms=300, script=("500",))
    bodies = [body_of(make_journeys([3, 2], prefix=f"p{n}")) for n in range(8)]

    async def send_all() -> list[int]:
        async with httpx.AsyncClient(headers={"x-api-key": ihc_api_key}, timeout=10) as client:
            responses = await asyncio.gather(
                *(client.post(server.url + ENDPOINT, content=body) for body in bodies * 2)
            )
        return [response.status_code for response in responses]

    started = time.perf_counter()
    statuses = asyncio.run(send_all())
    elapsed = time.perf_counter() - started
    # Each body's first attempt is an injected 500: errors wait out the latency too.
    assert sorted(statuses) == [200] * 8 + [500] * 8
    assert server.stats.max_in_flight == 16
    assert min(server.stats.response_ms()) >= 300
    assert 0.3 <= elapsed < 0.3 * 3


def test_runs_from_the_command_line(ihc_api_key: str, make_journeys) -> None:
    with ihc_server_process(ihc_api_key, "--latency-ms", "30", "--script", "503,ok") as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(headers={"x-api-key": ihc_api_key}) as client:
            for n in range(10):
                body = body_of(make_journeys([3], prefix=f"cli{n}"))
                assert client.post(url + ENDPOINT, content=body).status_code == 503
                assert client.post(url + ENDPOINT, content=body).status_code == 200
        stats = httpx.get(url + "/_stats").json()
    assert stats["requests"] == 20
    assert stats["by_status"] == {"200": 10, "503": 10}
    assert stats["journeys_per_request"] == [1] * 20
    # Responses leave on time: not before the latency, nor much after it.
    assert 30 <= stats["response_ms_p50"] < 35, stats
