"""A small HTTP/1.1 client for the proxy's upstream requests: keep-alive connections, streamed bodies.

Why not httpx here: the gateway's added latency is mostly the CPU it spends per
request and per streamed chunk, and httpx (client, httpcore pool, the pure-Python
h11 parser, anyio streams) costs several times more of it than the request path
itself. This client does only what the proxy needs: one request at a time per
connection, `Content-Length` request bodies, responses parsed by httptools (the C
parser uvicorn uses), chunked, sized or close-delimited, TLS for https upstreams,
and a per-read timeout. Everything else (redirects, cookies, proxies, compression)
is left out: the proxy asks for `accept-encoding: identity` and relays bytes.

Contract:
- `UpstreamConnections(base_url)`: the connections of one upstream; event-loop only.
  `await post(path, body, headers, connect_timeout_s, read_timeout_s)` returns an
  `UpstreamResponse` once its status line and headers have arrived (`path` is
  appended to the base URL's path).
- `UpstreamResponse.stream()` iterates over body bytes as they arrive (each read
  waits at most `read_timeout_s`); `aread()` reads the rest; `close()` (idempotent,
  never blocks) puts a fully read keep-alive connection back in the pool and closes
  any other at once, which an upstream sees as the client leaving.
- Failures raise `UpstreamTimeout` (connect or read), `UpstreamConnectError`
  (nothing could be sent), or `RemoteProtocolError` / `ReadError` (the
  connection broke or spoke nonsense); all are `UpstreamHTTPError`.
- A request on a reused idle connection that the upstream had closed meanwhile
  (the keep-alive race) is sent again once on a new connection, before any byte
  of the answer arrived.
"""
from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from urllib.parse import urlsplit

import httptools

KEEPALIVE_EXPIRY_S = 30.0
MAX_IDLE_CONNECTIONS = 512
_HIGH_WATER_BYTES = 1 << 20  # buffered, unread body bytes before reading from the socket pauses


class UpstreamHTTPError(Exception):
    """An upstream request failed at the HTTP level."""


class UpstreamTimeout(UpstreamHTTPError):
    pass


class ConnectTimeout(UpstreamTimeout):
    pass


class ReadTimeout(UpstreamTimeout):
    pass


class UpstreamConnectError(UpstreamHTTPError):
    pass


class ConnectError(UpstreamConnectError):
    pass


class RemoteProtocolError(UpstreamHTTPError):
    pass


class ReadError(UpstreamHTTPError):
    pass


@functools.lru_cache(maxsize=1)
def tls_context() -> ssl.SSLContext:
    """One TLS context for every upstream (httpx's defaults: certifi's CA bundle, SSL_CERT_FILE/_DIR);
    building one loads the CA bundle (tens of ms)."""
    import httpx

    context = httpx.create_ssl_context()
    context.set_alpn_protocols(["http/1.1"])
    return context


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection and the parser of the response currently on it."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status_code = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.keep_alive = False
        self.complete = False
        self.received_any = False
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future | None = None

    # -- asyncio.Protocol --
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(RemoteProtocolError("the upstream switched protocols"))
        except httptools.HttpParserError as error:
            self._fail(RemoteProtocolError(f"invalid HTTP from the upstream: {error}"))

    def eof_received(self):
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.head_done and not self.complete and not self._has_framing():
            self.complete = True  # a close-delimited body ends with the connection
        elif not self.complete and self.error is None:
            if exc is not None:
                self.error = ReadError(f"the connection to the upstream failed: {exc}")
            elif self.head_done:
                self.error = RemoteProtocolError("the upstream closed the connection in the middle of the body")
            else:
                self.error = RemoteProtocolError("the upstream closed the connection without sending an answer")
        self._wake()

    def pause_writing(self) -> None:  # request bodies are small; nothing to pace
        pass

    def resume_writing(self) -> None:
        pass

    # -- httptools callbacks --
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status_code = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only valid while the message is parsed
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- for the response --
    def _has_framing(self) -> bool:
        for name, value in self.headers:
            if name == b"content-length" or (name == b"transfer-encoding" and b"chunked" in value.lower()):
                return True
        return False

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.abort()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout_s: float | None, timeout_error: type[UpstreamTimeout]) -> None:
        """Until something happens on the connection (data, end, error), at most `timeout_s`."""
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        timer = None if timeout_s is None else loop.call_later(timeout_s, waiter.cancel)
        try:
            await waiter
        except asyncio.CancelledError:
            if timer is not None and waiter.cancelled() and asyncio.current_task().cancelling() == 0:
                raise timeout_error(f"the upstream sent nothing for {timeout_s:g} s") from None
            raise
        finally:
            self._waiter = None
            if timer is not None:
                timer.cancel()

    def take_body(self) -> bytes:
        data = self._body[0] if len(self._body) == 1 else b"".join(self._body)
        self._body.clear()
        self._buffered = 0
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()
        return data

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None and not self._body

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class _Body:
    """The async iterator of a response's body (a class, not a generator: nothing to finalize)."""

    __slots__ = ("_connection", "_read_timeout_s")

    def __init__(self, connection: _Connection, read_timeout_s: float | None) -> None:
        self._connection = connection
        self._read_timeout_s = read_timeout_s

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        connection = self._connection
        while True:
            if connection._body:
                return connection.take_body()
            if connection.error is not None:
                raise connection.error
            if connection.complete:
                raise StopAsyncIteration
            await connection.wait(self._read_timeout_s, ReadTimeout)


