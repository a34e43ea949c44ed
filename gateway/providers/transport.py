"""The HTTP/1.1 client that carries provider calls: a keep-alive pool per origin, on asyncio Protocols.

Why not aiohttp's ClientSession: its general machinery (request/response objects, connector,
payloads, yarl, trace hooks, timers, multidicts) cost more CPU per call than the bytes need.
This client does only what a provider call needs, and nothing from the environment (no
proxies, no cookies, no redirects: a 3xx is just a response).

    TransportError            nothing here names the host: callers map these to their own errors
     ├── ConnectFailed        no connection: refused, DNS, TLS handshake or certificate
     ├── Disconnected         the peer closed or reset before the response's headers were in
     ├── BodyIncomplete       the body ended early, or its framing or encoding is broken
     └── BadResponse          not an HTTP/1.x response, or its headers are over the limit
    TimeoutError              connect, first byte, idle between reads, or total (see `Timeouts`)
"""

from __future__ import annotations

import asyncio
import re
import ssl
import zlib
from collections import deque
from dataclasses import dataclass
from types import TracebackType
from typing import Final, NewType, cast
from urllib.parse import quote, urlsplit

__all__ = [
    "BadResponse",
    "BodyIncomplete",
    "Client",
    "ConnectFailed",
    "Disconnected",
    "HeaderBlock",
    "HeaderNames",
    "Response",
    "Target",
    "Timeouts",
    "TransportError",
    "encode_headers",
]

# A response's status line and headers together; aiohttp allows 8 KiB per line.
MAX_HEADER_BYTES: Final = 64 * 1024
# A chunk-size line or a trailer line; real ones are a few bytes.
_MAX_LINE_BYTES: Final = 8 * 1024
# Body bytes buffered while nobody reads: past this, the socket stops being read.
_HIGH_WATER: Final = 256 * 1024
# What one read of a compressed body may decode to: JSON shrinks about 10x, a bomb 1000x.
_MAX_DECODED_PER_READ: Final = 16 * 1024 * 1024
# A timer that fires within this of its deadline counts as expired (loops fire a little early).
_TIMER_SLACK_S: Final = 0.001
_INF: Final = float("inf")
_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
_SIZE_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})\r\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})[ \r]")


# Request header lines, encoded and checked once (see `encode_headers`): a provider's fixed
# headers are encoded when it is built, not on every call.
HeaderBlock = NewType("HeaderBlock", bytes)


def encode_headers(headers: dict[str, str]) -> HeaderBlock:
    """`Name: value` lines; a line break in a name or value (header injection) is refused."""
    block = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
    if block.count("\n") != len(headers) or block.count("\r") != len(headers):
        raise ValueError("a header name or value holds a line break")
    return HeaderBlock(block.encode())


class TransportError(Exception):
    """A request that got no complete, well-formed HTTP response."""


class ConnectFailed(TransportError):
    pass


class Disconnected(TransportError):
    pass


class BodyIncomplete(TransportError):
    pass


class BadResponse(TransportError):
    pass


@dataclass(frozen=True, slots=True)
class Timeouts:
    """aiohttp's meanings: `connect` includes waiting for a pool slot; `idle` is between reads."""

    connect: float | None = None
    first_byte: float | None = None  # until the status line and headers are in
    idle: float | None = None
    total: float | None = None


@dataclass(frozen=True, slots=True)
class Target:
    """A fixed URL, parsed once: what `Client.request` needs to reach it."""

    origin: tuple[str, str, int]  # (scheme, host, port): the pool's key
    host_header: str
    path: str
    # "PATH HTTP/1.1\r\nHost: HOST\r\n", encoded once: what follows the method in every request.
    head: bytes = b""

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("only http:// and https:// URLs with a host can be reached")
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        host = parts.hostname
        ascii_host = host if host.isascii() else host.encode("idna").decode("ascii")
        shown = f"[{ascii_host}]" if ":" in host else ascii_host
        path = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            path += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=~?")
        host_header = shown if port == default else f"{shown}:{port}"
        head = f"{path} HTTP/1.1\r\nHost: {host_header}\r\n".encode("ascii")
        return cls((parts.scheme, host, port), host_header, path, head)


