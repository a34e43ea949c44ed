"""What the fuzz target checks, importable without Atheris (the corpus runs as tests):
a request body's bytes through the parser, the PEP's extraction and checks for every
endpoint, and the request hooks of the shipped plugins. Only a GatewayError (an
OpenAI-shaped answer) may come out; anything else is a crasher. See fuzz/README.md.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly
from gateway.assembly.plan import parse_plan
from gateway.errors import GatewayError
from gateway.http.bodies import parse_body
from gateway.pipeline import policy, request_fields
from gateway.plugins import Registry, Run, for_call
from gateway.providers.base import Endpoint
from gateway.settings import load_settings

PLAN: dict[str, Any] = {
    "name": "fuzz",
    "models": [
        {"name": "gpt-4o-mini", "max_tokens": 64, "params": {"temperature": 0}, "max_n": 2},
        {"name": "gpt-3.5-turbo-instruct", "max_tokens": 64},
        {"name": "text-embedding-3-small"},
    ],
    "tools": [{"name": "lookup_order", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}],
    "builtin_tools": ["web_search"],
    "steps": [
        {"id": "ask", "model": "gpt-4o-mini", "next": ["look"]},
        {"id": "look", "model": "gpt-4o-mini", "tools": ["lookup_order"], "next": ["look"]},
    ],
    "plugins": [
        {"name": "prompt_guard", "options": {"deny_patterns": ["rm -rf"]}},
        {"name": "pii_redact", "options": {"answers": True}},
        {"name": "output_limits", "options": {"max_chars": 100}},
    ],
}


def _setup() -> tuple[Assembly, Registry, frozenset[str]]:
    settings = load_settings("config/gateway.yaml")
    registry = Registry.from_entry_points()
    plan = parse_plan(PLAN)
    assembly = compile_plan(plan, settings, registry=registry).assembly
    return assembly, registry, frozenset(m.name.strip().lower() for m in settings.models)


ASSEMBLY, REGISTRY, KNOWN = _setup()


def check(data: bytes) -> None:
    """One input; raises only when the gateway would have answered 500."""
    try:
        body = parse_body(data)
    except GatewayError as exc:
        assert 400 <= exc.status < 500, exc.status
        return
    # Everything the gateway does with a parsed body before it answers: hash, journal, redact.
    orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    orjson.dumps(request_fields.redact_overrides(body))
    for endpoint in Endpoint:
        if endpoint not in request_fields.ALLOWED_FIELDS:
            continue
        try:
            grant = policy.authorize(ASSEMBLY, endpoint, body, known_models=KNOWN)
            run = Run(for_call(REGISTRY, ASSEMBLY, grant.candidate_steps))
            upstream = run.request(grant.body)
        except GatewayError as exc:
            assert exc.status in (400, 403, 404, 409), (exc.status, exc.code)
            orjson.dumps(exc.to_dict())
            continue
        orjson.dumps(upstream)
        assert upstream["model"] == grant.model.upstream_model
