"""The upstream HTTP/1.1 client against a real loopback server that answers byte for byte.

Every test runs on both loops: asyncio's own and uvloop (the gateway's).
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import socket
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.providers.transport import (
    BadResponse,
    BodyIncomplete,
    Client,
    ConnectFailed,
    Disconnected,
    Target,
    Timeouts,
    encode_headers,
)

NO_LIMITS = Timeouts()
QUICK = Timeouts(connect=2.0, first_byte=2.0, idle=2.0, total=5.0)


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    return uvloop.EventLoopPolicy() if request.param == "uvloop" else asyncio.DefaultEventLoopPolicy()


@dataclass(frozen=True, slots=True)
class Req:
    line: str
    headers: dict[str, str]  # lower-case names
    body: bytes


Handler = Callable[[Req, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool | None]]


class Server:
    """A loopback server: reads requests, and a test's handler writes the raw answer.

    A handler returning False closes the connection; `hangups` counts connections the
    client closed while the server waited on them.
    """

    def __init__(self, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.connections = 0
        self.hangups = 0
        self.requests: list[Req] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks)

    def target(self, path: str = "/v1/chat/completions", host: str = "127.0.0.1") -> Target:
        scheme = "https" if self.tls else "http"
        return Target.parse(f"{scheme}://{host}:{self.port}{path}")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                req = await read_request(reader)
                if req is None:
                    self.hangups += 1
                    return
                self.requests.append(req)
                if await self.handler(req, reader, writer) is False:
                    return
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            self.hangups += 1
        except asyncio.CancelledError:
            pass  # the test is over; asyncio 3.11 would log a cancelled connection handler
        finally:
            self._tasks.discard(task)
            writer.close()


async def read_request(reader: asyncio.StreamReader) -> Req | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    line, *fields = head.decode().split("\r\n")[:-2]
    headers = {name.lower(): value.strip() for name, _, value in (f.partition(":") for f in fields)}
    return Req(line, headers, await reader.readexactly(int(headers.get("content-length", "0"))))


def answer(body: bytes, *headers: str, status: str = "200 OK") -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked(*pieces: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n" + trailer + b"\r\n"


async def echo(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(answer(b"got " + req.body, "Content-Type: application/json"))


async def eventually(check: Callable[[], bool]) -> None:
    """Polls until `check()` holds; a bound on a hang, not a timing assertion."""
    for _ in range(500):
        if check():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition never held")


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    c = Client()
    yield c
    await c.close()


async def post(client: Client, target: Target, body: bytes = b"{}", timeouts: Timeouts = QUICK) -> tuple[int, bytes]:
    async with await client.request(target, body, encode_headers({"Content-Type": "application/json"}), timeouts) as resp:
        return resp.status, await resp.read()


# --- requests, reuse, framing ------------------------------------------------------------------


async def test_sequential_requests_share_one_connection_and_send_host_and_length(client: Client) -> None:
    async with Server(echo) as server:
        for i in range(3):
            assert await post(client, server.target(), b'{"n":%d}' % i) == (200, b'got {"n":%d}' % i)
        assert server.connections == 1
        first = server.requests[0]
        assert first.line == "POST /v1/chat/completions HTTP/1.1"
        assert first.headers["host"] == f"127.0.0.1:{server.port}"
        assert first.headers["content-length"] == "7"
        assert first.headers["content-type"] == "application/json"
        assert client.idle_connections == 1


def test_target_host_header_and_path() -> None:
    target = Target.parse("https://api.openai.com/v1/chat/completions?x=1")
    assert (target.origin, target.host_header, target.path) == (
        ("https", "api.openai.com", 443), "api.openai.com", "/v1/chat/completions?x=1"
    )
    assert target.head == b"/v1/chat/completions?x=1 HTTP/1.1\r\nHost: api.openai.com\r\n"
    assert Target.parse("http://[::1]:8080/v1").host_header == "[::1]:8080"
    with pytest.raises(ValueError):
        Target.parse("ftp://example.com/x")


def test_header_names_and_values_with_line_breaks_are_refused() -> None:
    assert encode_headers({"A": "1", "B": "two"}) == b"A: 1\r\nB: two\r\n"
    for bad in ({"X-Id": "a\r\nX-Evil: 1"}, {"X-Evil\n": "1"}, {"X-Id": "a\rb"}):
        with pytest.raises(ValueError):
            encode_headers(bad)


async def test_a_chunked_body_split_into_single_bytes_with_trailers(client: Client) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunked(b"hello ", b"chunked ", b"world", trailer=b"X-Trailer: yes\r\n")
    )

    async def dribble(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for i in range(len(raw)):
            writer.write(raw[i : i + 1])
            await writer.drain()

    async with Server(dribble) as server:
        assert await post(client, server.target()) == (200, b"hello chunked world")
        assert await post(client, server.target()) == (200, b"hello chunked world")
        assert server.connections == 1


async def test_a_chunked_body_cut_anywhere_between_two_reads(client: Client) -> None:
    raw = chunked(b"first", b"second;part", b"x" * 20).replace(b";ext=1", b"", 1)
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    cuts = iter(range(1, len(raw)))

    async def cut(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        at = next(cuts)
        writer.write(head + raw[:at])
        await writer.drain()
        await asyncio.sleep(0.002)  # two reads on the client's side, most of the time
        writer.write(raw[at:])

    async with Server(cut) as server:
        for _ in range(len(raw) - 1):
            assert await post(client, server.target()) == (200, b"firstsecond;part" + b"x" * 20)
        assert server.connections == 1


async def test_a_body_until_close_is_read_whole_and_its_connection_not_reused(client: Client) -> None:
    async def until_close(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        return False

    async with Server(until_close) as server:
        assert await post(client, server.target()) == (200, b"part one, part two")
        assert await post(client, server.target()) == (200, b"part one, part two")
        assert server.connections == 2


async def test_connection_close_from_the_server_is_honoured(client: Client) -> None:
    async def close_after(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"ok", "Connection: close"))
        await reader.read()  # the server waits for the client to close

    async with Server(close_after) as server:
        assert await post(client, server.target()) == (200, b"ok")
        assert await post(client, server.target()) == (200, b"ok")
        assert server.connections == 2
        await eventually(lambda: server.hangups == 2)


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    ],
    ids=["http-1.0", "length-and-chunked"],
)
async def test_answers_that_cannot_keep_the_connection_are_not_pooled(client: Client, raw: bytes) -> None:
    async def answer_raw(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    async with Server(answer_raw) as server:
        assert await post(client, server.target()) == (200, b"ok")
        assert await post(client, server.target()) == (200, b"ok")
        assert server.connections == 2


async def test_an_http_1_0_answer_that_asks_for_keep_alive_is_pooled(client: Client) -> None:
    async def keep(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nCONTENT-LENGTH: 2\r\n\r\nok")

    async with Server(keep) as server:
        assert await post(client, server.target()) == (200, b"ok")
        assert await post(client, server.target()) == (200, b"ok")
        assert server.connections == 1


async def test_interim_1xx_answers_are_skipped(client: Client) -> None:
    async def interim(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + answer(b"final"))

    async with Server(interim) as server:
        async with await client.request(server.target(), b"{}", encode_headers({}), QUICK) as resp:
            assert (resp.status, await resp.read()) == (200, b"final")
            assert "link" not in resp.headers


async def test_headers_are_looked_up_by_lower_case_name_and_repeats_are_joined(client: Client) -> None:
    async def headers(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"{}", "Retry-After: 7", "X-Many: a", "x-many:b", "Content-Type:  text/plain "))

    async with Server(headers) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            assert resp.headers["retry-after"] == "7"
            assert resp.headers["x-many"] == "a, b"
            assert resp.headers["content-type"] == "text/plain"


async def test_a_redirect_is_just_a_response(client: Client) -> None:
    async def redirect(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"", "Location: http://127.0.0.1:1/elsewhere", status="307 Temporary Redirect"))

    async with Server(redirect) as server:
        assert await post(client, server.target()) == (307, b"")
        assert len(server.requests) == 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_compressed_body_is_decoded(client: Client, encoding: str) -> None:
    text = b'{"content": "' + b"token " * 2000 + b'"}'
    packed = gzip.compress(text) if encoding == "gzip" else zlib.compress(text)

    async def compressed(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = f"HTTP/1.1 200 OK\r\nContent-Encoding: {encoding}\r\nTransfer-Encoding: chunked\r\n\r\n"
        writer.write(head.encode() + chunked(packed[:50], packed[50:]))

    async with Server(compressed) as server:
        assert await post(client, server.target()) == (200, text)
        assert await post(client, server.target()) == (200, text)
        assert server.connections == 1


async def test_a_compressed_body_that_decodes_to_too_much_is_refused(client: Client) -> None:
    bomb = gzip.compress(b"\0" * 40_000_000)  # about 40 KB on the wire

    async def compressed(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(bomb, "Content-Encoding: gzip"))

    async with Server(compressed) as server:
        with pytest.raises(BodyIncomplete):
            await post(client, server.target())


async def test_a_body_that_does_not_decode_is_incomplete(client: Client) -> None:
    async def garbage(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"not gzip at all", "Content-Encoding: gzip"))

    async with Server(garbage) as server:
        with pytest.raises(BodyIncomplete):
            await post(client, server.target())


# --- streaming and early exits ------------------------------------------------------------------


async def test_chunks_are_handed_over_as_they_arrive(client: Client) -> None:
    go_on = asyncio.Event()

    async def stream(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"6\r\ndata: \r\n")
        await writer.drain()
        await go_on.wait()  # nothing more until the client has seen the first piece
        writer.write(b"5\r\nhello\r\n0\r\n\r\n")

    async with Server(stream) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            assert await resp.read_chunk() == b"data: "
            go_on.set()
            assert await resp.read() == b"hello"
            assert resp.at_eof()
        assert client.idle_connections == 1


async def test_leaving_a_body_half_read_closes_the_connection(client: Client) -> None:
    async def endless(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(200):
            writer.write(b"5\r\ntoken\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        return False

    async with Server(endless) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            assert await resp.read_chunk()
        await eventually(lambda: server.hangups == 1)  # the server saw the client hang up
        assert client.open_connections == 0
        server.handler = echo
        assert await post(client, server.target()) == (200, b"got {}")
        assert server.connections == 2


async def test_a_cancelled_read_closes_the_connection(client: Client) -> None:
    async def stall(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await reader.read()

    async with Server(stall) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            reading = asyncio.create_task(resp.read())
            await asyncio.sleep(0.05)
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        await eventually(lambda: server.hangups == 1)
        assert client.open_connections == 0


async def test_reading_a_limited_prefix_then_leaving_closes_the_connection(client: Client) -> None:
    async def big(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer(b"x" * 1_000_000))

    async with Server(big) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            assert await resp.read_limited(1000) == b"x" * 1000
        await eventually(lambda: server.hangups == 1)
        assert client.open_connections == 0


# --- the peer going away ------------------------------------------------------------------------


async def test_a_server_closing_an_idle_connection_leaves_the_pool_at_once(client: Client) -> None:
    async def once(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(answer(b"ok"))  # keep-alive announced, then closed anyway
        await writer.drain()
        await asyncio.sleep(0.05)
        return False

    async with Server(once) as server:
        assert await post(client, server.target()) == (200, b"ok")
        assert client.idle_connections == 1
        await eventually(lambda: client.idle_connections == 0)
        assert client.open_connections == 0
        assert await post(client, server.target()) == (200, b"ok")
        assert server.connections == 2


async def test_idle_connections_are_closed_after_the_keep_alive_time() -> None:
    client = Client(keepalive_s=0.1)
    try:
        async with Server(echo) as server:
            await post(client, server.target())
            await eventually(lambda: server.hangups == 1)
            assert client.open_connections == 0
            await post(client, server.target())
            assert server.connections == 2
    finally:
        await client.close()


async def test_a_server_hanging_up_before_answering_is_disconnected(client: Client) -> None:
    async def hang_up(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        return False

    async with Server(hang_up) as server:
        with pytest.raises(Disconnected):
            await post(client, server.target())


async def test_a_body_cut_short_is_incomplete(client: Client) -> None:
    async def short(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        return False

    async with Server(short) as server:
        async with await client.request(server.target(), b"", encode_headers({}), QUICK) as resp:
            assert await resp.read_chunk() == b"only this"
            with pytest.raises(BodyIncomplete):
                await resp.read_chunk()


@pytest.mark.parametrize(
    "raw",
    [
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n folded: header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\ncontent-length: 3\r\n\r\nabc",
        b"HTTP/2 200\r\n\r\n",
    ],
    ids=["not-http", "headers-too-large", "folded-header", "negative-length", "two-lengths", "http-2"],
)
async def test_a_malformed_head_is_a_bad_response(client: Client, raw: bytes) -> None:
    async def bad(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(raw)
        await reader.read()

    async with Server(bad) as server:
        with pytest.raises(BadResponse):
            await post(client, server.target())
        assert client.open_connections == 0


async def test_bad_chunk_framing_is_incomplete(client: Client) -> None:
    async def bad(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n")

    async with Server(bad) as server:
        with pytest.raises(BodyIncomplete):
            await post(client, server.target())


async def test_nobody_listening_is_a_connect_failure(client: Client) -> None:
    async with Server(echo) as server:
        target = server.target()
    with pytest.raises(ConnectFailed) as info:
        await post(client, target)
    assert str(target.origin[2]) not in str(info.value)
    assert client.open_connections == 0


# --- timeouts and the cap -----------------------------------------------------------------------


async def test_no_status_line_within_first_byte_is_a_timeout(client: Client) -> None:
    async def silent(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with Server(silent) as server:
        with pytest.raises(TimeoutError):
            await post(client, server.target(), timeouts=Timeouts(first_byte=0.1))
        await eventually(lambda: server.hangups == 1)


async def test_a_body_stalling_longer_than_idle_is_a_timeout(client: Client) -> None:
    async def stall(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await reader.read()

    async with Server(stall) as server:
        async with await client.request(server.target(), b"", encode_headers({}), Timeouts(idle=0.1)) as resp:
            assert await resp.read_chunk() == b"first"
            with pytest.raises(TimeoutError):
                await resp.read_chunk()
        await eventually(lambda: server.hangups == 1)


async def test_a_steady_trickle_still_ends_at_the_total_timeout(client: Client) -> None:
    async def trickle(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(500):
            writer.write(b"1\r\nx\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)
        return False

    async with Server(trickle) as server:
        async with await client.request(server.target(), b"", encode_headers({}), Timeouts(idle=0.2, total=0.3)) as resp:
            with pytest.raises(TimeoutError):
                while await resp.read_chunk():
                    pass


async def test_a_connect_that_hangs_is_a_timeout(client: Client) -> None:
    # A listener that never accepts, its queue full: Linux drops the next SYN, so connecting hangs.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(4):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
                fillers.append(filler)
            await asyncio.sleep(0.05)
            target = Target.parse(f"http://127.0.0.1:{port}/v1/chat/completions")
            with pytest.raises(TimeoutError):
                await post(client, target, timeouts=Timeouts(connect=0.2))
            assert client.open_connections == 0
        finally:
            for filler in fillers:
                filler.close()


async def test_the_pool_cap_makes_requests_wait_for_a_connection() -> None:
    client = Client(limit=2)
    release = asyncio.Event()

    async def held(req: Req, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await release.wait()
        writer.write(answer(b"done"))

    try:
        async with Server(held) as server:
            calls = [asyncio.create_task(post(client, server.target())) for _ in range(3)]
            await eventually(lambda: len(server.requests) == 2)
            assert client.open_connections == 2
            # A request that can neither connect nor borrow within `connect` times out.
            with pytest.raises(TimeoutError):
                await post(client, server.target(), timeouts=Timeouts(connect=0.05))
            release.set()
            assert await asyncio.gather(*calls) == [(200, b"done")] * 3
            assert server.connections == 2
    finally:
        await client.close()


async def test_at_the_cap_an_idle_connection_to_another_origin_gives_way() -> None:
    client = Client(limit=1)
    try:
        async with Server(echo) as first, Server(echo) as second:
            await post(client, first.target())
            assert await post(client, second.target()) == (200, b"got {}")
            await eventually(lambda: first.hangups == 1)
            assert client.open_connections == 1
    finally:
        await client.close()


# --- TLS ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for `localhost` only (no IP address in it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder = tmp_path_factory.mktemp("tls")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


def server_tls(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    return context


async def test_https_verifies_the_certificate_and_the_host_name(certificate: tuple[Path, Path]) -> None:
    trusting = ssl.create_default_context(cafile=str(certificate[0]))
    async with Server(echo, tls=server_tls(certificate)) as server:
        client = Client(ssl_context=trusting)
        try:
            assert await post(client, server.target(host="localhost")) == (200, b"got {}")
            assert await post(client, server.target(host="localhost")) == (200, b"got {}")
            assert server.connections == 1
            with pytest.raises(ConnectFailed):  # the certificate does not name 127.0.0.1
                await post(client, server.target(host="127.0.0.1"))
        finally:
            await client.close()
        default = Client()  # the system's CAs: a self-signed certificate is refused
        try:
            with pytest.raises(ConnectFailed):
                await post(default, server.target(host="localhost"))
        finally:
            await default.close()


async def test_closing_the_client_closes_idle_connections(client: Client) -> None:
    async with Server(echo) as server:
        await post(client, server.target())
        await client.close()
        await eventually(lambda: server.hangups == 1)
        assert client.open_connections == 0


async def test_a_response_read_after_the_client_closed_is_not_pooled(client: Client) -> None:
    async with Server(echo) as server:
        async with await client.request(server.target(), b"{}", encode_headers({}), QUICK) as resp:
            await client.close()
            assert await resp.read() == b"got {}"
        await eventually(lambda: server.hangups == 1)
        assert client.open_connections == 0


def test_timeouts_default_to_none() -> None:
    timeouts: Any = NO_LIMITS
    assert (timeouts.connect, timeouts.first_byte, timeouts.idle, timeouts.total) == (None,) * 4