class Client:
    """The app's one pool of upstream connections; `close()` it when the app stops."""

    def __init__(
        self, *, limit: int = 256, keepalive_s: float = 30.0, ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._limit = limit  # connections open or opening, over all origins (aiohttp's `limit`)
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context  # tests inject one that trusts their own CA; else the default
        self._idle: dict[tuple[str, str, int], list[_Conn]] = {}
        self._open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._closed = False

    async def request(
        self, target: Target, body: bytes, headers: HeaderBlock, timeouts: Timeouts, *, method: bytes = b"POST",
    ) -> Response:
        """Send one request; the `Response` is returned once its status and headers are in.

        `headers` go out as given, after `Host` and before `Content-Length`. Use the response
        in `async with`: it goes back to the pool only if its body was read to the end.
        Any method but HEAD (whose answer has no body, whatever its headers say).
        """
        head = b"%s %s%sContent-Length: %d\r\n\r\n" % (method, target.head, headers, len(body))
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn = self._take_idle(target.origin, start)
        if conn is None:
            conn = await self._connect(target.origin, timeouts, start)
        try:
            conn.send(head, body, timeouts, start)
            await conn.head_received()
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)

    @property
    def open_connections(self) -> int:
        """Connections open or opening, in use or idle (at most `limit`)."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return sum(len(conns) for conns in self._idle.values())

    async def close(self) -> None:
        """Close idle connections now; those in use are closed when their response is done."""
        self._closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.close()
        self._idle.clear()

    # --- the pool ---------------------------------------------------------------------------

    def _take_idle(self, origin: tuple[str, str, int], now: float) -> _Conn | None:
        conns = self._idle.get(origin)
        while conns:
            conn = conns.pop()  # the most recently used: the least likely to be closed by now
            conn.idle = False
            if conn.reusable(now - self._keepalive_s):
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, str, int], timeouts: Timeouts, start: float) -> _Conn:
        deadline = _earliest(start, timeouts.connect, timeouts.first_byte, timeouts.total)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(None if deadline == _INF else deadline):
                while self._open >= self._limit and not self._evict_idle():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    try:
                        await waiter
                    except BaseException:
                        if waiter in self._waiters:
                            self._waiters.remove(waiter)
                        elif waiter.done() and not waiter.cancelled():
                            self._wake()  # woken, but leaving: pass the turn on
                        raise
                    conn = self._take_idle(origin, loop.time())
                    if conn is not None:
                        return conn
                self._open += 1
                try:
                    return await self._open_connection(origin)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
        except TimeoutError:
            raise  # aiohttp's connect timeout is a timeout too (an OSError, so caught first)
        except OSError:
            raise ConnectFailed("could not connect") from None

    async def _open_connection(self, origin: tuple[str, str, int]) -> _Conn:
        scheme, host, port = origin
        context: ssl.SSLContext | None = None
        if scheme == "https":
            if self._ssl is None:
                # aiohttp's default: verification on, SNI and hostname check against `host`.
                self._ssl = ssl.create_default_context()
            context = self._ssl
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(
            lambda: _Conn(self), host, port, ssl=context, server_hostname=host if context else None
        )
        conn.origin = origin
        return conn

    def _evict_idle(self) -> bool:
        """At the cap, an idle connection to any origin is worth less than a waiting request."""
        for conns in self._idle.values():
            if conns:
                conn = conns.pop(0)  # the oldest
                conn.idle = False
                conn.close()
                return True
        return False

    def _put(self, conn: _Conn) -> None:
        if self._closed:
            conn.close()
            return
        conn.idle = True
        conn.idle_since = conn.last_read  # the response's last bytes: as good as now, and free
        self._idle.setdefault(conn.origin, []).append(conn)
        if self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_at(conn.idle_since + self._keepalive_s, self._expire)
        self._wake()

    def _expire(self) -> None:
        """Close connections idle past the keep-alive time; runs while any are idle."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._keepalive_s
        oldest = _INF
        for conns in self._idle.values():
            for conn in list(conns):
                if conn.idle_since <= cutoff:
                    conn.close()
                else:
                    oldest = min(oldest, conn.idle_since)
        if oldest != _INF:
            self._sweep = loop.call_at(oldest + self._keepalive_s, self._expire)

    def _forget(self, conn: _Conn) -> None:
        """A connection closed (by us or the peer): it no longer counts against the cap."""
        if conn.idle:
            conn.idle = False
            conns = self._idle.get(conn.origin)
            if conns is not None and conn in conns:
                conns.remove(conn)
        self._open -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class HeaderNames:
    """Finds a few named headers in a response, case-insensitively, without parsing the rest.

    A model API answers with 20 or more headers and the gateway reads a handful: one C regex
    scan over the raw lines beats building a dict of all of them on every call.
    """

    __slots__ = ("_pattern",)

    def __init__(self, *names: str) -> None:
        alternatives = b"|".join(re.escape(name.encode("ascii")) for name in names)
        self._pattern = re.compile(rb"\r\n(" + alternatives + rb"):[ \t]*([^\r\n]*)", re.IGNORECASE)

    def find(self, fields: bytes) -> dict[str, str]:
        """Lower-case name -> value; a repeated header's values are joined with ", "."""
        found: dict[str, str] = {}
        for raw_name, raw_value in self._pattern.findall(fields):
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1").rstrip(" \t")
            found[name] = f"{found[name]}, {value}" if name in found else value
        return found


