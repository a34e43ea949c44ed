"""Every Redis key and stream name the gateway uses, in one place.

All of a session's keys share the hash tag `{sess:ID}` so one Lua script can touch
them together on Redis Cluster. Global indexes (assemblies, sessions, the journal
index, cost rollups, due reservations) live in their own slots and are only ever
written in the same pipeline as a script call, never inside one.
"""

from __future__ import annotations

import hashlib

# Bump the suffix of a script's name whenever its keys or arguments change meaning.
RESERVE_SCRIPT = "budget_reserve_v3"
SETTLE_SCRIPT = "budget_settle_v2"
JOURNAL_APPEND_SCRIPT = "journal_append_v1"
CLOSE_SCRIPT = "budget_close_v1"
LEASE_SCRIPT = "idem_lease_v1"
REPLAY_TAKE_SCRIPT = "replay_take_v1"


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


def assembly(assembly_id: str) -> str:
    """String: the Assembly's canonical JSON, written once (SET NX)."""
    return "assembly:" + assembly_id


ASSEMBLIES = "assemblies"  # sorted set: assembly id by first-compiled time
SESSIONS = "sessions"  # sorted set: session id by creation time
JOURNAL_INDEX = "journal_index"  # stream: one small entry per journal entry, all sessions
# Sorted set: "session|request" by deadline: the owner's lease, renewed while it works,
# and never past the reservation's TTL.
RESERVATIONS_DUE = "reservations_due"


def cost_rollup(bucket: str) -> str:
    """Hash of spend (nanos) per dimension for one hour bucket YYYYMMDDHH."""
    return "costs:" + bucket


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
