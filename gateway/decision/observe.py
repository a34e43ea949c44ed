"""What a plan's sessions did, read back from their journals: every request in order,
admitted (with the outcome that closed it) or denied, and the step the session was in.

The step a session is in is rebuilt the way the ledger moves it: a call admitted to a
step moves the session there when its answer settles (a response or a stream), never on
an error. Tool calls made through MCP (journaled with an endpoint that is not a model
endpoint) are kept apart as `tool_call` requests.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.journal.recorded import OUTCOMES
from gateway.pipeline.policy import tool_call_names
from gateway.providers.base import Endpoint
from gateway.redis_client import AnyRedis
from gateway.state.entries import Kind, entry_body
from gateway.state.export import read_all

__all__ = ["Outcome", "Request", "SessionLog", "read_session", "read_sessions"]

MODEL_ENDPOINTS = frozenset(e.value for e in Endpoint if e is not Endpoint.TOOLS_CALL)
# How MCP tool calls are told apart: an endpoint naming MCP or tools/call, or an entry kind.
TOOL_CALL_KINDS = frozenset({"tool_call", "tool"})
SETTLED = frozenset({Kind.RESPONSE, Kind.STREAM})
# Sessions that copy or re-run other sessions' calls: a replay's, or a live evaluation's
# (see gateway/decision/rerun.py). Never read as a plan's own sessions.
EVALUATION_LABEL = "evaluation_of"
REPLAY_LABELS = ("replay_of", "live_replay_of", EVALUATION_LABEL)


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: str  # response | stream | error | aborted
    tok_in: int
    tok_out: int
    cost: int  # nanos, as charged
    tools_called: tuple[str, ...]  # tool names in the answer
    code: str | None = None  # errors only


@dataclass(slots=True)
class Request:
    """One request of a session, in journal order."""

    index: int
    request_id: str
    admitted: bool
    endpoint: str
    body: dict[str, Any]
    from_step: str  # the session's step when it came in ("" before the first)
    step: str = ""  # the step it was admitted to ("" without steps, or denied)
    model: str = ""
    outcome: Outcome | None = None
    code: str | None = None  # denied only: code, rule and message of the denial
    rule: str | None = None
    message: str | None = None

    @property
    def tool_call(self) -> bool:
        return self.endpoint.startswith("mcp") or self.endpoint == "tools/call"

    @property
    def tool_name(self) -> str | None:
        """For an MCP tool call: the tool it called (`params.name` of a tools/call)."""
        params = self.body.get("params")
        name = params.get("name") if isinstance(params, dict) else self.body.get("name")
        return name.strip().lower() if isinstance(name, str) else None


@dataclass(slots=True)
class SessionLog:
    session_id: str
    assembly_id: str
    budget_nanos: int | None
    budget_tokens: int | None
    budget_requests: int | None
    requests: list[Request] = field(default_factory=list)

    @property
    def spent_nanos(self) -> int:
        return sum(r.outcome.cost for r in self.requests if r.outcome is not None)

    @property
    def spent_tokens(self) -> int:
        return sum(r.outcome.tok_in + r.outcome.tok_out for r in self.requests if r.outcome is not None)

    @property
    def admitted(self) -> list[Request]:
        return [r for r in self.requests if r.admitted]

    @property
    def ran_out(self) -> list[Request]:
        return [r for r in self.requests if not r.admitted and r.code == "budget_exceeded"]


def _text(fields: Mapping[bytes, bytes], key: bytes) -> str:
    return fields.get(key, b"").decode(errors="replace")


def _int(fields: Mapping[bytes, bytes], key: bytes) -> int:
    raw = fields.get(key, b"")
    return int(raw) if raw.lstrip(b"-").isdigit() else 0


def _body(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    raw = entry_body(fields)
    try:
        body = orjson.loads(raw) if raw else {}
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


def answer_tools(fields: Mapping[bytes, bytes]) -> tuple[str, ...]:
    """Tool names the model called in a journaled answer (a body, or stream payloads)."""
    raw = entry_body(fields) or b""
    names: list[str] = []
    for payload in raw.split(b"\n") if fields.get(b"kind") == Kind.STREAM.encode() else [raw]:
        try:
            data = orjson.loads(payload)
        except orjson.JSONDecodeError:
            continue
        for choice in (data.get("choices") or []) if isinstance(data, dict) else []:
            if isinstance(choice, dict):
                names += tool_call_names(choice.get("message") or choice.get("delta") or {})
    return tuple(name.strip().lower() for name in names)


def _outcome(fields: Mapping[bytes, bytes]) -> Outcome:
    kind = _text(fields, b"kind")
    return Outcome(
        kind=kind,
        tok_in=_int(fields, b"tok_in"),
        tok_out=_int(fields, b"tok_out"),
        cost=_int(fields, b"cost_nanos") if b"cost_nanos" in fields else _int(fields, b"cost"),  # older journals: "cost"
        tools_called=answer_tools(fields) if kind in SETTLED else (),
        code=_text(fields, b"code") or None,
    )


def _endpoint_of(body: dict[str, Any]) -> str:
    """Denials do not journal their endpoint: the body's shape tells it."""
    if "messages" in body:
        return Endpoint.CHAT.value
    if "prompt" in body:
        return Endpoint.COMPLETIONS.value
    if "input" in body:
        return Endpoint.EMBEDDINGS.value
    return Endpoint.CHAT.value