# The headers that frame a response, as raw (name, value) pairs.
_FRAMING: Final = re.compile(
    rb"\r\n(connection|content-encoding|content-length|transfer-encoding):[ \t]*([^\r\n]*)", re.IGNORECASE
)


class Response:
    """Status, headers and the body as it arrives, on a borrowed connection."""

    __slots__ = ("_client", "_conn", "_fields", "_headers", "status")

    def __init__(self, client: Client, conn: _Conn) -> None:
        self._client = client
        self._conn: _Conn | None = conn
        self.status = conn.status
        self._fields = conn.fields
        self._headers: dict[str, str] | None = None

    @property
    def headers(self) -> dict[str, str]:
        """Every header, by lower-case name (repeats joined with ", "); parsed on first use."""
        if self._headers is None:
            headers: dict[str, str] = {}
            for line in self._fields.decode("latin-1").split("\r\n")[1:]:
                name, sep, value = line.partition(":")
                if sep and name:  # a line without a name is not a header; skip it
                    name = name.rstrip(" \t").lower()
                    value = value.strip(" \t")
                    headers[name] = f"{headers[name]}, {value}" if name in headers else value
            self._headers = headers
        return self._headers

    def find_headers(self, names: HeaderNames) -> dict[str, str]:
        """Just `names`' headers: cheaper than `headers` when a few are wanted."""
        return names.find(self._fields)

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None,
    ) -> None:
        self.release()

    async def read_chunk(self) -> bytes:
        """The next body bytes, as they arrived; b"" at the end of the body."""
        conn = self._conn
        if conn is None:
            return b""
        while True:
            if conn.body:
                return conn.take()
            if conn.complete:
                self.release()
                return b""
            if conn.error is not None:
                raise conn.error
            await conn.wait()

    async def read(self) -> bytes:
        """The whole body."""
        if self._conn is not None:
            self._conn.whole = True
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def read_limited(self, limit: int) -> bytes:
        """At most about `limit` bytes of the body; what is left unread closes the connection."""
        buf = bytearray()
        while len(buf) < limit and (chunk := await self.read_chunk()):
            buf += chunk
        return bytes(buf[:limit])

    def at_eof(self) -> bool:
        conn = self._conn
        return conn is None or (conn.complete and not conn.body)

    def release(self) -> None:
        """Back to the pool if the body was read to its end and the peer keeps it alive; else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and not conn.body and conn.keep_alive and conn.is_open():
            self._client._put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Drop the connection whatever the state of the body: this is what stops an upstream."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


# How the body after the headers is framed.
_HEAD, _LENGTH, _CHUNKED, _UNTIL_EOF, _DONE = range(5)
# Where a chunked body is between chunk data.
_SIZE_LINE, _DATA_END, _TRAILER = range(3)


class _Conn(asyncio.Protocol):
    """One connection and the response being read on it; one request at a time."""

    def __init__(self, client: Client) -> None:
        self._client = client
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self.origin: tuple[str, str, int] = ("", "", 0)
        self.idle = False
        self.idle_since = 0.0
        self._lost = False
        self._paused = False
        # The response being read:
        self._state = _DONE
        self._head_done = False
        self._buf = bytearray()  # the header block, or a chunked-framing line, until complete
        self.status = 0
        self.fields = b""  # the header lines, from the CRLF that ends the status line
        self.keep_alive = True
        self.body: list[bytes] = []
        self._buffered = 0
        self.complete = False
        self.whole = False  # set by `Response.read`: wake the reader at the end, not per piece
        self.error: BaseException | None = None
        self._left = 0  # body bytes (Content-Length) or chunk-data bytes still to come
        self._chunk_phase = _SIZE_LINE
        self._decoder: zlib._Decompress | None = None
        # Timeouts, as absolute loop times:
        self._first_byte_at = _INF
        self._total_at = _INF
        self._idle_s = _INF
        self.last_read = 0.0
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    # --- driven by the client and the response -----------------------------------------------

    def reusable(self, idle_cutoff: float) -> bool:
        transport = self._transport
        return transport is not None and not transport.is_closing() and self.idle_since > idle_cutoff

    def is_open(self) -> bool:
        return not self._lost

    def send(self, head: bytes, body: bytes, timeouts: Timeouts, start: float) -> None:
        assert self._transport is not None
        self._state = _HEAD
        self._head_done = False
        self.status = 0
        self.fields = b""
        self.keep_alive = True
        self.complete = False
        self.error = None
        self.whole = False
        self._first_byte_at = _INF if timeouts.first_byte is None else start + timeouts.first_byte
        self._total_at = _INF if timeouts.total is None else start + timeouts.total
        self._idle_s = _INF if timeouts.idle is None else timeouts.idle
        self.last_read = start
        # One timer per connection, kept across requests and moved only when it fires: a
        # timer left from an earlier request fires early at worst, sees the new deadline
        # and re-arms. Only a sooner deadline (another provider's timeouts) replaces it.
        deadline = self._deadline()
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer) if deadline != _INF else None
        if len(body) < _HIGH_WATER:
            self._transport.write(head + body)  # one send for the usual small request
        else:
            self._transport.writelines((head, body))

    async def head_received(self) -> None:
        while not self._head_done:
            if self.error is not None:
                raise self.error
            await self.wait()

    def take(self) -> bytes:
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def wait(self) -> None:
        """Until the next bytes (or the end, or an error) arrive, within the deadlines."""
        waiter = self._waiter = self._loop.create_future()
        if self._timer is None:
            deadline = self._deadline()
            if deadline != _INF:
                self._timer = self._loop.call_at(deadline, self._on_timer)
        await waiter

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close(self) -> None:
        self._stop_timer()
        if self._transport is not None and not self._lost:
            self._transport.close()
            self._gone(None)

    # --- the deadlines -----------------------------------------------------------------------

    def _deadline(self) -> float:
        deadline = min(self._total_at, self.last_read + self._idle_s)
        return min(deadline, self._first_byte_at) if self._state == _HEAD else deadline

    def _on_timer(self) -> None:
        self._timer = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits (or the connection idles): the next wait arms a new timer
        deadline = self._deadline()
        if self._loop.time() + _TIMER_SLACK_S < deadline:
            self._timer = self._loop.call_at(deadline, self._on_timer)  # bytes came since: later
            return
        self._fail(TimeoutError())

    # --- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state == _UNTIL_EOF:
            self._end_of_body()  # the close is what ends this kind of body
        elif self._state == _HEAD:
            self._fail(Disconnected("the upstream closed the connection"))
        elif self._state != _DONE:
            self._fail(BodyIncomplete("the upstream closed the connection mid-body"))
        self._gone(exc)

    def eof_received(self) -> bool | None:
        return False  # close our side too

    def data_received(self, data: bytes) -> None:
        state = self._state
        if state == _DONE:
            # Nothing is asked on an idle connection; bytes now are a broken or closing peer.
            self.keep_alive = False
            if self.idle:
                self.close()
            return
        self.last_read = self._loop.time()
        try:
            if state == _HEAD:
                if self._buf:  # the head came in pieces
                    self._buf += data
                    data = bytes(self._buf)
                    self._buf.clear()
                end = data.find(b"\r\n\r\n")
                if end > MAX_HEADER_BYTES or (end < 0 and len(data) > MAX_HEADER_BYTES):
                    raise BadResponse("response headers over the limit")
                if end < 0:
                    self._buf += data
                    return
                data = self._parse_head(data, end)
                state = self._state
                if not data:
                    return
            if state == _LENGTH:
                if len(data) >= self._left:
                    if len(data) > self._left:
                        self.keep_alive = False  # more than announced: this connection can't be trusted
                        data = data[: self._left]
                    self._left = 0
                    self._deliver(data)
                    self._end_of_body()
                else:
                    self._left -= len(data)
                    self._deliver(data)
            elif state == _CHUNKED:
                self._chunked(data)
            elif state == _UNTIL_EOF:
                self._deliver(data)
        except TransportError as exc:
            self._fail(exc)

    def pause_writing(self) -> None:
        pass  # a request body is already in memory; the transport buffers it

    def resume_writing(self) -> None:
        pass

    # --- parsing -----------------------------------------------------------------------------

    def _parse_head(self, data: bytes, end: int) -> bytes:
        """Status and framing from the head ending at `end`; returns what follows. Skips 1xx."""
        while True:
            status_line = _STATUS_LINE.match(data)
            if status_line is None:
                raise BadResponse("not an HTTP/1.x response")
            status = int(status_line[2])
            if status >= 200 or status == 101:
                break
            data = data[end + 4 :]  # an interim answer (100 Continue, 103 Early Hints): the real one follows
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self._buf += data
                return b""
        if status == 101:
            raise BadResponse("the upstream switched protocols")
        line_end = data.find(b"\r\n", 0, end)
        fields = data[line_end:end] if line_end >= 0 else b""
        if b"\r\n " in fields or b"\r\n\t" in fields:
            raise BadResponse("a folded response header")  # obsolete line folding (RFC 9112 5.2)
        self.status = status
        self.fields = fields
        self._head_done = True
        length: bytes | None = None
        keep_alive = status_line[1] == b"1"  # HTTP/1.1 keeps the connection by default
        chunked = False
        encoded = False
        for name, value in _FRAMING.findall(fields):
            name = name.lower()
            if name == b"content-length":
                length = value.rstrip(b" \t") if length is None else b"-"  # two lengths: refused below
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                value = value.lower()
                keep_alive = b"close" not in value and (keep_alive or b"keep-alive" in value)
            else:  # content-encoding
                encoded = value.strip(b" \t").lower() in (b"gzip", b"x-gzip", b"deflate")
        self.keep_alive = keep_alive
        # Sent gzip or deflate though we asked for identity: decode (47: zlib or gzip header).
        self._decoder = zlib.decompressobj(47) if encoded else None
        self._wake()
        if status == 204 or status == 304:
            self._end_of_body()
        elif chunked:
            if length is not None:
                self.keep_alive = False  # both framings: answer this one, trust the connection no more
            self._state = _CHUNKED
            self._chunk_phase = _SIZE_LINE
            self._left = 0
        elif length is not None:
            if not length.isdigit():
                raise BadResponse("a malformed Content-Length")
            self._left = int(length)
            self._state = _LENGTH
            if not self._left:
                self._end_of_body()
        else:
            self._state = _UNTIL_EOF
            self.keep_alive = False
        return data[end + 4 :]

    def _chunked(self, data: bytes) -> None:
        """Chunk data is passed on as it comes: all that `data` holds, in one piece."""
        if self._buf:  # a framing line cut by the previous read: rejoin it (rare)
            data = bytes(self._buf) + data
            self._buf.clear()
        pieces: list[bytes] = []
        pos, size = 0, len(data)
        while pos < size:
            left = self._left
            if left:  # inside a chunk's data
                stop = pos + left
                if stop > size:
                    stop = size
                pieces.append(data if pos == 0 and stop == size else data[pos:stop])
                left -= stop - pos
                self._left = left
                pos = stop
                if not left and data[pos : pos + 2] == b"\r\n":  # the usual: its CRLF right behind
                    self._chunk_phase = _SIZE_LINE
                    pos += 2
                continue
            if self._chunk_phase == _SIZE_LINE and (sized := _SIZE_LINE_RE.match(data, pos)) is not None:
                left = int(sized[1], 16)
                if left:  # the usual: a size line without extensions
                    self._left = left
                    self._chunk_phase = _DATA_END
                    pos = sized.end()
                    continue
            newline = data.find(b"\n", pos)
            if newline < 0:
                self._buf += data[pos:]
                if len(self._buf) > _MAX_LINE_BYTES:
                    raise BodyIncomplete("a chunked-framing line over the limit")
                break
            end = newline - 1 if newline > pos and data[newline - 1] == 13 else newline  # without CR
            phase = self._chunk_phase
            if phase == _SIZE_LINE:
                if _CHUNK_SIZE.fullmatch(data, pos, end):
                    left = int(data[pos:end], 16)
                else:  # with a chunk extension (";name=value"), or broken
                    digits = data[pos:end].split(b";", 1)[0].strip(b" \t")
                    if not _CHUNK_SIZE.fullmatch(digits):
                        raise BodyIncomplete("a malformed chunk size")
                    left = int(digits, 16)
                self._left = left
                self._chunk_phase = _DATA_END if left else _TRAILER
            elif phase == _DATA_END:
                if end != pos:
                    raise BodyIncomplete("chunk data longer than announced")
                self._chunk_phase = _SIZE_LINE
            elif end == pos:  # the blank line after the (usually absent) trailers
                if pieces:
                    self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                if newline + 1 < size:
                    self.keep_alive = False  # bytes nobody asked for
                self._end_of_body()
                return
            pos = newline + 1
        if pieces:
            self._deliver(pieces[0] if len(pieces) == 1 else b"".join(pieces))

    def _deliver(self, data: bytes) -> None:
        if self._decoder is not None:
            try:
                data = self._decoder.decompress(data, _MAX_DECODED_PER_READ)
            except zlib.error:
                raise BodyIncomplete("a body that does not decode") from None
            if self._decoder.unconsumed_tail:
                raise BodyIncomplete("a body that decodes to too much")  # a zip bomb, not JSON
            if not data:
                return
        self.body.append(data)
        self._buffered += len(data)
        if self._buffered > _HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        elif self.whole:
            return  # the reader wants the whole body: no wake-up for each piece
        self._wake()

    def _end_of_body(self) -> None:
        if self._decoder is not None:
            tail = self._decoder.flush()
            self._decoder = None
            if tail:
                self.body.append(tail)
        self._state = _DONE
        self.complete = True
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self._state = _DONE
        self.keep_alive = False
        if self.error is None:
            self.error = exc
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        self.close()

    def _gone(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._stop_timer()
        self._client._forget(self)


def _earliest(start: float, *delays: float | None) -> float:
    return min((start + d for d in delays if d is not None), default=_INF)
