"""Replaying a session's journal: verify its chain, and recorded replays.

A recorded replay is a new session on the same Assembly whose token carries `replay_of`.
Its calls still pass the PEP, the budget and its own journal, but the provider is a
`ReplayProvider` that answers from the source journal: the next recorded call, taken only
if its canonical request hash matches (else 409 `replay_divergence`, with the index and a
diff). Bodies come back byte for byte and streams with the same payload per `data:` event.
Live replays re-execute the calls instead: see gateway.journal.live.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import redis_keys as keys
from gateway.deps import Deps
from gateway.errors import (
    BudgetExceeded,
    CapabilityDenied,
    GatewayError,
    InvalidRequest,
    NotFound,
    RateLimited,
    ServiceUnavailable,
    StateConflict,
    Unauthenticated,
    UpstreamError,
    UpstreamTimeout,
)
from gateway.providers.base import Endpoint, Reply
from gateway.redis_client import AnyRedis
from gateway.state.entries import ChainReport, Kind, entry_body, verify_chain
from gateway.state.export import read_all
from gateway.state.ledger import REDIS_ERRORS, Ledger

OUTCOMES = frozenset({Kind.RESPONSE, Kind.STREAM, Kind.ERROR, Kind.ABORTED})
MAX_DIFFS = 20


async def verify_session(redis: AnyRedis, session_id: str) -> ChainReport:
    """Check the whole chain, from where an export trimmed it, up to the head."""
    head = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.journal_head(session_id))).items()}  # type: ignore[misc]  # redis-py types results Awaitable[T] | T
    prev, first_seq = head.get("trimmed_hash", ""), int(head.get("trimmed_seq", 0)) + 1
    entries = [item async for item in read_all(redis, session_id)]
    report = verify_chain(entries, prev=prev, first_seq=first_seq)
    if not report.ok:
        return report
    # The head was read first: entries appended since then are newer than it, never fewer.
    head_seq, last_seq = int(head.get("seq", 0)), first_seq - 1 + len(entries)
    at_head = prev
    if first_seq <= head_seq <= last_seq:
        at_head = entries[head_seq - first_seq][1].get(b"hash", b"").decode()
    if last_seq < head_seq or at_head != head.get("hash", ""):
        # Entries at the end were deleted: every entry left verifies, but the head remembers more.
        why = f"the journal ends at seq {last_seq} but its head is at seq {head_seq}"
        return ChainReport(False, len(entries), last_seq + 1, None, why)
    return report


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """One admitted call of a journal: its request entry and the entry that closed it."""

    index: int
    request_id: str
    request_hash: str
    request_entry: str
    request: Mapping[bytes, bytes]
    outcome_entry: str  # "" when nothing closed it (still in flight)
    outcome: Mapping[bytes, bytes] | None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(self.request.get(b"endpoint", b"chat/completions").decode())

    @property
    def body(self) -> dict[str, Any]:
        raw = entry_body(self.request)
        body: dict[str, Any] = orjson.loads(raw) if raw else {}
        return body

    def listed(self) -> str:
        return f"{self.request_hash}|{self.request_entry}|{self.outcome_entry}"


async def recorded_calls(redis: AnyRedis, session_id: str) -> list[RecordedCall]:
    return group_calls([item async for item in read_all(redis, session_id)])


def group_calls(entries: Iterable[tuple[bytes, dict[bytes, bytes]]]) -> list[RecordedCall]:
    """The admitted calls of a journal, in order, each with the entry that closed it."""
    requests: list[tuple[bytes, dict[bytes, bytes]]] = []
    outcomes: dict[bytes, tuple[bytes, dict[bytes, bytes]]] = {}
    for entry_id, fields in entries:
        kind = fields.get(b"kind", b"").decode()
        rid = fields.get(b"rid", b"")
        if kind == Kind.REQUEST:
            requests.append((entry_id, fields))
        elif kind in OUTCOMES and (kind != Kind.ABORTED or rid not in outcomes):
            # A replica that settles after the reaper gave up has the last word.
            outcomes[rid] = (entry_id, fields)
    calls = []
    for index, (entry_id, fields) in enumerate(requests):
        outcome_id, outcome = outcomes.get(fields.get(b"rid", b""), (b"", None))
        calls.append(RecordedCall(
            index, fields.get(b"rid", b"").decode(), fields.get(b"req_hash", b"").decode(), entry_id.decode(),
            fields, outcome_id.decode(), outcome,
        ))
    return calls


async def open_recorded(deps: Deps, source: str) -> dict[str, Any]:
    """A new session on the source's Assembly (same tenant and budget) answered from its journal."""
    shown = await deps.sessions.get(source)
    assembly = await deps.assemblies.get(shown.assembly_id)
    calls = await recorded_calls(deps.redis, source)
    opened = await deps.sessions.open(
        assembly, tenant=shown.tenant, budget_nanos=shown.budget_nanos, ttl_s=None, labels={"replay_of": source}, replay_of=source,
    )
    await bind_recording(deps.redis, opened.session_id, calls, opened.expires_at + deps.sessions.retention_s)
    return {
        "mode": "recorded", "replay_of": source, "session_id": opened.session_id, "token": opened.token,
        "expires_at": opened.expires_at, "assembly_id": assembly.id, "calls": len(calls),
    }


