"""aiohttp's refusals mapped to the gateway's errors: by kind, with messages of our own
(the parser's quote the offending bytes, which may be a secret header)."""

from __future__ import annotations

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    BadStatusLine,
    InvalidHeader,
    InvalidURLError,
    LineTooLong,
)

from gateway.errors import HeaderTooLarge, InternalError, InvalidRequest, UriTooLong
from gateway.http.protocol import protocol_error

SECRET = "sk-live-secret-value"


@pytest.mark.parametrize(
    ("exc", "kind", "status"),
    [
        (LineTooLong(bytearray(b"/v1/" + b"a" * 96), 8190), UriTooLong, 414),
        (LineTooLong(b"http://host/" + b"a" * 88, 8190), UriTooLong, 414),
        (LineTooLong(f"Bearer {SECRET}".encode(), 8190), HeaderTooLarge, 431),
        (BadHttpMessage("Too many headers received"), HeaderTooLarge, 431),
        (InvalidHeader(f"Authorization: {SECRET}\x01".encode()), InvalidRequest, 400),
        (BadStatusLine(f"GET /{SECRET} HTTP/9"), InvalidRequest, 400),
        (BadHttpMethod(f"{SECRET} / HTTP/1.1"), InvalidRequest, 400),
        (InvalidURLError(f"/{SECRET}\x00"), InvalidRequest, 400),
        (BadHttpMessage(f"Invalid header value char:\n\n  b'X: {SECRET}\\x01'\n  ^"), InvalidRequest, 400),
    ],
)
def test_parser_errors_map_to_4xx_without_echoing_the_request(exc: Exception, kind: type, status: int) -> None:
    error = protocol_error(exc, "req_1")
    assert type(error) is kind and error.status == status
    assert SECRET not in error.to_json().decode()


def test_llhttp_reasons_are_kept_without_the_bytes_they_quote() -> None:
    error = protocol_error(BadHttpMessage(f"Invalid header value char:\n\n  b'X: {SECRET}'\n  ^"), "req_1")
    assert error.message == "malformed HTTP request: Invalid header value char"


def test_anything_else_is_a_500_carrying_the_request_id_and_no_exception_text() -> None:
    error = protocol_error(RuntimeError(SECRET), "req_42")
    assert isinstance(error, InternalError) and error.status == 500
    assert "req_42" in error.message and SECRET not in error.to_json().decode()
