"""Cost reports from the hourly rollups that every settlement writes (`costs:{idx:K}:<YYYYMMDDHH>`,
one per index shard K: a report reads every shard of every hour).

Spend is grouped by tenant, session, model or Assembly over whole UTC hours: an hour is in
a report when it overlaps [since, until). Money stays integer nano-dollars. A series
(`cost_series`, for the dashboard) keeps the same sums apart by hour.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway import redis_keys as keys
from gateway.errors import InvalidRequest, ServiceUnavailable
from gateway.money import nanos_to_usd_str
from gateway.redis_client import AnyRedis
from gateway.state.ledger import REDIS_ERRORS

TOOL_PREFIX = "mcp:"  # MCP tool calls are rolled up under model "mcp:<server>__<tool>"
# Groups read from a dimension: MCP tool spend by tool ("<server>__<tool>") and by server.
_DERIVED: dict[str, tuple[str, Callable[[str], str | None]]] = {
    "tool": ("model", lambda m: m.removeprefix(TOOL_PREFIX) if m.startswith(TOOL_PREFIX) else None),
    "tool_server": ("model", lambda m: m.removeprefix(TOOL_PREFIX).split("__", 1)[0] if m.startswith(TOOL_PREFIX) else None),
}
GROUPS = (*keys.COST_DIMENSIONS, *_DERIVED)
DEFAULT_SPAN = timedelta(hours=24)
MAX_SERIES_HOURS = 24 * 31  # a series is dense, one number per hour and key: keep it bounded
_EPOCH = re.compile(r"^\d{1,12}(\.\d+)?$")


@dataclass(frozen=True, slots=True)
class CostRow:
    key: str
    nanos: int


@dataclass(frozen=True, slots=True)
class CostReport:
    group_by: str
    since: datetime
    until: datetime
    rows: tuple[CostRow, ...]

    @property
    def total_nanos(self) -> int:
        return sum(r.nanos for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_by": self.group_by,
            "since": _iso(self.since),
            "until": _iso(self.until),
            "rows": [
                {"key": r.key, "cost_usd": nanos_to_usd_str(r.nanos), "cost_nanos": r.nanos}
                for r in self.rows
            ],
            "total_usd": nanos_to_usd_str(self.total_nanos),
            "total_nanos": self.total_nanos,
        }


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def parse_instant(value: str, *, param: str) -> datetime:
    """An ISO date or datetime (naive means UTC) or epoch seconds, as an aware UTC datetime."""
    text = value.strip()
    try:
        if _EPOCH.match(text):
            return datetime.fromtimestamp(float(text), UTC)
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        raise InvalidRequest(
            f"{param}: expected an ISO date or datetime, or epoch seconds", param=param
        ) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def resolve_window(
    since: str | None, until: str | None, *, now: datetime | None = None
) -> tuple[datetime, datetime]:
    """The [since, until) window; by default the last 24 hours."""
    end = parse_instant(until, param="until") if until else (now or datetime.now(UTC))
    start = parse_instant(since, param="since") if since else end - DEFAULT_SPAN
    if start >= end:
        raise InvalidRequest("since must be before until", param="since")
    return start, end


def _bucket(moment: datetime) -> int:
    return int(moment.astimezone(UTC).strftime("%Y%m%d%H"))


def _hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def _last_bucket(until: datetime) -> int:
    """The last hour that starts before `until` (the window's end is exclusive)."""
    return _bucket(until - timedelta(microseconds=1))


@dataclass(frozen=True, slots=True)
class CostSeries:
    """Spend per key for every hour that overlaps [since, until), zeros included."""

    group_by: str
    since: datetime
    until: datetime
    hours: tuple[datetime, ...]
    series: tuple[tuple[str, tuple[int, ...]], ...]  # (key, nanos per hour), biggest first

    @property
    def total_nanos(self) -> int:
        return sum(sum(nanos) for _, nanos in self.series)

    def to_dict(self) -> dict[str, Any]:
        return {
            "group_by": self.group_by,
            "since": _iso(self.since),
            "until": _iso(self.until),
            "buckets": [_iso(hour) for hour in self.hours],
            "series": [
                {
                    "key": key,
                    "nanos": list(nanos),
                    "usd": [nanos_to_usd_str(n) for n in nanos],
                    "total_nanos": sum(nanos),
                    "total_usd": nanos_to_usd_str(sum(nanos)),
                }
                for key, nanos in self.series
            ],
            "total_nanos": self.total_nanos,
            "total_usd": nanos_to_usd_str(self.total_nanos),
        }


_Part = tuple[int, Callable[[str], str | None]]


def _dimension(group_by: str) -> _Part:
    """Which part of a rollup field to group by, and how its value becomes the key (None: skip)."""
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by must be one of: {', '.join(GROUPS)}", param="group_by")
    dimension, key = _DERIVED.get(group_by, (group_by, lambda value: value))
    return keys.COST_DIMENSIONS.index(dimension), key


async def _rollups(
    redis: AnyRedis, since: datetime, until: datetime, shards: int
) -> list[tuple[int, dict[bytes, bytes]]]:
    """(bucket YYYYMMDDHH, rollup hash) for every hour that overlaps [since, until) and every shard."""
    try:
        found = await redis.zrangebyscore(keys.COST_BUCKETS, _bucket(since), _last_bucket(until))
        wanted = [(int(b), shard) for b in found for shard in range(shards)]
        async with redis.pipeline(transaction=False) as pipe:
            for bucket, shard in wanted:
                pipe.hgetall(keys.cost_rollup(str(bucket), shard))
            rollups = await pipe.execute() if wanted else []
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("cost store unavailable") from exc
    return [(bucket, rollup) for (bucket, _), rollup in zip(wanted, rollups, strict=True)]


def _spend(rollup: dict[bytes, bytes], part: _Part) -> Iterator[tuple[str, int]]:
    """(key, nanos) of each rollup field, the key being read from dimension `part` of the field."""
    index, key_of = part
    for field, value in rollup.items():
        parts = field.decode().split(keys.COST_FIELD_SEPARATOR)
        if len(parts) == len(keys.COST_DIMENSIONS) and (key := key_of(parts[index])) is not None:
            yield key, int(value)


async def cost_report(
    redis: AnyRedis, group_by: str, since: datetime, until: datetime, *, shards: int = keys.DEFAULT_SHARDS
) -> CostReport:
    part = _dimension(group_by)
    totals: dict[str, int] = {}
    for _, rollup in await _rollups(redis, since, until, shards):
        for key, nanos in _spend(rollup, part):
            totals[key] = totals.get(key, 0) + nanos
    rows = sorted((CostRow(k, v) for k, v in totals.items() if v), key=lambda r: (-r.nanos, r.key))
    return CostReport(group_by, since, until, tuple(rows))


async def cost_series(
    redis: AnyRedis, group_by: str, since: datetime, until: datetime, *, shards: int = keys.DEFAULT_SHARDS
) -> CostSeries:
    """The same rollups as `cost_report`, kept apart by hour: its per-key sums are the report."""
    part = _dimension(group_by)
    first, last = _hour(since), _hour(until - timedelta(microseconds=1))
    count = (last - first) // timedelta(hours=1) + 1
    if count > MAX_SERIES_HOURS:
        raise InvalidRequest(f"a series spans at most {MAX_SERIES_HOURS} hours", param="since")
    hours = tuple(first + timedelta(hours=i) for i in range(count))
    slot = {_bucket(hour): i for i, hour in enumerate(hours)}
    per_key: dict[str, list[int]] = {}
    for bucket, rollup in await _rollups(redis, since, until, shards):
        for key, nanos in _spend(rollup, part):
            per_key.setdefault(key, [0] * count)[slot[bucket]] += nanos
    series = sorted(
        ((k, tuple(v)) for k, v in per_key.items() if any(v)), key=lambda s: (-sum(s[1]), s[0])
    )
    return CostSeries(group_by, since, until, hours, tuple(series))


async def denial_series(redis: AnyRedis, since: datetime, until: datetime) -> dict[str, Any]:
    """Denials per reason for every hour that overlaps [since, until), from their hourly tallies."""
    first, last = _hour(since), _hour(until - timedelta(microseconds=1))
    count = (last - first) // timedelta(hours=1) + 1
    if count > MAX_SERIES_HOURS:
        raise InvalidRequest(f"a series spans at most {MAX_SERIES_HOURS} hours", param="since")
    hours = [first + timedelta(hours=i) for i in range(count)]
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for hour in hours:
                pipe.hgetall(keys.denial_rollup(str(_bucket(hour))))
            tallies: list[dict[bytes, bytes]] = await pipe.execute()
    except REDIS_ERRORS as exc:
        raise ServiceUnavailable("denial store unavailable") from exc
    per_reason: dict[str, list[int]] = {}
    for i, tally in enumerate(tallies):
        for reason, counted in tally.items():
            per_reason.setdefault(reason.decode(), [0] * count)[i] += int(counted)
    series = sorted(per_reason.items(), key=lambda s: (-sum(s[1]), s[0]))
    return {
        "buckets": [_iso(hour) for hour in hours],
        "series": [{"key": reason, "counts": counts, "total": sum(counts)} for reason, counts in series],
        "total": sum(sum(counts) for _, counts in series),
    }


TOOL_SEPARATOR = "__"  # MCP tools are named <server>__<tool>


async def tool_spend(
    redis: AnyRedis, since: datetime, until: datetime, *, shards: int = keys.DEFAULT_SHARDS
) -> list[dict[str, Any]] | None:
    """Spend per MCP server and tool, or None while cost rollups have no "tool" dimension."""
    if "tool" not in GROUPS:
        return None
    report = await cost_report(redis, "tool", since, until, shards=shards)
    rows = []
    for row in report.rows:
        if not row.key:
            continue  # a model call: no tool
        server, _, tool = row.key.partition(TOOL_SEPARATOR)
        rows.append({"server": server, "tool": tool or server, "cost_nanos": row.nanos, "cost_usd": nanos_to_usd_str(row.nanos)})
    return rows
