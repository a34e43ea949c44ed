"""aiohttp's own refusals in OpenAI's JSON error shape. A request aiohttp cannot parse (a
header over its limits, a bad character, Transfer-Encoding with Content-Length, a broken
request line) is answered by its connection handler before any middleware runs; the
runner here gives every connection a handler whose answer is JSON, never plain text.
"""

from __future__ import annotations

import logging
import secrets

from aiohttp import web
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadStatusLine,
    HttpProcessingError,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from gateway.errors import GatewayError, HeaderTooLarge, InternalError, InvalidRequest, UriTooLong
from gateway.http.middlewares import error_response

__all__ = ["GatewayRunner", "protocol_error"]

log = logging.getLogger("gateway.http")

# What aiohttp raises for too many header lines (a count, not a size).
_TOO_MANY_HEADERS = "Too many headers received"


def protocol_error(exc: BaseException | None, request_id: str) -> GatewayError:
    """The error to answer for what aiohttp's parser (or, rarely, its handler) raised.

    Messages are ours: the parser's own quote the offending bytes, which may be a
    header such as Authorization, and an error must never echo a secret."""
    if isinstance(exc, LineTooLong):
        if _is_request_target(exc.args[0] if exc.args else b""):
            return UriTooLong("the request line is too long")
        return HeaderTooLarge("a request header is too large")
    if isinstance(exc, BadStatusLine):  # BadHttpMethod included
        return InvalidRequest("malformed HTTP request line", code="invalid_request_line")
    if isinstance(exc, InvalidURLError):
        return InvalidRequest("malformed request target", code="invalid_request_line")
    if isinstance(exc, InvalidHeader):
        return InvalidRequest("malformed request header", code="invalid_header")
    if isinstance(exc, BadHttpMessage) and exc.message == _TOO_MANY_HEADERS:
        return HeaderTooLarge("too many request headers")
    if isinstance(exc, HttpProcessingError):
        return InvalidRequest(f"malformed HTTP request: {_reason(exc)}", code="invalid_http_request")
    # Past the middleware, which answers every error of a handler: only a bug gets here.
    return InternalError(f"internal error (request id {request_id})")


def _is_request_target(line: object) -> bool:
    # aiohttp raises LineTooLong with the start of the line: a URL for the request line
    # (origin, absolute or asterisk form), a field name or value for a header. No field
    # name starts with '/' or '*' (they are not token characters).
    return isinstance(line, bytes | bytearray) and line.startswith((b"/", b"*", b"http://", b"https://"))


def _reason(exc: HttpProcessingError) -> str:
    # llhttp's errors read "<fixed reason>:\n\n  <the bytes>\n  ^": keep the reason only.
    reason = exc.message.split(":\n", 1)[0].strip()
    return reason[:120] if reason.isprintable() and reason else "unparseable"


class JsonErrorHandler(RequestHandler):
    """aiohttp's connection handler, answering its errors in OpenAI's shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # As aiohttp's own: part of a response went out, so nothing more can be said.
            raise ConnectionError("response already started; cannot send an error")
        request_id = "req_" + secrets.token_hex(12)
        error = protocol_error(exc, request_id)
        if isinstance(exc, HttpProcessingError):
            # The client's mistake, not ours: no traceback.
            log.info("refused an unparseable HTTP request (%s), request %s", error.code, request_id)
        else:
            log.error("unhandled error in request %s", request_id, exc_info=exc)
        response = error_response(error, request_id)
        response.force_close()  # the stream may be out of sync: as aiohttp, close it
        return response


class _JsonErrorServer(web.Server):
    def __call__(self) -> RequestHandler:
        # What web.Server.__call__ does, with our handler class.
        return JsonErrorHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """An AppRunner whose connections answer aiohttp's own refusals in JSON.

    aiohttp has no setting for the handler class; its Server builds a RequestHandler with
    the options the runner collected, so this rebuilds that Server with our subclass. The
    private names used here are pinned with aiohttp in requirements.lock, and
    tests/http/test_strict_input.py fails if they stop working."""

    async def _make_server(self) -> web.Server:
        built = await super()._make_server()
        return _JsonErrorServer(
            built.request_handler,
            request_factory=built.request_factory,
            handler_cancellation=built.handler_cancellation,
            loop=built._loop,
            **built._kwargs,
        )
