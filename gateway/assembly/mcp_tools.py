"""MCP tools at compile time: freeze the definitions a server gave, hash them, screen them.

No I/O here: `gateway.mcp.upstream.discover` asks the servers first and hands over what
they listed (or why they couldn't be asked); this module turns the plan's `mcp:` entries
into frozen `McpTool`s, and lists what looks like tool poisoning as warnings.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway.assembly.model import McpTool
from gateway.assembly.plan import Plan, Problem
from gateway.money import usd_to_nanos

__all__ = ["SEPARATOR", "Listing", "definition_hash", "frozen_definition", "grant_mcp_tools", "qualified", "screen"]

SEPARATOR = "__"  # "<server>__<tool>": what clients see; servers' names never contain it
_DEFINITION_KEYS = ("name", "description", "inputSchema", "outputSchema", "annotations")


@dataclass(frozen=True)
class Listing:
    """What one server answered to tools/list at compile time: its tools by name, or an error."""

    tools: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    error: str | None = None


def qualified(server: str, tool: str) -> str:
    return f"{server}{SEPARATOR}{tool}"


def frozen_definition(tool: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a tools/list entry that are frozen and hashed, as plain JSON."""
    out = {key: _plain(tool.get(key)) for key in _DEFINITION_KEYS}
    out["description"] = out["description"] or ""
    out["inputSchema"] = out["inputSchema"] or {"type": "object"}
    return out


def definition_hash(tool: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical frozen definition: equal iff the server still defines it so."""
    return hashlib.sha256(orjson.dumps(frozen_definition(tool), option=orjson.OPT_SORT_KEYS)).hexdigest()


def _plain(value: Any) -> Any:
    """JSON with integral floats as ints, so 1 and 1.0 hash the same (as plans' params do)."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def grant_mcp_tools(
    plan: Plan, listings: Mapping[str, Listing], servers: set[str], problems: list[Problem], warnings: list[str]
) -> dict[str, McpTool]:
    """Freeze every tool the plan's `mcp:` entries name; every missing thing is a problem with its path."""
    grants: dict[str, McpTool] = {}
    for i, entry in enumerate(plan.mcp):
        path = f"mcp.{i}"
        if entry.server not in servers:
            problems.append(Problem(f"{path}.server", f"unknown tool server {entry.server!r}: not in the gateway settings"))
            continue
        listing = listings.get(entry.server) or Listing(error="not asked")
        if listing.error is not None:
            problems.append(Problem(f"{path}.server", f"tool server {entry.server!r} could not be listed: {listing.error}"))
            continue
        for j, name in enumerate(entry.tools):
            tool = listing.tools.get(name)
            full = qualified(entry.server, name)
            if tool is None:
                problems.append(Problem(f"{path}.tools.{j}", f"tool server {entry.server!r} has no tool {name!r}"))
            elif full in grants:
                problems.append(Problem(f"{path}.tools.{j}", f"MCP tool {full!r} is granted twice"))
            elif (bad := _schema_problems(frozen_definition(tool))) is not None:
                problems.append(Problem(f"{path}.tools.{j}", f"MCP tool {full!r}: {bad}"))
            else:
                definition = frozen_definition(tool)
                for found in screen(definition):
                    warnings.append(f"{path}.tools.{j}: MCP tool {full!r}: {found}")
                grants[full] = McpTool(
                    server=entry.server, name=name, description=definition["description"],
                    input_schema=definition["inputSchema"], output_schema=definition["outputSchema"],
                    annotations=definition["annotations"], definition_hash=definition_hash(tool),
                    price_nanos=usd_to_nanos(entry.price_per_call_usd), entry=i, max_calls=entry.max_calls,
                )
    return grants


def _schema_problems(definition: Mapping[str, Any]) -> str | None:
    """Arguments are checked against the input schema on every call: it must be one."""
    # On first use: only plans with MCP tools need jsonschema.
    from jsonschema import SchemaError  # type: ignore[import-untyped]
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]

    for key in ("inputSchema", "outputSchema"):
        schema = definition.get(key)
        if schema is None:
            continue
        if not isinstance(schema, dict) or schema.get("type") != "object":
            return f"its {key} must be a JSON Schema of type object"
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            return f"its {key} is not a valid JSON Schema: {exc.message[:200]}"
    return None


# Known tool-poisoning patterns (Invariant Labs' MCP advisories, OWASP MCP Top 10: MCP03).
# They warn; the person compiling decides.
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hidden instruction block", re.compile(r"<\s*/?\s*(important|system|instructions?|secret|hidden|note|admin)\b[^>]*>", re.I)),
    ("instruction to override or hide", re.compile(
        r"\b(ignore|disregard|forget)\s+(all\s+)?(the\s+)?(previous|prior|above|earlier)\s+instructions?"
        r"|\bdo\s+not\s+(tell|mention|inform|reveal|show)\b[^.]{0,40}\buser"
        r"|\b(before|instead\s+of)\s+using\s+(this|any\s+other)\s+tool", re.I)),
    ("reference to secrets or key files", re.compile(
        r"~/\.ssh|\.ssh/|\bid_(rsa|dsa|ecdsa|ed25519)\b|(^|[\s/'\"`(])\.env\b|\.aws/credentials|/etc/(passwd|shadow)"
        r"|\bapi[\s_-]?keys?\b|\bsecret[\s_-]?keys?\b|\bprivate[\s_-]?keys?\b|\baccess[\s_-]?tokens?\b"
        r"|\bpasswords?\b|\bcredentials?\b|mcp\.json|\.cursor/", re.I)),
    ("instruction to pass data in extra arguments", re.compile(
        r"\b(pass|put|send|include|add|append|provide)\b[^.]{0,60}\b(as|in|into|via|through)\s+(the\s+|an?\s+)?"
        r"['\"`]?\w*['\"`]?\s*(parameter|argument|field|sidenote|note)s?\b"
        r"|\b(content|contents)\s+of\b[^.]{0,40}\b(file|conversation|previous|messages?)", re.I)),
)


def screen(definition: Mapping[str, Any]) -> list[str]:
    """What looks like poisoning in a tool's description, schemas or annotations, each once."""
    found: list[str] = []
    texts = list(_strings(definition))
    for label, pattern in _PATTERNS:
        for text in texts:
            match = pattern.search(text)
            if match:
                found.append(f"{label} ({_excerpt(match.group(0))!r})")
                break
    invisible = sorted({c for text in texts for c in text if _invisible(c)})
    if invisible:
        shown = ", ".join(f"U+{ord(c):04X}" for c in invisible[:8])
        found.append(f"invisible or bidirectional Unicode ({shown})")
    return found


def _strings(value: Any) -> Any:
    """Every string in a JSON value, property names included (a schema can hide text in them)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _invisible(char: str) -> bool:
    # Cf holds zero-width characters, bidi controls and the Unicode tag block; Co and Cn
    # (private use, unassigned) render as nothing a reviewer can read.
    return unicodedata.category(char) in ("Cf", "Co", "Cn") or char in "\u115f\u1160\u3164\uffa0"


def _excerpt(text: str) -> str:
    return text if len(text) <= 60 else text[:57] + "..."
