"""The IHC client's httpx transport: one keep-alive HTTP/1.1 connection per worker.

httpx's default transport sends through httpcore: a connection pool, the h11 protocol
state machine and anyio, all in Python. The client keeps C connections busy, each with
one request at a time, so it needs none of the pool and little of h11:
``ConnectionTransport`` writes the request and reads the response itself on an asyncio
stream — status line, headers, and the body by ``content-length``, chunked transfer
coding or up to the close (RFC 9112 §6.3). Measured with requests of the API's size,
the event loop's CPU per request (``AsyncClient`` included) falls from 0.8 ms (httpcore
on asyncio sockets; 0.95 ms with httpx's stock transport) to 0.5 ms. Everything above
the transport stays httpx's: the ``AsyncClient``, its timeouts and exceptions, content
decoding (gzip, …), the ``Response``.

A proxy from the environment (``HTTPS_PROXY`` …) is honoured as httpx honours it: with
one in effect for the API's URL the client keeps httpx's stock transport.
"""

from __future__ import annotations

import asyncio
import ssl
import urllib.request

import httpx

# The stream stops reading the socket while it holds twice this much unread: large
# enough that an answer (up to ~0.5 MB at 3,000 sessions) arrives without a pause.
READ_BUFFER_BYTES = 1 << 20


class ConnectionTransport(httpx.AsyncBaseTransport):
    """An httpx transport that sends over one keep-alive HTTP/1.1 connection of its own.

    Requests wait their turn for the connection (``max_connections = 1``); a
    connection the server closed, or one left in an unknown state by an error or a
    cancellation, is replaced by a new one on the next request. The response is read
    whole before it is returned: its head within the ``read`` timeout, then its body
    (by ``content-length``, chunked, or up to the close) within the ``read`` timeout.
    httpx does the rest: headers, decoding (gzip, …), cookies, redirects.
    """

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._turn = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        timeouts = request.extensions.get("timeout", {})
        try:
            async with asyncio.timeout(timeouts.get("pool")):
                await self._turn.acquire()
        except TimeoutError:
            raise httpx.PoolTimeout(
                "timed out waiting for the connection", request=request
            ) from None
        try:
            return await self._exchange(request, timeouts)
        except BaseException:
            # Whatever was half sent or half read: the connection cannot be reused.
            self._close()
            raise
        finally:
            self._turn.release()

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None

    async def _exchange(
        self, request: httpx.Request, timeouts: dict[str, float | None]
    ) -> httpx.Response:
        reader, writer = await self._connection(request, timeouts.get("connect"))
        body = await request.aread()
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"
        head = b"".join(
            (
                request.method.encode("ascii"),
                b" ",
                request.url.raw_path,
                b" HTTP/1.1\r\n",
                *(b"%s: %s\r\n" % pair for pair in request.headers.raw),
                b"\r\n",
            )
        )
        try:
            writer.write(head + body)
            async with asyncio.timeout(timeouts.get("write")):
                await writer.drain()
        except TimeoutError:
            raise httpx.WriteTimeout("timed out sending the request", request=request) from None
        except (OSError, RuntimeError) as exc:
            raise httpx.WriteError(_said(exc), request=request) from None
        try:
            async with asyncio.timeout(timeouts.get("read")):
                version, status, reason, headers = await _response_head(reader)
                while 100 <= status < 200:  # 100 Continue and the like: the answer follows
                    if status == 101:
                        raise ValueError("a switch of protocols (101) was not asked for")
                    version, status, reason, headers = await _response_head(reader)
            async with asyncio.timeout(timeouts.get("read")):
                content, until_close = await _response_body(reader, request.method, status, headers)
        except TimeoutError:
            raise httpx.ReadTimeout("timed out waiting for the response", request=request) from None
        except asyncio.IncompleteReadError:
            raise httpx.RemoteProtocolError(
                "server disconnected without sending a complete response", request=request
            ) from None
        except (asyncio.LimitOverrunError, ValueError) as exc:
            raise httpx.RemoteProtocolError(f"malformed response: {exc}", request=request) from None
        except OSError as exc:
            raise httpx.ReadError(_said(exc), request=request) from None
        tokens = {
            token.strip().lower()
            for name, value in headers
            if name.lower() == b"connection"
            for token in value.split(b",")
        }
        if (
            until_close
            or b"close" in tokens
            or (version == b"HTTP/1.0" and b"keep-alive" not in tokens)
            or request.headers.get("connection", "").lower() == "close"
        ):
            self._close()
        return httpx.Response(
            status,
            headers=headers,
            stream=httpx.ByteStream(content),
            extensions={"http_version": version, "reason_phrase": reason},
        )

    async def _connection(
        self, request: httpx.Request, timeout: float | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self._reader is not None and self._writer is not None:
            # Idle and readable means the server closed it (or sent what was not asked for).
            if not (self._reader.at_eof() or self._writer.is_closing()):
                return self._reader, self._writer
            self._close()
        url = request.url
        if url.scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported scheme {url.scheme!r}", request=request)
        tls = None
        if url.scheme == "https":
            if self._tls is None:
                self._tls = httpx.create_ssl_context()  # the system's CAs, SSL_CERT_FILE …
            tls = self._tls
        try:
            async with asyncio.timeout(timeout):
                self._reader, self._writer = await asyncio.open_connection(
                    url.host,
                    url.port or (443 if tls else 80),
                    ssl=tls,
                    server_hostname=url.host if tls else None,
                    limit=READ_BUFFER_BYTES,
                )
        except TimeoutError:
            raise httpx.ConnectTimeout(
                f"timed out connecting to {url.host}", request=request
            ) from None
        except OSError as exc:  # ssl.SSLError included
            raise httpx.ConnectError(_said(exc), request=request) from None
        return self._reader, self._writer


def _said(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__


async def _response_head(
    reader: asyncio.StreamReader,
) -> tuple[bytes, int, bytes, list[tuple[bytes, bytes]]]:
    lines = (await reader.readuntil(b"\r\n\r\n"))[:-4].split(b"\r\n")
    version, _, rest = lines[0].partition(b" ")
    code, _, reason = rest.partition(b" ")
    if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"header line {line[:80]!r}")
        headers.append((name, value.strip()))
    return version, int(code), reason, headers


async def _response_body(
    reader: asyncio.StreamReader, method: str, status: int, headers: list[tuple[bytes, bytes]]
) -> tuple[bytes, bool]:
    """The body and whether it ended with the connection (RFC 9112 §6.3)."""
    if method == "HEAD" or status in (204, 304):
        return b"", False
    encodings = [value.lower() for name, value in headers if name.lower() == b"transfer-encoding"]
    if encodings:
        if not encodings[-1].endswith(b"chunked"):
            return await reader.read(), True
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields
                    pass
                return b"".join(parts), False
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ValueError("chunk without its CRLF")
            parts.append(chunk[:-2])
    lengths = {value.strip() for name, value in headers if name.lower() == b"content-length"}
    if lengths:
        if len(lengths) > 1 or not all(length.isdigit() for length in lengths):
            raise ValueError(f"content-length {sorted(lengths)}")
        return await reader.readexactly(int(lengths.pop())), False
    return await reader.read(), True


def proxied(url: str) -> bool:
    """Whether a proxy from the environment applies to ``url`` (httpx would use it)."""
    proxies = urllib.request.getproxies()
    parsed = httpx.URL(url)
    if not (proxies.get(parsed.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parsed.host)
