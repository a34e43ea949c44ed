"""Every Redis key and stream name the gateway uses, in one place.

All of a session's keys share the hash tag `{sess:ID}`, and all of a tenant's the tag
`{ten:NAME}`, so each Lua script touches one hash slot only, as Redis Cluster requires.
The global indexes every request writes (journal index, cost rollups, due reservations)
are split into `shards` keys tagged `{idx:K}`, a session always writing to shard
`shard_of(session)`; the rarely written ones (assemblies, sessions, hour buckets) are
single keys. Indexes are written in the same pipeline as a script call, never inside one.
"""

from __future__ import annotations

import hashlib
import zlib

# Bump the suffix of a script's name whenever its keys or arguments change meaning.
RESERVE_SCRIPT = "budget_reserve_v3"
SETTLE_SCRIPT = "budget_settle_v2"
JOURNAL_APPEND_SCRIPT = "journal_append_v1"
CLOSE_SCRIPT = "budget_close_v1"
LEASE_SCRIPT = "idem_lease_v1"
REPLAY_TAKE_SCRIPT = "replay_take_v1"
TENANT_RESERVE_SCRIPT = "tenant_reserve_v1"
TENANT_SETTLE_SCRIPT = "tenant_settle_v1"

DEFAULT_SHARDS = 16


def _sess(session_id: str) -> str:
    return "{sess:" + session_id + "}"


def session(session_id: str) -> str:
    """Hash: assembly id, tenant, budget, spend, reserved, step, revoked, expiry."""
    return "session:" + _sess(session_id)


def journal(session_id: str) -> str:
    """Stream: the session's hash-chained journal."""
    return "journal:" + _sess(session_id)


def journal_head(session_id: str) -> str:
    """Hash: seq and hash of the journal's newest entry (the chain head)."""
    return "journal_head:" + _sess(session_id)


def reservations(session_id: str) -> str:
    """Hash: request id -> outstanding reservation "nanos:tokens:reserved_ms[@day]:step";
    an "R" or "Z" in front marks one closed for its owner (see budget_close_v1)."""
    return "reservations:" + _sess(session_id)


def idempotency(session_id: str, key_digest: str) -> str:
    """Hash: state (pending|done), the request hash and id, the owner and lease of a pending
    one, and the recorded response of a done one, for one Idempotency-Key."""
    return "idem:" + _sess(session_id) + ":" + key_digest


def capped_calls(session_id: str) -> str:
    """Hash: calls admitted per capped entry (an MCP entry's max_calls), "mcp:<index>" -> count."""
    return "capped_calls:" + _sess(session_id)


def plugin_counters(session_id: str) -> str:
    """Hash: "<plugin>.<counter>" -> a policy plugin's per-session count (e.g. tool calls)."""
    return "plugin_counters:" + _sess(session_id)


def replay_calls(session_id: str) -> str:
    """List: a recorded replay's calls, "request_hash|request entry id|outcome entry id"."""
    return "replay_calls:" + _sess(session_id)


def replay_cursor(session_id: str) -> str:
    """Counter: index of the next recorded call a replay session must match."""
    return "replay_cursor:" + _sess(session_id)


def responses(session_id: str) -> str:
    """Hash: Responses API response id -> journal entry id of the answer (stored ones only)."""
    return "responses:" + _sess(session_id)


def session_rate(session_id: str, unit: str, minute: int) -> str:
    """Counter for one minute window; unit is "req" or "tok"."""
    return "rate:" + _sess(session_id) + f":{unit}:{minute}"


def _ten(tenant: str) -> str:
    return "{ten:" + tenant + "}"


def tenant_spend(tenant: str, day: str) -> str:
    """Counter: a tenant's spend (nanos) on one UTC day, YYYYMMDD."""
    return "tenant_spend:" + _ten(tenant) + ":" + day


def tenant_rate(tenant: str, unit: str, minute: int) -> str:
    return "tenant_rate:" + _ten(tenant) + f":{unit}:{minute}"


def tenant_holds(tenant: str) -> str:
    """Hash: tenant_hold(...) -> the tenant's part of an open reservation (Redis Cluster only;
    see tenant_reserve_v1)."""
    return "tenant_holds:" + _ten(tenant)


