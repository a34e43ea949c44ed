"""The semantic diff of two Assemblies: what a person reviewing a new version needs to see.

Not a text diff: models added or removed, caps, pinned parameters and prices changed,
tools added, removed or with a changed schema, steps and transitions, budgets, limits and
the plan's other settings. Fields this module does not know (a newer schema's) still show
up, as `changed` with their JSON path, so nothing that differs is ever left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.assembly.model import Assembly
from gateway.journal.recorded import json_diff
from gateway.money import nanos_to_usd_str

__all__ = ["Change", "diff_assemblies"]

_KNOWN = frozenset({"models", "tools", "vcs", "steps", "budget", "limits", "name", "tenant", "ttl_s", "max_prompt_tokens", "schema"})
_PRICES = {"input_nanos_per_mtok": "input", "output_nanos_per_mtok": "output"}


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # e.g. model_added, cap_changed, tool_schema_changed, transition_added
    path: str  # where in the Assembly, dotted
    before: Any
    after: Any
    summary: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "before": self.before, "after": self.after, "summary": self.summary}


def diff_assemblies(a: Assembly, b: Assembly) -> list[Change]:
    """What changes from `a` to `b`, section by section, in a stable order."""
    da = a.model_dump(mode="json", by_alias=True)
    db = b.model_dump(mode="json", by_alias=True)
    changes: list[Change] = []
    changes += _models(da["models"], db["models"])
    changes += _tools(da["tools"], db["tools"])
    changes += _builtin(da["vcs"].get("builtin_tools", []), db["vcs"].get("builtin_tools", []))
    changes += _steps(da["steps"], db["steps"])
    changes += _fields("budget", da["budget"], db["budget"], "budget_changed")
    changes += _fields("limits", da["limits"], db["limits"], "limit_changed")
    for key in ("name", "tenant", "ttl_s", "max_prompt_tokens", "schema"):
        if da.get(key) != db.get(key):
            changes.append(Change("setting_changed", key, da.get(key), db.get(key), f"{key}: {da.get(key)} -> {db.get(key)}"))
    for key in sorted((da.keys() | db.keys()) - _KNOWN):
        changes += _generic(key, da.get(key), db.get(key))
    return changes


def _generic(path: str, before: Any, after: Any) -> list[Change]:
    return [
        Change("changed", d["path"], _absent(d["recorded"]), _absent(d["received"]), f"{d['path']} changed")
        for d in json_diff(before, after, path)
    ]


def _absent(value: Any) -> Any:
    return None if value == "<absent>" else value


def _models(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    for name in sorted(a.keys() - b.keys()):
        out.append(Change("model_removed", f"models.{name}", a[name]["upstream_model"], None, f"model {name} removed"))
    for name in sorted(b.keys() - a.keys()):
        grant = b[name]
        out.append(Change("model_added", f"models.{name}", None, grant["upstream_model"],
                          f"model {name} added ({grant['upstream_model']}, cap {grant['max_tokens']})"))
    for name in sorted(a.keys() & b.keys()):
        out += _model(name, a[name], b[name])
    return out


def _model(name: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    path = f"models.{name}"
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key), b.get(key)
        if before == after:
            continue
        if key == "max_tokens":
            out.append(Change("cap_changed", f"{path}.max_tokens", before, after, f"{name}: max_tokens cap {before} -> {after}"))
        elif key == "params":
            out += _params(name, before or {}, after or {})
        elif key == "price":
            out += _price(name, before or {}, after or {})
        else:
            out.append(Change("model_changed", f"{path}.{key}", before, after, f"{name}: {key} {before} -> {after}"))
    return out


def _params(model: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    for key in sorted(a.keys() | b.keys()):
        path = f"models.{model}.params.{key}"
        if key not in b:
            out.append(Change("param_unpinned", path, a[key], None, f"{model}: {key} no longer pinned (was {a[key]!r})"))
        elif key not in a:
            out.append(Change("param_pinned", path, None, b[key], f"{model}: {key} pinned to {b[key]!r}"))
        elif a[key] != b[key]:
            out.append(Change("param_changed", path, a[key], b[key], f"{model}: {key} pinned {a[key]!r} -> {b[key]!r}"))
    return out


def _price(model: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key), b.get(key)
        if before == after:
            continue
        path = f"models.{model}.price.{key}"
        if key in _PRICES and isinstance(before, int) and isinstance(after, int):
            summary = (f"{model}: {_PRICES[key]} price {nanos_to_usd_str(before)} -> {nanos_to_usd_str(after)}"
                       " USD per million tokens")
        else:
            summary = f"{model}: price {key} {before} -> {after}"
        out.append(Change("price_changed", path, before, after, summary))
    return out


def _tools(a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    for name in sorted(a.keys() - b.keys()):
        out.append(Change("tool_removed", f"tools.{name}", a[name]["parameters"], None, f"tool {name} removed"))
    for name in sorted(b.keys() - a.keys()):
        out.append(Change("tool_added", f"tools.{name}", None, b[name]["parameters"], f"tool {name} added"))
    for name in sorted(a.keys() & b.keys()):
        before, after = a[name], b[name]
        if before.get("parameters") != after.get("parameters"):
            out.append(Change("tool_schema_changed", f"tools.{name}.parameters", before.get("parameters"),
                              after.get("parameters"), f"tool {name}: argument schema changed"))
        for key in sorted((before.keys() | after.keys()) - {"parameters", "name"}):
            if before.get(key) != after.get(key):
                out.append(Change("tool_changed", f"tools.{name}.{key}", before.get(key), after.get(key),
                                  f"tool {name}: {key} changed"))
    return out


def _builtin(a: list[str], b: list[str]) -> list[Change]:
    out = [Change("tool_removed", f"builtin_tools.{n}", n, None, f"built-in tool {n} removed") for n in sorted(set(a) - set(b))]
    out += [Change("tool_added", f"builtin_tools.{n}", None, n, f"built-in tool {n} added") for n in sorted(set(b) - set(a))]
    return out


def _steps(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[Change]:
    out: list[Change] = []
    entry_a, entry_b = (a[0]["id"] if a else None), (b[0]["id"] if b else None)
    if entry_a != entry_b:
        out.append(Change("entry_step_changed", "steps.0", entry_a, entry_b, f"entry step {entry_a} -> {entry_b}"))
    by_a, by_b = {s["id"]: s for s in a}, {s["id"]: s for s in b}
    for sid in [s["id"] for s in a if s["id"] not in by_b]:
        out.append(Change("step_removed", f"steps.{sid}", by_a[sid]["model"], None, f"step {sid} removed"))
    for sid in [s["id"] for s in b if s["id"] not in by_a]:
        step = by_b[sid]
        out.append(Change("step_added", f"steps.{sid}", None, step["model"],
                          f"step {sid} added (model {step['model']}, next {', '.join(step['next']) or 'none'})"))
    for sid in [s["id"] for s in a if s["id"] in by_b]:
        out += _step(sid, by_a[sid], by_b[sid])
    return out


def _step(sid: str, a: dict[str, Any], b: dict[str, Any]) -> list[Change]:
    out: list[Change] = []
    path = f"steps.{sid}"
    if a["model"] != b["model"]:
        out.append(Change("step_changed", f"{path}.model", a["model"], b["model"], f"step {sid}: model {a['model']} -> {b['model']}"))
    for tool in sorted(set(a["tools"]) - set(b["tools"])):
        out.append(Change("step_tool_removed", f"{path}.tools", tool, None, f"step {sid}: tool {tool} removed"))
    for tool in sorted(set(b["tools"]) - set(a["tools"])):
        out.append(Change("step_tool_added", f"{path}.tools", None, tool, f"step {sid}: tool {tool} added"))
    for nxt in sorted(set(a["next"]) - set(b["next"])):
        out.append(Change("transition_removed", f"{path}.next", f"{sid}->{nxt}", None, f"transition {sid} -> {nxt} removed"))
    for nxt in sorted(set(b["next"]) - set(a["next"])):
        out.append(Change("transition_added", f"{path}.next", None, f"{sid}->{nxt}", f"transition {sid} -> {nxt} added"))
    for key in sorted((a.keys() | b.keys()) - {"id", "model", "tools", "next"}):
        if a.get(key) != b.get(key):
            out.append(Change("step_changed", f"{path}.{key}", a.get(key), b.get(key), f"step {sid}: {key} {a.get(key)} -> {b.get(key)}"))
    return out


def _fields(section: str, a: dict[str, Any], b: dict[str, Any], kind: str) -> list[Change]:
    out: list[Change] = []
    for key in sorted(a.keys() | b.keys()):
        before, after = a.get(key), b.get(key)
        if before != after:
            out.append(Change(kind, f"{section}.{key}", before, after, f"{section}.{key}: {_shown(key, before)} -> {_shown(key, after)}"))
    return out


def _shown(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if "nanos" in key and isinstance(value, int):
        return nanos_to_usd_str(value) + " USD"
    return str(value)
