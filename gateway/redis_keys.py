"""Every Redis key and stream name the gateway uses, in one place.

All of a session's keys share the hash tag `{sess:ID}`, and all of a tenant's the tag
`{ten:NAME}`, so each Lua script touches one hash slot only, as Redis Cluster requires.
The global indexes every request writes (journal index, cost rollups, due reservations)
are split into `shards` keys tagged `{idx:K}`, a session always writing to shard
`shard_of(session)`; the rarely written ones (assemblies, sessions, hour buckets) are
single keys. Indexes are written in the same pipeline as a script call, never inside one.
"""

from __future__ import annotations

import zlib

# Bump the suffix of a script's name whenever its keys or arguments change meaning.
RESERVE_SCRIPT = "budget_reserve_v2"
SETTLE_SCRIPT = "budget_settle_v1"
JOURNAL_APPEND_SCRIPT = "journal_append_v1"
REAP_SCRIPT = "budget_reap_v1"
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
    """Hash: request id -> outstanding reservation (nanos, tokens, deadline)."""
    return "reservations:" + _sess(session_id)


def idempotency(session_id: str, key_digest: str) -> str:
    """Hash: state (pending|done) and the recorded response of one Idempotency-Key."""
    return "idem:" + _sess(session_id) + ":" + key_digest


def replay_calls(session_id: str) -> str:
    """List: a recorded replay's calls, "request_hash|request entry id|outcome entry id"."""
    return "replay_calls:" + _sess(session_id)


def replay_cursor(session_id: str) -> str:
    """Counter: index of the next recorded call a replay session must match."""
    return "replay_cursor:" + _sess(session_id)


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
    """Hash: "session|request" -> the tenant's part of an open reservation ("nanos:tokens:day")."""
    return "tenant_holds:" + _ten(tenant)


def tenant_hold(session_id: str, request_id: str) -> str:
    """A hold's field in `tenant_holds`."""
    return session_id + "|" + request_id


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
    """Sorted set by reaper deadline: "session|request" (a session reservation) and
    TENANT_DUE-prefixed "tenant<US>session|request" (a tenant hold)."""
    return "reservations_due:" + _idx(shard)


TENANT_DUE = "t" + "\x1f"  # prefix of a tenant hold's member in reservations_due


def tenant_due(tenant: str, session_id: str, request_id: str) -> str:
    return TENANT_DUE + tenant + "\x1f" + tenant_hold(session_id, request_id)


def cost_rollup(bucket: str, shard: int) -> str:
    """Hash of spend (nanos) per dimension for one hour bucket YYYYMMDDHH and one shard."""
    return "costs:" + _idx(shard) + ":" + bucket


COST_DIMENSIONS = ("tenant", "session", "model", "assembly")  # order of a rollup field's parts


COST_FIELD_SEPARATOR = "\x1f"  # the ASCII unit separator: never part of a name


def cost_field(tenant: str, session_id: str, model: str, assembly_id: str) -> str:
    """A rollup hash field: the four dimensions, in COST_DIMENSIONS order."""
    return COST_FIELD_SEPARATOR.join((tenant, session_id, model, assembly_id))


COST_BUCKETS = "cost_buckets"  # sorted set of hour buckets that have rollups
