"""The IHC client's httpx transport: httpx and httpcore on plain asyncio sockets.

httpx's default transport reaches the network through httpcore's anyio backend, which
opens an anyio cancel scope around every read and write and reads a response in
64 KiB pieces. With C keep-alive connections busy at once the event loop pays that on
every request, and its delays add up to each request's time (measured with the API
benchmark at C = 16: 0.13 ms less event-loop CPU per request, ≈ 1.5 points more of the
ideal C / L). Here only the network backend — httpcore's documented extension point —
is replaced, by asyncio streams; HTTP/1.1 (h11), the connection pool, TLS, timeouts and
the mapping of errors to httpx's exceptions are httpx's and httpcore's own.

A proxy from the environment (``HTTPS_PROXY`` …) is honoured as httpx honours it: with
one in effect for the API's URL the client keeps httpx's stock transport.
"""

from __future__ import annotations

import asyncio
import ssl
import typing
import urllib.request
from collections.abc import Iterable

import httpcore
import httpx

# The stream stops reading the socket while it holds twice this much unread: large
# enough that an answer (up to ~0.5 MB at 3,000 sessions) arrives without a pause.
READ_BUFFER_BYTES = 1 << 20


class AsyncioStream(httpcore.AsyncNetworkStream):
    """One connection as an asyncio stream pair, with httpcore's timeouts and errors."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                return await self._reader.read(max_bytes)
        except TimeoutError as exc:
            raise httpcore.ReadTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        try:
            self._writer.write(buffer)
            async with asyncio.timeout(timeout):
                await self._writer.drain()
        except TimeoutError as exc:
            raise httpcore.WriteTimeout(str(exc)) from exc
        except (OSError, RuntimeError) as exc:
            # RuntimeError: written after the transport was closed.
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._writer.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                await self._writer.start_tls(ssl_context, server_hostname=server_hostname)
        except TimeoutError as exc:
            self._writer.close()
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:  # ssl.SSLError included
            self._writer.close()
            raise httpcore.ConnectError(str(exc)) from exc
        return self

    def get_extra_info(self, info: str) -> typing.Any:
        if info == "is_readable":
            # Asked of an idle connection before it is reused: the server closed it.
            return self._reader.at_eof() or self._writer.is_closing()
        name = {
            "ssl_object": "ssl_object",
            "client_addr": "sockname",
            "server_addr": "peername",
            "socket": "socket",
        }.get(info)
        return self._writer.get_extra_info(name) if name else None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend on the running asyncio event loop (TCP: the pool that
    ``asyncio_transport`` builds has no Unix socket to connect to)."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    limit=READ_BUFFER_BYTES,
                )
        except TimeoutError as exc:
            raise httpcore.ConnectTimeout(str(exc)) from exc
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        # asyncio sets TCP_NODELAY itself, as httpx's default backend does.
        for option in socket_options or ():
            writer.get_extra_info("socket").setsockopt(*option)
        return AsyncioStream(reader, writer)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def proxied(url: str) -> bool:
    """Whether a proxy from the environment applies to ``url`` (httpx would use it)."""
    proxies = urllib.request.getproxies()
    parsed = httpx.URL(url)
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parsed.host)


def asyncio_transport(tls: ssl.SSLContext | None, limits: httpx.Limits) -> httpx.AsyncHTTPTransport:
    """httpx's transport with its connection pool on ``AsyncioBackend``.

    ``tls`` is the context for https (None: plain http only). The transport keeps its
    own request and response handling and exception mapping; only the pool it sends
    through is rebuilt, with the same limits, on the asyncio backend.
    """
    transport = httpx.AsyncHTTPTransport(verify=tls or False, limits=limits, trust_env=False)
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=tls,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=AsyncioBackend(),
    )
    return transport