def walk(log: SessionLog, entries: Iterable[tuple[bytes, Mapping[bytes, bytes]]]) -> SessionLog:
    """Fill `log.requests` from the session's journal entries, in order."""
    current = ""
    pending: dict[str, Request] = {}
    for _, fields in entries:
        kind, rid = _text(fields, b"kind"), _text(fields, b"rid")
        if kind == Kind.REQUEST or kind in TOOL_CALL_KINDS:
            endpoint = _text(fields, b"endpoint") or ("mcp" if kind in TOOL_CALL_KINDS else Endpoint.CHAT.value)
            request = Request(len(log.requests), rid, True, endpoint,
                              _body(fields), current, _text(fields, b"step"), _text(fields, b"model"))
            log.requests.append(request)
            pending[rid] = request
        elif kind == Kind.DENIAL:
            body = _body(fields)
            log.requests.append(Request(
                len(log.requests), rid, False, _text(fields, b"endpoint") or _endpoint_of(body), body, current,
                code=_text(fields, b"code") or None, rule=_text(fields, b"rule") or None,
                message=_text(fields, b"message") or None,
            ))
        elif kind in OUTCOMES and rid in pending:
            request = pending[rid]
            if kind != Kind.ABORTED or request.outcome is None:  # a late settle has the last word
                request.outcome = _outcome(fields)
            if kind in SETTLED and request.step:
                current = request.step
    return log


async def read_session(redis: AnyRedis, session_id: str, *, replays: bool = False) -> SessionLog | None:
    """The session's journal as requests; None when the session is gone (or, unless
    `replays`, is a replay of another: its calls are copies)."""
    raw = await redis.hgetall(keys.session(session_id))  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    if not raw:
        return None
    info = {k.decode(): v.decode() for k, v in raw.items()}
    labels = orjson.loads(info.get("labels", "{}"))
    if not replays and (info.get("replay_of") or any(label in labels for label in REPLAY_LABELS)):
        return None

    def budget(name: str) -> int | None:
        return int(info[name]) if name in info else None

    log = SessionLog(session_id, info.get("assembly_id", ""), budget("budget_nanos"), budget("budget_tokens"),
                     budget("budget_requests"))
    return walk(log, [item async for item in read_all(redis, session_id)])


async def read_sessions(redis: AnyRedis, session_ids: Iterable[str]) -> list[SessionLog]:
    logs = [await read_session(redis, session_id) for session_id in session_ids]
    return [log for log in logs if log is not None]
