"""The request log: one line per request on stderr, written once the request is settled.

The outermost middleware puts a `CallReport` on each request; the spine fills in what only
it knows (model, tokens, cost, timings), the middleware the status and error code, and it
writes the line after the handler returns (a stream's handler returns after settlement).
Only a report's fields are ever written, so no token, key, header or prompt text can reach
the log; every value is escaped, so a newline or an ANSI code in a model name can't forge
a line. Other gateway loggers (start-up, warnings) write the same shape through `configure`.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import sys
import time
from dataclasses import dataclass
from typing import Any, Literal

import orjson

from gateway.settings import LogSettings

__all__ = ["LEVELS", "CallReport", "LineFormatter", "RequestLog", "configure", "render"]

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_NAMES = {number: name for name, number in LEVELS.items()}
# Client-chosen strings (a model name) are cut to this: a log line is not a place for payloads.
MAX_VALUE_CHARS = 200


@dataclass(slots=True)
class CallReport:
    """What one request did, as the log tells it; None means "did not get that far"."""

    route: str = ""
    session_id: str | None = None
    assembly_id: str | None = None
    tenant: str | None = None
    model: str | None = None
    served_by: str | None = None
    status: int = 0
    code: str | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    cost_nanos: int | None = None
    gateway_ms: float | None = None
    upstream_ms: float | None = None
    ttft_ms: float | None = None
    stream: bool | None = None

    def settled(
        self, *, model: str, tokens_in: int, tokens_out: int, cost_nanos: int,
        gateway_s: float, upstream_s: float, ttft_s: float | None = None, code: str | None = None,
    ) -> None:
        """What settlement knows: one call from the spine (`code`: why a failed call failed,
        which a stream that already answered 200 has no other way to tell)."""
        self.served_by, self.code = model, code
        self.tokens_in, self.tokens_out, self.cost_nanos = tokens_in, tokens_out, cost_nanos
        self.gateway_ms = round(gateway_s * 1000, 3)
        self.upstream_ms = round(upstream_s * 1000, 3)
        if ttft_s is not None:
            self.ttft_ms = round(ttft_s * 1000, 3)


_REPORT_FIELDS = tuple(f.name for f in dataclasses.fields(CallReport))
_report_values = operator.attrgetter(*_REPORT_FIELDS)  # every field in one C call
_second: list[Any] = [-1, ""]  # the last whole second formatted, and its text: strftime is the slow part


def _timestamp(now: float) -> str:
    whole = int(now)
    if whole != _second[0]:
        _second[:] = [whole, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole))]
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"


def _clip(value: Any) -> Any:
    return value[:MAX_VALUE_CHARS] if isinstance(value, str) and len(value) > MAX_VALUE_CHARS else value


# Line breaks to Unicode (and to Python's str.splitlines) that JSON leaves unescaped.
_BREAKS = ((b"\xc2\x85", b"\\u0085"), (b"\xe2\x80\xa8", b"\\u2028"), (b"\xe2\x80\xa9", b"\\u2029"))


def _one_line(data: bytes) -> bytes:
    if b"\xc2\x85" in data or b"\xe2\x80" in data:
        for raw, escaped in _BREAKS:
            data = data.replace(raw, escaped)
    return data


def render(fields: dict[str, Any], fmt: Literal["json", "text"]) -> bytes:
    """One line. JSON escapes control characters itself (and we the Unicode line breaks it
    leaves alone); the text format JSON-quotes any string that is not plain, so both are
    one line whatever the values hold."""
    if fmt == "json":
        return _one_line(orjson.dumps(fields)) + b"\n"
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, str) and not (value and value.isascii() and value.isprintable() and " " not in value and '"' not in value):
            value = _one_line(orjson.dumps(value)).decode()
        elif isinstance(value, bool):
            value = "true" if value else "false"
        parts.append(f"{key}={value}")
    return (" ".join(parts) + "\n").encode()


class RequestLog:
    """Writes request lines straight to stderr: no logging.Formatter on the hot path."""

    def __init__(self, settings: LogSettings) -> None:
        self.threshold = LEVELS[settings.level]
        self.format: Literal["json", "text"] = settings.format
        self.stream = sys.stderr  # as the process had it when the app was built

    def enabled(self, level: int) -> bool:
        return level >= self.threshold

    def write(self, request_id: str, report: CallReport, *, level: int) -> None:
        if level < self.threshold:
            return
        line: dict[str, Any] = {"ts": _timestamp(time.time()), "level": _NAMES[level], "msg": "request", "request_id": request_id}
        line.update(zip(_REPORT_FIELDS, _report_values(report)))  # not dataclasses.asdict: it deep-copies
        line["model"] = _clip(line["model"])
        line["served_by"] = _clip(line["served_by"])
        self.stream.write(render(line, self.format).decode())
        self.stream.flush()


class LineFormatter(logging.Formatter):
    """Gateway log records (start-up, warnings) in the request lines' shape and escaping."""

    def __init__(self, fmt: Literal["json", "text"]) -> None:
        super().__init__()
        self.line_format: Literal["json", "text"] = fmt

    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, Any] = {
            "ts": _timestamp(record.created), "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
        }
        fields.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            fields["exc"] = self.formatException(record.exc_info)
        return render(fields, self.line_format).decode().rstrip("\n")


def configure(settings: LogSettings) -> None:
    """Route the `gateway` loggers to stderr in the configured format and level (idempotent)."""
    logger = logging.getLogger("gateway")
    logger.setLevel(LEVELS[settings.level])
    for handler in list(logger.handlers):
        if getattr(handler, "abc_gateway", False):
            logger.removeHandler(handler)
    handler = logging.StreamHandler()  # stderr, looked up when the handler is made
    handler.setFormatter(LineFormatter(settings.format))
    handler.abc_gateway = True  # type: ignore[attr-defined]  # marks our handler for re-configuration
    logger.addHandler(handler)