class UpstreamResponse:
    """The answer on one connection: status and headers at once, the body as it arrives."""

    def __init__(self, pool: UpstreamConnections, connection: _Connection, read_timeout_s: float | None) -> None:
        self._pool = pool
        self._connection = connection
        self._read_timeout_s = read_timeout_s
        self._released = False
        self.status_code = connection.status_code
        self.headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in connection.headers}
        self.content = b""

    @property
    def is_complete(self) -> bool:
        """The whole body has arrived and been read."""
        connection = self._connection
        return connection.complete and connection.error is None and not connection._body

    def stream(self) -> _Body:
        """Body bytes as they arrive (an async iterator); raises ReadTimeout, RemoteProtocolError, ReadError."""
        return _Body(self._connection, self._read_timeout_s)

    async def aread(self) -> bytes:
        self.content = b"".join([chunk async for chunk in self.stream()])
        return self.content

    def close(self) -> None:
        if self._released:
            return
        self._released = True
        self._pool._release(self._connection)


class UpstreamConnections:
    """Keep-alive connections to one upstream origin (scheme, host, port). Event-loop only."""

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = parts.port is None or parts.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.path_prefix = parts.path.rstrip("/")
        self._idle: deque[_Connection] = deque()  # the most recently used last
        self._open: set[_Connection] = set()

    async def _connect(self, timeout_s: float | None) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = tls_context() if self.scheme == "https" else None
        try:
            async with asyncio.timeout(timeout_s):
                _, connection = await loop.create_connection(_Connection, self.host, self.port, ssl=tls,
                                                             server_hostname=self.host if tls else None)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {self.host_header} within {timeout_s:g} s") from None
        except OSError as error:  # refused, unreachable, DNS, TLS handshake (ssl.SSLError is an OSError)
            raise ConnectError(f"cannot connect to {self.host_header}: {error}") from None
        self._open.add(connection)
        return connection

    def _idle_connection(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed and now - connection.idle_since < KEEPALIVE_EXPIRY_S:
                return connection
            self._discard(connection)
        return None

    def _discard(self, connection: _Connection) -> None:
        connection.abort()
        self._open.discard(connection)

    def _release(self, connection: _Connection) -> None:
        now = time.monotonic()
        idle = self._idle
        while idle and (idle[0].closed or now - idle[0].idle_since >= KEEPALIVE_EXPIRY_S):
            self._discard(idle.popleft())
        if connection.reusable and len(idle) < MAX_IDLE_CONNECTIONS:
            connection._reset()
            connection.idle_since = now
            idle.append(connection)
        else:
            self._discard(connection)

    def _head(self, path: str, body: bytes, headers: dict[str, str]) -> bytes:
        lines = [f"POST {self.path_prefix}{path} HTTP/1.1\r\nhost: {self.host_header}\r\n"
                 f"content-length: {len(body)}\r\naccept-encoding: identity\r\n"]
        for name, value in headers.items():
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    async def post(self, path: str, body: bytes, headers: dict[str, str], connect_timeout_s: float | None,
                   read_timeout_s: float | None) -> UpstreamResponse:
        """POST `body` to base path + `path`; the response once its head has arrived."""
        message = self._head(path, body, headers) + body
        for attempt in range(2):
            connection = self._idle_connection()
            reused = connection is not None
            if connection is None:
                connection = await self._connect(connect_timeout_s)
            try:
                connection.transport.write(message)
                while not connection.head_done:
                    if connection.error is not None:
                        raise connection.error
                    await connection.wait(read_timeout_s, ReadTimeout)
            except (RemoteProtocolError, ReadError):
                self._discard(connection)
                if reused and not connection.received_any and attempt == 0:
                    continue  # the upstream closed the idle connection as we reused it: once more, afresh
                raise
            except BaseException:
                self._discard(connection)
                raise
            return UpstreamResponse(self, connection, read_timeout_s)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        for connection in list(self._open):
            connection.abort()
        self._open.clear()
        self._idle.clear()
