"""The local IHC-compatible server speaks the API contract, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.settings import LocalModelSettings, RedistributionParameter
from tasks.ihc_client import request_body, wire_sessions
from tasks.ihc_server import ServerHandle
from tasks.local_model import compute_ihc
from tests.helpers import ihc_server_process

ENDPOINT = "/v1/compute_ihc?conv_type_id=shop"
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
    parameter = orjson.dumps(redistribution.as_payload() if redistribution else {})
    return request_body(wire_sessions(journeys), parameter)


_http = httpx.Client(timeout=10)


def post(server: ServerHandle, body: bytes | dict[str, Any], key: str | None) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = {"x-api-key": key} if key is not None else {}
    return _http.post(server.url + ENDPOINT, content=content, headers=headers)


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
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    journeys = make_journeys([1, 4, 7, 2, 5], shared=True)
    response = post(server, body_of(journeys, REDISTRIBUTION), ihc_api_key)
    assert response.status_code == 200
    payload = response.json()
    assert payload["statusCode"] == 200
    assert payload["partialFailureErrors"] == []
    got = pl.DataFrame(payload["value"])
    expected = compute_ihc(journeys, LocalModelSettings(), REDISTRIBUTION)
    assert_frame_equal(got, expected)
    # The parameter matters: without it the numbers differ.
    assert not compute_ihc(journeys)["ihc"].equals(expected["ihc"])


def test_api_key_missing_is_401_and_wrong_is_403(
    ihc_server: Callable[..., ServerHandle], make_journeys
) -> None:
    server = ihc_server()
    body = body_of(make_journeys([2]))
    assert post(server, body, None).status_code == 401
    wrong = post(server, body, "not-the-key")
    assert wrong.status_code == 403
    assert wrong.json() == {"statusCode": 403, "message": "invalid API key"}
    assert [record.outcome for record in server.stats.log] == ["401", "403"]


def test_limits_are_enforced_with_400(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(max_journeys=3, max_sessions=10)
    too_many_journeys = post(server, body_of(make_journeys([1, 1, 1, 1])), ihc_api_key)
    assert too_many_journeys.status_code == 400
    assert "too many customer journeys in one request: 4 (at most 3)" in too_many_journeys.text
    too_many_sessions = post(server, body_of(make_journeys([6, 5])), ihc_api_key)
    assert too_many_sessions.status_code == 400
    assert "too many sessions in one request: 11 (at most 10)" in too_many_sessions.text
    assert post(server, body_of(make_journeys([6, 4])), ihc_api_key).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "body must be"),
        ({"customer_journeys": "nope"}, "body must be"),
        ({"customer_journeys": [{"session_id": "s"}]}, "every session needs a conversion_id"),
        (
            {"customer_journeys": [], "redistribution_parameter": {"holder": {"direction": "up"}}},
            "invalid redistribution_parameter",
        ),
    ],
)
def test_unreadable_requests_are_400(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, body: Any, message: str
) -> None:
    response = post(ihc_server(), body, ihc_api_key)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_conv_type_id_is_required(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server()
    response = httpx.post(
        server.url + "/v1/compute_ihc",
        content=body_of(make_journeys([2])),
        headers={"x-api-key": ihc_api_key},
    )
    assert response.status_code == 400
    assert "conv_type_id" in response.json()["message"]


def test_unparseable_journeys_are_406_in_a_206_and_the_rest_answered(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str
) -> None:
    good = [
        session("good", "g1", "2023-09-01 10:00:00"),
        session("good", "g2", "2023-09-02 09:00:00 +0200", conversion=1),
    ]
    bad = {
        "bad-time": [session("bad-time", "t1", "01.09.2023 10:00", conversion=1)],
        "bad-flag": [session("bad-flag", "f1", "2023-09-01 10:00:00", holder_engagement=2)],
        "no-label": [
            {k: v for k, v in session("no-label", "l1", "2023-09-01 10:00:00").items()}
            | {"channel_label": None, "conversion": 1}
        ],
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
    response = post(ihc_server(), {"customer_journeys": rows}, ihc_api_key)
    assert response.status_code == 206
    payload = response.json()
    assert payload["statusCode"] == 206
    errors = {entry["conversion_id"]: entry for entry in payload["partialFailureErrors"]}
    assert set(errors) == set(bad)
    assert {entry["statusCode"] for entry in errors.values()} == {406}
    assert "timestamp 01.09.2023 10:00 is not" in errors["bad-time"]["message"]
    assert "flags must be 0 or 1" in errors["bad-flag"]["message"]
    assert "missing channel_label" in errors["no-label"]["message"]
    assert errors["after"]["message"] == "journey has sessions after the conversion"
    assert "0 sessions with conversion = 1" in errors["no-conversion"]["message"]
    assert "appears twice" in errors["twice"]["message"]
    answered = pl.DataFrame(payload["value"])
    assert answered["conversion_id"].unique().to_list() == ["good"]
    assert answered["ihc"].sum() == pytest.approx(1.0)


def test_faults_are_deterministic_under_a_seed(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    bodies = [body_of(make_journeys([2, 3], prefix=f"b{n}")) for n in range(25)]
    options = {"rate_500": 0.3, "malformed_rate": 0.2, "partial_failure_rate": 0.3}

    def outcomes(seed: int) -> list[tuple[str, str]]:
        server = ihc_server(seed=seed, **options)
        # Sent twice each: the second attempt of a body draws anew.
        for body in bodies + bodies:
            post(server, body, ihc_api_key)
        return [(record.outcome, ",".join(record.conversion_ids)) for record in server.stats.log]

    first = outcomes(seed=1)
    assert outcomes(seed=1) == first
    assert outcomes(seed=2) != first
    kinds = {outcome for outcome, _ in first}
    assert {"200", "206", "500", "malformed"} <= kinds


def test_a_script_fixes_the_first_attempts_of_every_body(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(script=("429", "503"), retry_after="7")
    body = body_of(make_journeys([2]))
    first, second, third = (post(server, body, ihc_api_key) for _ in range(3))
    assert first.status_code == 429
    assert first.headers["retry-after"] == "7"
    assert second.status_code == 503
    assert third.status_code == 200
    assert post(server, body_of(make_journeys([3])), ihc_api_key).status_code == 429


def test_wrong_sums_scale_a_journeys_ihc(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(wrong_sums_rate=0.5, seed=3)
    response = post(server, body_of(make_journeys([2] * 20)), ihc_api_key)
    sums = dict(
        pl.DataFrame(response.json()["value"])
        .group_by("conversion_id")
        .agg(pl.col("ihc").sum())
        .iter_rows()
    )
    assert server.stats.wrong_sums
    for conversion_id, total in sums.items():
        expected = 0.8 if conversion_id in server.stats.wrong_sums else 1.0
        assert total == pytest.approx(expected)


def test_broken_answers_drop_timeout_and_malformed(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    body = body_of(make_journeys([2]))
    dropped = ihc_server(script=("drop",))
    with pytest.raises(httpx.TransportError):
        post(dropped, body, ihc_api_key)
    held = ihc_server(script=("timeout",), timeout_hold_s=5)
    started = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            held.url + ENDPOINT, content=body, headers={"x-api-key": ihc_api_key}, timeout=0.3
        )
    assert time.perf_counter() - started < 2
    malformed = post(ihc_server(script=("malformed",)), body, ihc_api_key)
    assert malformed.status_code == 200
    with pytest.raises(ValueError):
        orjson.loads(malformed.content)


def test_latency_does_not_block_other_requests(
    ihc_server: Callable[..., ServerHandle], ihc_api_key: str, make_journeys
) -> None:
    server = ihc_server(latency_ms=300)
    bodies = [body_of(make_journeys([3, 2], prefix=f"p{n}")) for n in range(8)]

    async def send_all() -> list[int]:
        async with httpx.AsyncClient(headers={"x-api-key": ihc_api_key}, timeout=10) as client:
            responses = await asyncio.gather(
                *(client.post(server.url + ENDPOINT, content=body) for body in bodies)
            )
        return [response.status_code for response in responses]

    started = time.perf_counter()
    statuses = asyncio.run(send_all())
    elapsed = time.perf_counter() - started
    assert statuses == [200] * 8
    assert server.stats.max_in_flight == 8
    assert 0.3 <= elapsed < 0.3 * 3


def test_runs_from_the_command_line(ihc_api_key: str, make_journeys) -> None:
    with ihc_server_process(ihc_api_key, "--latency-ms", "30") as url:
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(headers={"x-api-key": ihc_api_key}) as client:
            for n in range(10):
                body = body_of(make_journeys([3], prefix=f"cli{n}"))
                assert client.post(url + ENDPOINT, content=body).status_code == 200
        stats = httpx.get(url + "/_stats").json()
    assert stats["requests"] == 10
    # Responses leave on time: not before the latency, and (its timers being precise
    # to well under a millisecond) not half a millisecond after it either.
    assert 30 <= stats["response_ms_p50"] < 30.5, stats
