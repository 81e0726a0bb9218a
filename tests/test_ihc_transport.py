"""The IHC client's transport: HTTP/1.1 as servers speak it, TLS, and a proxy honoured."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import ipaddress
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from config.settings import ApiSettings, LocalModelSettings
from tasks.ihc_client import attribute_journeys
from tasks.ihc_server import ServerHandle
from tasks.ihc_transport import ConnectionTransport, proxied
from tasks.local_model import compute_ihc

Server = Callable[..., ServerHandle]
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")


@pytest.fixture
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


def _self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "IHC test server")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certificate_file, key_file = folder / "server.pem", folder / "server.key"
    certificate_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certificate_file, key_file


def _settings(url: str, **overrides: object) -> ApiSettings:
    values: dict[str, object] = {
        "base_url": url,
        "ramp_up_s": 0.0,
        "concurrency": 3,
        "max_journeys_per_request": 4,
        "max_retries": 1,
        "backoff_base_s": 0.001,
        "timeout_s": 5.0,
    }
    return ApiSettings(**(values | overrides))  # type: ignore[arg-type]


def test_the_client_attributes_over_https(
    ihc_server: Server,
    ihc_api_key: str,
    make_journeys,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy_environment: None,
) -> None:
    certificate, key = _self_signed_certificate(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(certificate, key)
    server = ihc_server(tls=tls)
    assert server.url.startswith("https://")
    journeys = make_journeys([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])

    # The server's certificate is not trusted: no answer is taken from it.
    untrusted = attribute_journeys(journeys, _settings(server.url), ihc_api_key)
    assert untrusted.results.height == 0
    assert untrusted.failed.height == 10
    assert untrusted.failed["reason"].str.contains("CERTIFICATE_VERIFY_FAILED").all()
    assert server.stats.requests == 0

    # Trusted the way httpx is told (SSL_CERT_FILE): the whole run goes over TLS.
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate))
    outcome = attribute_journeys(journeys, _settings(server.url), ihc_api_key)
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, compute_ihc(journeys, LocalModelSettings()))
    assert server.stats.requests == outcome.stats.requests == 3


def test_a_proxy_from_the_environment_is_used(
    ihc_server: Server,
    ihc_api_key: str,
    make_journeys,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy_environment: None,
) -> None:
    # The IHC server stands in for the proxy: it serves the absolute URL it is sent.
    server = ihc_server()
    url = "http://ihc-api.invalid"
    assert not proxied(url)
    monkeypatch.setenv("HTTP_PROXY", server.url)
    assert proxied(url)
    journeys = make_journeys([2, 3, 1, 4])
    outcome = attribute_journeys(journeys, _settings(url), ihc_api_key)
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, compute_ihc(journeys, LocalModelSettings()))
    assert server.stats.requests == outcome.stats.requests == 1

    # A host the environment exempts goes direct (and is not there to answer).
    monkeypatch.setenv("NO_PROXY", "ihc-api.invalid")
    assert not proxied(url)
    exempt = attribute_journeys(journeys, _settings(url), ihc_api_key)
    assert exempt.failed.height == 4
    assert server.stats.requests == 1


# ---- the HTTP/1.1 exchange, against a server that answers from a script ----------------


@dataclass
class Seen:
    """A request as the scripted server read it off the socket."""

    connection: int
    head: bytes
    body: bytes


async def _scripted_exchanges(
    script: list[bytes | tuple[bytes, str]],
    requests: int,
    *,
    pause_s: float = 0.0,
    timeout_s: float = 2.0,
) -> tuple[list[httpx.Response | Exception], list[Seen]]:
    """Send ``requests`` POSTs through one ``ConnectionTransport`` to a server that
    answers the n-th request it reads with ``script[n]`` (bytes; with ``"close"``: then
    closes the connection; with ``"cut"``: closes it at once, mid-answer).

    Returns each request's response (read) or the exception it raised, and what the
    server read.
    """
    seen: list[Seen] = []
    connections = 0

    handlers: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        handlers.append(asyncio.current_task())  # type: ignore[arg-type]
        connections += 1
        number = connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])  # type: ignore[index]
                seen.append(Seen(number, head, await reader.readexactly(length)))
                item = script[len(seen) - 1]
                answer, then = (item, "") if isinstance(item, bytes) else item
                writer.write(answer)
                await writer.drain()
                if then:
                    if then == "cut":
                        writer.transport.abort()
                    return
        except asyncio.IncompleteReadError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    outcomes: list[httpx.Response | Exception] = []
    async with (
        server,
        httpx.AsyncClient(transport=ConnectionTransport(), timeout=timeout_s) as client,
    ):
        for number in range(requests):
            try:
                outcomes.append(
                    await client.post(
                        f"http://127.0.0.1:{port}/v1/compute_ihc?conv_type_id=t",
                        content=b'{"n":%d}' % number,
                        headers={"x-api-key": "k"},
                    )
                )
            except httpx.HTTPError as exc:
                outcomes.append(exc)
            await asyncio.sleep(pause_s)
        await client.aclose()
        # Every connection is closed: the server's handlers see it and end.
        await asyncio.wait_for(asyncio.gather(*handlers), 2)
    return outcomes, seen


def _ok(body: bytes, *headers: str) -> bytes:
    lines = ["HTTP/1.1 200 OK", f"content-length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_requests_go_out_as_http_1_1_on_one_kept_alive_connection() -> None:
    outcomes, seen = asyncio.run(_scripted_exchanges([_ok(b'{"a":1}'), _ok(b'{"a":2}')], 2))
    assert [response.json() for response in outcomes] == [{"a": 1}, {"a": 2}]  # type: ignore[union-attr]
    assert [request.connection for request in seen] == [1, 1]
    first = seen[0].head.decode().split("\r\n")
    assert first[0] == "POST /v1/compute_ihc?conv_type_id=t HTTP/1.1"
    fields = {line.lower() for line in first[1:]}
    assert {"x-api-key: k", "content-length: 7"} <= fields
    assert any(field.startswith("host: 127.0.0.1:") for field in fields)
    assert [request.body for request in seen] == [b'{"n":0}', b'{"n":1}']


def test_chunked_gzip_and_interim_answers_are_read() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b'5;ext=1\r\n{"a":\r\n3\r\n[1]\r\n1\r\n}\r\n0\r\ntrailer: x\r\n\r\n'
    )
    packed = gzip.compress(b'{"b":2}')
    zipped = _ok(packed, "content-encoding: gzip")
    interim = b"HTTP/1.1 100 Continue\r\n\r\n" + _ok(b'{"c":3}')
    outcomes, seen = asyncio.run(_scripted_exchanges([chunked, zipped, interim], 3))
    assert [response.json() for response in outcomes] == [{"a": [1]}, {"b": 2}, {"c": 3}]  # type: ignore[union-attr]
    assert [request.connection for request in seen] == [1, 1, 1]


def test_a_connection_the_server_ends_is_not_used_again() -> None:
    script: list[bytes | tuple[bytes, str]] = [
        _ok(b"1", "connection: close"),  # said (and left open: the client closes it)
        (b"HTTP/1.0 200 OK\r\n\r\n2", "close"),  # a body up to the close
        (_ok(b"3"), "close"),  # closed while idle, without a word
        _ok(b"4"),
    ]
    outcomes, seen = asyncio.run(_scripted_exchanges(script, 4, pause_s=0.05))
    assert [response.content for response in outcomes] == [b"1", b"2", b"3", b"4"]  # type: ignore[union-attr]
    assert [request.connection for request in seen] == [1, 2, 3, 4]


def test_broken_answers_raise_httpx_errors_and_the_next_request_reconnects() -> None:
    script: list[bytes | tuple[bytes, str]] = [
        (b'HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{"cut', "cut"),
        b"SMTP ready\r\n\r\n",
        _ok(b"3", "content-length: 4"),
        _ok(b"4"),
    ]
    outcomes, seen = asyncio.run(_scripted_exchanges(script, 4))
    assert isinstance(outcomes[0], httpx.RemoteProtocolError)
    assert "disconnected" in str(outcomes[0])
    assert isinstance(outcomes[1], httpx.RemoteProtocolError)
    assert "status line" in str(outcomes[1])
    assert isinstance(outcomes[2], httpx.RemoteProtocolError)
    assert "content-length" in str(outcomes[2])
    assert outcomes[3].content == b"4"  # type: ignore[union-attr]
    assert [request.connection for request in seen] == [1, 2, 3, 4]


def test_an_answer_that_does_not_come_times_out() -> None:
    # The head promises more body than comes: the read times out, the connection is dropped.
    script: list[bytes | tuple[bytes, str]] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n12345",
        _ok(b"2"),
    ]
    outcomes, seen = asyncio.run(_scripted_exchanges(script, 2, timeout_s=0.2))
    assert isinstance(outcomes[0], httpx.ReadTimeout)
    assert outcomes[1].content == b"2"  # type: ignore[union-attr]
    assert [request.connection for request in seen] == [1, 2]


def test_the_client_attributes_through_uvicorn_with_chunked_answers(
    make_journeys, no_proxy_environment: None
) -> None:
    """Another server's HTTP (uvicorn on h11, which Prefect ships): answers streamed in
    chunks, connections kept alive as uvicorn keeps them; results equal the local model."""
    uvicorn = pytest.importorskip("uvicorn")
    connections: set[tuple[str, int]] = set()
    requests = 0

    async def app(scope: dict, receive: Callable, send: Callable) -> None:
        nonlocal requests
        assert scope["type"] == "http" and scope["query_string"] == b"conv_type_id=default"
        requests += 1
        connections.add(tuple(scope["client"]))
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        sessions = pl.DataFrame(orjson.loads(body)["customer_journeys"]).with_columns(
            pl.col("timestamp").str.to_datetime("%Y-%m-%d %H:%M:%S")
        )
        value = compute_ihc(sessions, LocalModelSettings()).write_json().encode()
        answer = b'{"statusCode":200,"value":%s,"partialFailureErrors":[]}' % value
        # No content-length: uvicorn sends the answer with chunked transfer coding.
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (answer[: len(answer) // 2], answer[len(answer) // 2 :]):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    listener = socket.create_server(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        journeys = make_journeys([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
        outcome = attribute_journeys(journeys, _settings(url, concurrency=2), "any-key")
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()
    assert outcome.failed.height == 0
    assert_frame_equal(outcome.results, compute_ihc(journeys, LocalModelSettings()))
    assert requests == outcome.stats.requests == 3
    assert len(connections) == 2  # one kept-alive connection per worker
