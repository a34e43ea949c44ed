"""Request log lines: one line whatever the values hold, in both formats, and only the
report's fields."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest

from gateway.request_log import LEVELS, CallReport, LineFormatter, RequestLog, configure
from gateway.settings import LogSettings

HOSTILE = 'gpt-4o\n{"level":"error","msg":"forged"}\r\x1b[31mred\x1b[0m \u2028\x85\u2029\x1c "quoted" ' + "x" * 300


def report() -> CallReport:
    return CallReport(route="/v1/chat/completions", session_id="sess_1", model=HOSTILE, status=200, tokens_in=3, stream=True)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_hostile_value_stays_inside_one_escaped_line(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    RequestLog(LogSettings(format=fmt)).write("req_1", report(), level=LEVELS["info"])  # type: ignore[arg-type]
    text = err.getvalue()
    assert len(text.splitlines()) == 1 and text.endswith("\n")  # splitlines: every Unicode line break
    assert not any(c in text for c in "\r\x1b")
    if fmt == "json":
        line = json.loads(text)
        assert line["model"] == HOSTILE[:200] and line["request_id"] == "req_1" and line["level"] == "info"
    else:
        assert text.startswith("ts=") and " level=info msg=request request_id=req_1 route=/v1/chat/completions" in text
        assert ' model="gpt-4o\\n{\\"level\\":\\"error\\"' in text and "stream=true" in text and "tokens_in=3" in text
        assert "code=" not in text  # None is left out


def test_lines_below_the_level_are_not_written(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    log = RequestLog(LogSettings(level="warning"))
    log.write("req_1", report(), level=LEVELS["info"])
    assert err.getvalue() == "" and not log.enabled(LEVELS["info"]) and log.enabled(LEVELS["error"])


def test_other_gateway_records_take_the_same_shape() -> None:
    configure(LogSettings(format="json"))
    record = logging.LogRecord("gateway.server", logging.WARNING, __file__, 1, "listening %s", ("a\nb",), None)
    record.fields = {"listen": "http://127.0.0.1:1"}
    line = LineFormatter("json").format(record)
    assert "\n" not in line
    assert json.loads(line) | {"ts": ""} == {"ts": "", "level": "warning", "logger": "gateway.server", "msg": "listening a\nb", "listen": "http://127.0.0.1:1"}
    assert sum(getattr(h, "abc_gateway", False) for h in logging.getLogger("gateway").handlers) == 1
    configure(LogSettings())
    assert sum(getattr(h, "abc_gateway", False) for h in logging.getLogger("gateway").handlers) == 1