async def bind_recording(redis: AnyRedis, replay_session: str, calls: list[RecordedCall], keep_until: int) -> None:
    """Give a new replay session its recording (in its own slot) and a cursor at 0."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.replay_calls(replay_session))
        if calls:
            pipe.rpush(keys.replay_calls(replay_session), *[c.listed() for c in calls])
            pipe.expireat(keys.replay_calls(replay_session), keep_until)
        pipe.set(keys.replay_cursor(replay_session), 0, exat=keep_until)
        await pipe.execute()


async def recorded_provider(
    redis: AnyRedis, ledger: Ledger, *, session_id: str, source: str, request_hash: str, body: dict[str, Any]
) -> ReplayProvider:
    """The provider for a replay session's next call, or 409 when the call is not the recorded one."""
    status, index, listed = await ledger.take_recorded(session_id, request_hash)
    if status == "end":
        raise StateConflict(
            f"replay diverged at call {index}: the recording has only {index} calls",
            code="replay_divergence", extra={"index": index, "diff": [{"path": "", "recorded": None, "received": body}]},
        )
    _, request_entry, outcome_entry = listed.split("|")
    if status == "diverged":
        recorded = await _entry(redis, source, request_entry)
        raw = entry_body(recorded) if recorded else None
        recorded_body = orjson.loads(raw) if raw else None
        raise StateConflict(
            f"replay diverged at call {index}: the request differs from the recorded one",
            code="replay_divergence",
            extra={
                "index": index,
                "recorded_request_id": (recorded or {}).get(b"rid", b"").decode(),
                "diff": json_diff(recorded_body, body),
            },
        )
    outcome = await _entry(redis, source, outcome_entry) if outcome_entry else None
    return ReplayProvider(outcome)


async def _entry(redis: AnyRedis, session_id: str, entry_id: str) -> dict[bytes, bytes] | None:
    try:
        found = await redis.xrange(keys.journal(session_id), min=entry_id, max=entry_id)
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("journal unavailable") from exc
    return dict(found[0][1]) if found else None


class ReplayProvider:
    """Answers one call from its recorded outcome: the body, the stream payloads, or the error."""

    name = "replay"
    # A dialect call's recording is the answer as its client got it: replayed as it is.
    native_endpoints = frozenset({Endpoint.RESPONSES, Endpoint.MESSAGES})

    def __init__(self, outcome: Mapping[bytes, bytes] | None) -> None:
        self._outcome = outcome
        self._kind = outcome.get(b"kind", b"").decode() if outcome else ""
        # The fallback and the deployment that answered the original, so the replay is charged
        # the same frozen price and journals the same deployment.
        self.served_by = outcome.get(b"served_by", b"").decode() if outcome else ""
        self.deployment = outcome.get(b"deployment", b"").decode() if outcome else ""

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        if self._kind != Kind.RESPONSE:
            raise self._error()
        assert self._outcome is not None
        raw = entry_body(self._outcome) or b""
        return Reply(body=raw, data=orjson.loads(raw))

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        if self._kind not in (Kind.STREAM, Kind.ERROR):
            raise self._error()
        assert self._outcome is not None
        raw = entry_body(self._outcome)
        # Payloads were journaled joined by LF; JSON payloads as relayed hold no raw LF.
        payloads = raw.split(b"\n") if raw else []
        for payload in payloads:
            yield payload
        if self._kind == Kind.ERROR:
            raise self._error()
        usage = self._usage_chunk(payloads)
        if usage is not None:
            yield usage

    def _usage_chunk(self, payloads: list[bytes]) -> bytes | None:
        """The upstream's usage chunk, which the client did not ask for and was not journaled,
        rebuilt from the recorded counts so the replay is charged what the original was."""
        assert self._outcome is not None
        if self._outcome.get(b"usage_from") != b"upstream" or any(b'"usage"' in p for p in payloads):
            return None
        prompt, completion = int(self._outcome.get(b"tok_in", 0)), int(self._outcome.get(b"tok_out", 0))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return orjson.dumps({"choices": [], "usage": usage})

    def _error(self) -> GatewayError:
        if self._outcome is None or self._kind != Kind.ERROR:
            return UpstreamError("the recorded call has no answer: it never finished", code="replay_no_answer")
        return recorded_error(self._outcome)

    async def close(self) -> None:
        return None


_BY_STATUS: dict[int, type[GatewayError]] = {
    400: InvalidRequest, 401: Unauthenticated, 403: CapabilityDenied, 404: NotFound, 409: StateConflict,
    429: RateLimited, 502: UpstreamError, 503: ServiceUnavailable, 504: UpstreamTimeout,
}


def recorded_error(fields: Mapping[bytes, bytes]) -> GatewayError:
    """The error a journaled `error` entry answered with: same status, type, code and message."""
    status = int(fields.get(b"status", b"502"))
    code = fields.get(b"code", b"").decode() or None
    cls = BudgetExceeded if code == "budget_exceeded" else _BY_STATUS.get(status)
    if cls is None:
        cls = InvalidRequest if 400 <= status < 500 else GatewayError
    return cls(fields.get(b"message", b"").decode() or "recorded error", code=code, status=status)


def json_diff(recorded: Any, received: Any, path: str = "") -> list[dict[str, Any]]:
    """Where two JSON values differ: up to MAX_DIFFS {path, recorded, received}, depth first."""
    out: list[dict[str, Any]] = []
    _diff(recorded, received, path, out)
    return out


def _diff(a: Any, b: Any, path: str, out: list[dict[str, Any]]) -> None:
    if len(out) >= MAX_DIFFS:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            _diff(a.get(key, _MISSING), b.get(key, _MISSING), f"{path}.{key}" if path else key, out)
        return
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            _diff(a[i] if i < len(a) else _MISSING, b[i] if i < len(b) else _MISSING, f"{path}[{i}]", out)
        return
    # Scalars; the type too, since the request hash tells 1, 1.0 and true apart.
    if type(a) is type(b) and a == b:
        return
    out.append({"path": path, "recorded": _shown(a), "received": _shown(b)})


class _Missing:
    pass


_MISSING = _Missing()


def _shown(value: Any) -> Any:
    if value is _MISSING:
        return "<absent>"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "..."
    return value
