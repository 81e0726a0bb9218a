"""The IHC client's transport: httpx on asyncio sockets — over TLS, and a proxy honoured."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from polars.testing import assert_frame_equal

from config.settings import ApiSettings, LocalModelSettings
from tasks.ihc_client import attribute_journeys
from tasks.ihc_server import ServerHandle
from tasks.ihc_transport import proxied
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
