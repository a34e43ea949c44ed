"""The `openai` provider: a passthrough to any OpenAI-compatible upstream (OpenAI, vLLM, Ollama).

Only `api_base` is ever contacted, with the operator's key; upstream failures become typed
`GatewayError`s, and any upstream text passed through has keys and URLs scrubbed from it.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncGenerator, Iterable
from typing import Any, Final
from urllib.parse import urlsplit

import orjson

from gateway.errors import (
    GatewayError,
    InvalidRequest,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers.base import Endpoint, Reply
from gateway.providers.transport import (
    BodyIncomplete,
    Client,
    ConnectFailed,
    Disconnected,
    HeaderBlock,
    HeaderNames,
    Response,
    Target,
    Timeouts,
    TransportError,
    encode_headers,
)
from gateway.settings import ProviderSettings
from gateway.tracing import NOOP, Tracer

__all__ = [
    "PASSTHROUGH_HEADERS",
    "AnthropicProvider",
    "OpenAICompatProvider",
    "SSEParser",
    "make_upstream_client",
    "scrub",
]

log = logging.getLogger(__name__)

# Upstream response headers a client may see; everything else stays behind the gateway.
PASSTHROUGH_HEADERS: Final[tuple[str, ...]] = (
    "openai-processing-ms",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
)
# The upstream's own request id is renamed so it never shadows the gateway's x-request-id.
UPSTREAM_REQUEST_ID_HEADER: Final = "x-upstream-request-id"
_PASSED_ON: Final = HeaderNames(*PASSTHROUGH_HEADERS, "x-request-id")

# 4xx answers that are the request's fault: passed through to the client with their status.
_CLIENT_FAULT_STATUSES: Final = frozenset({400, 404, 409, 413, 422})
# Failures another attempt may cure (see gateway.providers.resilience); 529 is Anthropic's
# "overloaded", a 503 by another number.
RETRYABLE_STATUSES: Final = frozenset({500, 502, 503, 504, 529})
_MAX_ERROR_BODY_BYTES: Final = 64 * 1024
_MAX_MESSAGE_CHARS: Final = 2000
# A single SSE event bigger than this is a broken or hostile upstream, not a token.
MAX_EVENT_BYTES: Final = 8 * 1024 * 1024
# After [DONE], how long to wait for the end of the HTTP body so the connection can be reused.
_DRAIN_AFTER_DONE_S: Final = 0.1
_DONE: Final = b"[DONE]"
# Typed-event streams end with their own last event (response.completed, message_stop),
# not [DONE]; whether that event came is the relay's to check.
_ENDS_WITHOUT_DONE: Final = frozenset({Endpoint.RESPONSES, Endpoint.MESSAGES})
ANTHROPIC_VERSION: Final = "2023-06-01"
_REDACTED: Final = "***"
# Shorter "keys" (e.g. Ollama's placeholder "x") are not secrets and would shred every message.
_MIN_SECRET_LEN: Final = 4

_SK_KEY = re.compile(r"sk-[A-Za-z0-9_-]{8,}")
_BEARER = re.compile(r"(?i)\bbearer\s+[A-Za-z0-9._~+/=-]+")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def scrub(text: str, secrets: Iterable[str | None]) -> str:
    """Remove `secrets` and anything shaped like an API key or bearer token from `text`.

    Upstreams echo keys ("Incorrect API key provided: sk-...") and their own URLs in
    error messages; none of that may reach a client or a log.
    """
    # Longest first, so a secret that contains another is removed whole.
    real = [s for s in secrets if s and len(s) >= _MIN_SECRET_LEN]
    for secret in sorted(real, key=len, reverse=True):
        text = text.replace(secret, _REDACTED)
    text = _SK_KEY.sub(_REDACTED, text)
    return _BEARER.sub("Bearer " + _REDACTED, text)


def make_upstream_client(*, limit: int = 256) -> Client:
    """The one keep-alive pool shared by every `openai` provider; the app closes it.

    It reads nothing from the environment (no HTTP(S)_PROXY rerouting keyed traffic), keeps
    no cookies (nothing leaks between sessions) and follows no redirects.
    """
    return Client(limit=limit, keepalive_s=30.0)


class SSEParser:
    """Incremental server-sent-events parser: bytes in, the data payload of each event out.

    Lines end in LF or CRLF. `event:`/`id:`/`retry:` fields and `:` comments are ignored;
    the data lines of one event are joined with LF, as the SSE spec says.
    """

    __slots__ = ("_data", "_data_size", "_partial")

    def __init__(self) -> None:
        self._partial = bytearray()
        self._data: list[bytes] = []
        self._data_size = 0

    def feed(self, chunk: bytes) -> list[bytes]:
        if b"\n" not in chunk:
            # Amortised append: a long line split over many reads stays linear.
            self._partial += chunk
            self._check_size()
            return []
        if self._partial:
            chunk = bytes(self._partial) + chunk
            self._partial.clear()
        if self._data or b"\r" in chunk:
            return self._lines(chunk)
        # Between events, without CRs (what model APIs send): split on the blank lines, and
        # take a one-line `data: ` event whole; anything else goes line by line.
        blocks = chunk.split(b"\n\n")
        tail = blocks.pop()
        events: list[bytes] = []
        for block in blocks:
            if block[:6] == b"data: " and b"\n" not in block:
                if len(block) > MAX_EVENT_BYTES:
                    raise UpstreamError("upstream sent an oversized stream event")
                if len(block) > 6:
                    events.append(block[6:])
                continue
            for line in block.split(b"\n"):
                self._line(line)
            payload = self._dispatch()
            if payload is not None:
                events.append(payload)
        if tail:
            events += self._lines(tail)
        return events

    def _lines(self, chunk: bytes) -> list[bytes]:
        """Line by line; the last, unfinished line waits in `_partial` (empty on entry)."""
        lines = chunk.split(b"\n")
        self._partial += lines.pop()
        self._check_size()
        events: list[bytes] = []
        for line in lines:
            payload = self._line(line)
            if payload is not None:
                events.append(payload)
        return events

    def finish(self) -> bytes | None:
        """At end of input: the data of an event left without its closing blank line, if any."""
        if self._partial:
            self._line(bytes(self._partial))
            self._partial.clear()
        return self._dispatch()

    def _line(self, line: bytes) -> bytes | None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            return self._dispatch()
        if line.startswith(b"data:"):
            value = line[6:] if line.startswith(b"data: ") else line[5:]
            self._data.append(value)
            self._data_size += len(value)
            self._check_size()
        # Anything else is a comment or a field the gateway has no use for.
        return None

    def _dispatch(self) -> bytes | None:
        if not self._data:
            return None
        payload = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data = []
        self._data_size = 0
        return payload or None

    def _check_size(self) -> None:
        if len(self._partial) + self._data_size > MAX_EVENT_BYTES:
            raise UpstreamError("upstream sent an oversized stream event")


class OpenAICompatProvider:
    """Forwards checked request bodies to one OpenAI-compatible `api_base` and maps its answers."""

    def __init__(self, settings: ProviderSettings, http: Client, *, tracer: Tracer = NOOP) -> None:
        if not settings.api_base:
            raise ValueError(f"provider {settings.name!r}: api_base is required")
        self.name = settings.name
        self._tracer = tracer  # adds `traceparent` to upstream calls when tracing
        self._http = http
        base = settings.api_base.rstrip("/")
        # Fixed here, once: nothing in a request body is ever read to build a URL.
        self._targets: dict[Endpoint, Target] = {ep: Target.parse(f"{base}/{ep.value}") for ep in Endpoint}
        timeouts = settings.timeouts
        self._timeouts = Timeouts(
            connect=timeouts.connect_s, first_byte=timeouts.first_byte_s, idle=timeouts.idle_s, total=timeouts.total_s,
        )
        key = settings.api_key()
        parts = urlsplit(base)
        self._secrets: tuple[str | None, ...] = (key, base, parts.netloc, parts.password)
        self.native_endpoints = frozenset({Endpoint.RESPONSES}) if settings.responses == "native" else frozenset()
        # A library's default User-Agent would tell the upstream our Python and library versions.
        common = {"User-Agent": "abc-gateway", **self._auth_headers(key)}
        self._json_headers = encode_headers({
            **common,
            "Content-Type": "application/json",
            "Accept": "application/json",
            # Compressing a few KiB of JSON on loopback or a LAN costs both sides more than it saves.
            "Accept-Encoding": "identity",
        })
        self._sse_headers = encode_headers({
            **common,
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
            # Compressed SSE can sit in a zlib buffer; tokens must flow as they come.
            "Accept-Encoding": "identity",
        })

    def _auth_headers(self, key: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def send(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None
    ) -> Reply:
        headers = self._headers(self._json_headers, request_id)
        try:
            async with await self._post(endpoint, body, headers) as resp:
                if resp.status // 100 != 2:
                    raise await self._failure(resp)
                raw = await resp.read()
                passthrough = _passthrough_headers(resp)
        except (TimeoutError, TransportError) as exc:
            raise _transport_error(exc) from None
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise UpstreamError("upstream answered with invalid JSON") from None
        if not isinstance(data, dict):
            raise UpstreamError("upstream answered with JSON that is not an object")
        return Reply(body=raw, data=data, headers=passthrough)

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        headers = self._headers(self._sse_headers, request_id)
        try:
            async with await self._post(endpoint, body, headers) as resp:
                if resp.status // 100 != 2:
                    raise await self._failure(resp)
                if headers_out is not None:
                    headers_out.update(_passthrough_headers(resp))
                try:
                    parser = SSEParser()
                    done = False
                    while chunk := await resp.read_chunk():
                        for payload in parser.feed(chunk):
                            if payload == _DONE:
                                done = True
                                break
                            if b'"error"' in payload:  # cheap filter before a full parse
                                self._raise_if_error_event(payload)
                            yield payload
                        if done:
                            break
                    else:
                        last = parser.finish()
                        done = last == _DONE or endpoint in _ENDS_WITHOUT_DONE
                        if last is not None and last != _DONE:
                            yield last
                    if not done:
                        raise UpstreamError("upstream stream ended early")
                    await _drain(resp)
                except BaseException:
                    # Early exit (client gone, error, cancel): drop the connection rather than
                    # return it half-read to the pool; closing it is what stops the upstream.
                    resp.close()
                    raise
        except (TimeoutError, TransportError) as exc:
            raise _transport_error(exc) from None

    async def close(self) -> None:
        """Nothing to do: the shared client belongs to the app, which closes it."""

    def _headers(self, fixed: HeaderBlock, request_id: str | None) -> HeaderBlock:
        """The provider's fixed headers, then this call's: its request id and trace context."""
        block = fixed
        # Only a plain token is forwarded: it is ours, but it must not become a header injection.
        if request_id is not None and _REQUEST_ID.fullmatch(request_id):
            block = HeaderBlock(b"%sX-Request-Id: %s\r\n" % (block, request_id.encode()))
        if self._tracer is not NOOP and (trace := self._tracer.inject({})):
            block = HeaderBlock(block + encode_headers(trace))
        return block

    async def _post(self, endpoint: Endpoint, body: dict[str, Any], headers: HeaderBlock) -> Response:
        """The response, once its status and headers are in: within `first_byte_s`.

        The client follows no redirect: one would take the key and the request somewhere
        other than api_base.
        """
        return await self._http.request(self._targets[endpoint], orjson.dumps(body), headers, self._timeouts)

    async def _failure(self, resp: Response) -> GatewayError:
        raw = await resp.read_limited(_MAX_ERROR_BODY_BYTES)
        status = resp.status
        if status in _CLIENT_FAULT_STATUSES:
            message, param, code = _parse_error(raw)
            message = self._scrub(message)[:_MAX_MESSAGE_CHARS] or "upstream rejected the request"
            log.info("provider %s: upstream rejected the request (status %d)", self.name, status)
            return InvalidRequest(
                message,
                param=self._scrub(param) if param else None,
                code=self._scrub(code) if code else None,
                status=status,
            )
        if status in (401, 403):
            log.error("provider %s: upstream rejected the configured key (%d)", self.name, status)
            return UpstreamError(
                "upstream rejected the gateway's credentials", code="upstream_auth_failed"
            )
        retry_after = _retry_after(resp.headers.get("retry-after"))
        if status == 429:
            log.warning("provider %s: upstream rate limited the gateway", self.name)
            return UpstreamRateLimited(
                "the upstream provider is rate limiting the gateway; retry later", retry_after_s=retry_after,
            )
        log.warning("provider %s: upstream failed (status %d)", self.name, status)
        if status in RETRYABLE_STATUSES:
            return UpstreamUnavailable(f"upstream error (status {status})", retry_after_s=retry_after)
        return UpstreamError(f"upstream error (status {status})")

    def _raise_if_error_event(self, payload: bytes) -> None:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return  # not JSON: the consumer's problem, not an error event
        if isinstance(data, dict) and "error" in data:
            message, _, _ = _parse_error(payload)
            message = self._scrub(message)[:_MAX_MESSAGE_CHARS]
            log.warning("provider %s: upstream sent an error mid-stream", self.name)
            raise UpstreamError(message or "upstream failed mid-stream")

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)


class AnthropicProvider(OpenAICompatProvider):
    """`kind: anthropic`: Anthropic's own API, for Messages calls, passed through as they are.

    Chat-form calls (chat completions, Responses) are refused: this provider does not
    translate them; route those models through `kind: litellm` instead.
    """

    speaks_chat = False

    def __init__(self, settings: ProviderSettings, http: Client, *, tracer: Tracer = NOOP) -> None:
        super().__init__(settings, http, tracer=tracer)
        self.native_endpoints = frozenset({Endpoint.MESSAGES})

    def _auth_headers(self, key: str | None) -> dict[str, str]:
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers

    def _check(self, endpoint: Endpoint) -> None:
        if endpoint is not Endpoint.MESSAGES:
            raise InvalidRequest(
                f"provider {self.name!r} speaks Anthropic's Messages API only: call /v1/messages",
                code="endpoint_not_supported",
            )

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        self._check(endpoint)
        return await super().send(endpoint, body, request_id=request_id)

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        self._check(endpoint)
        async for payload in super().stream(endpoint, body, request_id=request_id, headers_out=headers_out):
            yield payload


def _passthrough_headers(resp: Response) -> dict[str, str]:
    found = resp.find_headers(_PASSED_ON)
    upstream_id = found.pop("x-request-id", None)
    if upstream_id:
        found[UPSTREAM_REQUEST_ID_HEADER] = upstream_id
    return {name: value for name, value in found.items() if value}


def _transport_error(exc: TimeoutError | TransportError) -> GatewayError:
    """Map transport failures; none of their text is kept (it could name the upstream host)."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("upstream timed out")
    if isinstance(exc, BodyIncomplete):
        return UpstreamError("upstream stream ended early")
    if isinstance(exc, ConnectFailed):
        return UpstreamUnavailable("upstream unreachable")
    if isinstance(exc, Disconnected):
        return UpstreamUnavailable("upstream connection failed")
    return UpstreamError("upstream connection failed")


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds; the HTTP-date form is rare from model APIs and is ignored."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and seconds >= 0 else None


async def _drain(resp: Response) -> None:
    """Read what follows [DONE] (normally just the chunked body's end) to keep the connection."""
    if resp.at_eof():
        return
    try:
        async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
            seen = 0
            while not resp.at_eof() and seen < _MAX_ERROR_BODY_BYTES:
                seen += len(await resp.read_chunk())
    except (TimeoutError, TransportError):
        pass
    if not resp.at_eof():
        resp.close()


def _parse_error(raw: bytes) -> tuple[str, str | None, str | None]:
    """(message, param, code) from an OpenAI-style error body, or vLLM/Ollama's flatter shapes."""
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return "", None, None
    if not isinstance(data, dict):
        return "", None, None
    error = data.get("error", data)
    if isinstance(error, str):
        return error, None, None
    if not isinstance(error, dict):
        return "", None, None
    message = error.get("message")
    return (
        message if isinstance(message, str) else "",
        _opt_str(error.get("param")),
        _opt_str(error.get("code")),
    )


def _opt_str(value: Any) -> str | None:
    if value is None or isinstance(value, (dict, list)):
        return None
    return str(value)