def tenant_hold(session_id: str, request_id: str, reserved_ms: int) -> str:
    """A hold's field in `tenant_holds`: one attempt of one request (a request id may be
    used again once its first reservation was closed)."""
    return f"{session_id}|{request_id}|{reserved_ms}"


def assembly(assembly_id: str) -> str:
    """String: the Assembly's canonical JSON, written once (SET NX)."""
    return "assembly:" + assembly_id


ASSEMBLIES = "assemblies"  # sorted set: assembly id by first-compiled time
SESSIONS = "sessions"  # sorted set: session id by creation time


def shard_of(session_id: str, shards: int) -> int:
    """The index shard a session writes to: stable across processes and restarts."""
    return zlib.crc32(session_id.encode()) % shards


def _idx(shard: int) -> str:
    return "{idx:" + str(shard) + "}"


def journal_index(shard: int) -> str:
    """Stream: one small entry per settled request, for the sessions of one shard."""
    return "journal_index:" + _idx(shard)


def reservations_due(shard: int) -> str:
    """Sorted set by deadline: "session|request" (a session reservation: its owner's lease,
    renewed while it works, never past the reservation's TTL) and TENANT_DUE-prefixed
    "tenant<US>session|request|reserved_ms" (a tenant hold, due at the reservation's TTL)."""
    return "reservations_due:" + _idx(shard)


TENANT_DUE = "t" + "\x1f"  # prefix of a tenant hold's member in reservations_due


def tenant_due(tenant: str, session_id: str, request_id: str, reserved_ms: int) -> str:
    return TENANT_DUE + tenant + "\x1f" + tenant_hold(session_id, request_id, reserved_ms)


def parse_tenant_due(member: str) -> tuple[str, str, str, int]:
    """(tenant, session id, request id, reserve time ms) of a tenant_due member."""
    tenant, _, hold = member[len(TENANT_DUE):].partition("\x1f")
    session_id, _, rest = hold.partition("|")
    request_id, _, reserved_ms = rest.rpartition("|")
    return tenant, session_id, request_id, int(reserved_ms)


def cost_rollup(bucket: str, shard: int) -> str:
    """Hash of spend (nanos) per dimension for one hour bucket YYYYMMDDHH and one shard."""
    return "costs:" + _idx(shard) + ":" + bucket


COST_DIMENSIONS = ("tenant", "session", "model", "assembly")  # order of a rollup field's parts


COST_FIELD_SEPARATOR = "\x1f"  # the ASCII unit separator: never part of a name


def cost_field(tenant: str, session_id: str, model: str, assembly_id: str) -> str:
    """A rollup hash field: the four dimensions, in COST_DIMENSIONS order."""
    return COST_FIELD_SEPARATOR.join((tenant, session_id, model, assembly_id))


COST_BUCKETS = "cost_buckets"  # sorted set of hour buckets that have rollups


# The decision plane: one plan's keys share the hash tag `{plan:NAME}`, so a version is
# recorded by one script in one slot. A name holding a brace would end the tag early, so
# such names are tagged by their digest instead.
PLAN_VERSION_SCRIPT = "plan_version_v1"


def _plan(name: str) -> str:
    if "{" in name or "}" in name:
        return "{plan:#" + hashlib.sha256(name.encode()).hexdigest()[:32] + "}"
    return "{plan:" + name + "}"


def plan_versions(name: str) -> str:
    """List: the plan's versions in order, each a JSON record (assembly id, parent, by, at)."""
    return "plan_versions:" + _plan(name)


def plan_sources(name: str) -> str:
    """Hash: assembly id -> the plan (JSON) that compiled to it, as the compiler read it."""
    return "plan_sources:" + _plan(name)


def plan_sessions(name: str) -> str:
    """Sorted set: ids of sessions opened on any of the plan's Assemblies, by open time."""
    return "plan_sessions:" + _plan(name)


def plan_session_counts(name: str) -> str:
    """Hash: assembly id -> sessions opened on it (counted when each opens)."""
    return "plan_session_counts:" + _plan(name)


def plan_reports(name: str) -> str:
    """Hash: "suggestions" and "evaluation" -> the latest report of each (JSON), for people."""
    return "plan_reports:" + _plan(name)
def denial_rollup(bucket: str) -> str:
    """Hash of denials counted per reason for one hour bucket YYYYMMDDHH (the dashboard's)."""
    return "denials:" + bucket
