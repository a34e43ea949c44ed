"""Every route that can reach a model is governed the same way, proven for each route the app's
router has, not for a hand-made list: every POST under /v1/ is a model route unless named in
NOT_MODEL_ROUTES, and each needs a PROBE (how to call it), else this file fails.

Per route: a model outside the VCS is denied, a tool outside it too (or, where the route has
no tools, a `tools` field is refused), the token cap holds, a call no step allows is refused,
an exhausted budget refuses, a call is journaled as a request and its answer, and a recorded
replay answers byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.capability import Keyring
from tests.conftest import OPEN_PLAN, SIGNING_SECRET, Gateway, make_settings
from tests.openai_support import journal

# POST routes under /v1/ that never reach a model; a route added here needs its reason.
NOT_MODEL_ROUTES: dict[str, str] = {}

OUTSIDE_MODEL = "local-llama"  # configured, so known, but not in OPEN_PLAN's VCS
OUTSIDE_TOOL = "delete_everything"


@dataclass(frozen=True)
class Probe:
    model: str
    body: Callable[[str], dict[str, Any]]
    tool: Callable[[str], dict[str, Any]] | None  # the `tools` field offering one function
    cap_field: str | None  # where the output-token limit goes; None: the route has none
    streams: bool


def _chat_tool(name: str) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}]}


PROBES: dict[str, Probe] = {
    "/v1/chat/completions": Probe("gpt-4o-mini", lambda m: {"model": m, "messages": [{"role": "user", "content": "hi"}]},
                                  _chat_tool, "max_tokens", True),
    "/v1/completions": Probe("gpt-3.5-turbo-instruct", lambda m: {"model": m, "prompt": "Say hi"}, None, "max_tokens", True),
    "/v1/embeddings": Probe("text-embedding-3-small", lambda m: {"model": m, "input": "hi"}, None, None, False),
    "/v1/responses": Probe("gpt-4o-mini", lambda m: {"model": m, "input": "hi"},
                           lambda name: {"tools": [{"type": "function", "name": name, "parameters": {"type": "object"}}]},
                           "max_output_tokens", True),
    "/v1/messages": Probe("gpt-4o-mini", lambda m: {"model": m, "max_tokens": 32, "messages": [{"role": "user", "content": "hi"}]},
                          lambda name: {"tools": [{"name": name, "input_schema": {"type": "object"}}]}, "max_tokens", True),
}


def model_routes() -> list[str]:
    app = create_app(make_settings(), redis_url="redis://127.0.0.1:1/0", keyring=Keyring.from_sources(SIGNING_SECRET))
    return sorted({
        route.resource.canonical for route in app.router.routes()
        if route.method == "POST" and route.resource is not None and route.resource.canonical.startswith("/v1/")
        and route.resource.canonical not in NOT_MODEL_ROUTES
    })


ROUTES = model_routes()


def test_every_model_route_has_a_probe() -> None:
    assert ROUTES, "the router lists no model routes"
    missing = [route for route in ROUTES if route not in PROBES]
    assert not missing, f"model routes without a probe (add one to PROBES, or a reason to NOT_MODEL_ROUTES): {missing}"


def _post(gw: Gateway, token: str, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(gw.base_url + route, json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _code(response: httpx.Response) -> str:
    return str(response.json()["error"]["code"])


@pytest.mark.parametrize("route", ROUTES)
def test_a_model_route_enforces_the_vcs_the_cap_the_steps_and_the_budget_and_journals(gw: Gateway, redis_url: str, route: str) -> None:
    probe = PROBES[route]
    opened = gw.open_session(OPEN_PLAN)
    token, body = opened["token"], probe.body(probe.model)

    outside = _post(gw, token, route, probe.body(OUTSIDE_MODEL))
    assert (outside.status_code, _code(outside)) == (403, "capability_denied"), outside.text

    if probe.tool is not None:
        tooled = _post(gw, token, route, {**body, **probe.tool(OUTSIDE_TOOL)})
        assert (tooled.status_code, _code(tooled)) == (403, "capability_denied"), tooled.text
        assert "tool" in tooled.json()["error"]["message"]
    else:  # no tools on this route: offering one is refused before anything runs
        tooled = _post(gw, token, route, {**body, **_chat_tool(OUTSIDE_TOOL)})
        assert tooled.status_code == 400, tooled.text

    if probe.cap_field is not None:
        over = _post(gw, token, route, {**body, probe.cap_field: 100_000})
        assert (over.status_code, _code(over)) == (403, "capability_denied"), over.text
        assert "cap" in over.json()["error"]["message"]

    stepped = gw.token({**OPEN_PLAN, "name": "stepped", "steps": [{"id": "only", "model": "gpt-4o", "next": ["only"]}]})
    out_of_step = _post(gw, stepped, route, body)
    assert out_of_step.status_code == 409, out_of_step.text

    broke = gw.open_session(OPEN_PLAN, budget_usd=0.000000001)["token"]
    refused = _post(gw, broke, route, body)
    assert (refused.status_code, _code(refused)) == (429, "budget_exceeded"), refused.text

    served = _post(gw, token, route, body)
    assert served.status_code == 200, served.text
    entries = [e for e in journal(redis_url, opened["session_id"]) if e["kind"] != "state"]
    assert [e["kind"] for e in entries].count("denial") == (3 if probe.cap_field else 2)
    request, answer = entries[-2:]
    assert (request["kind"], answer["kind"]) == ("request", "response")
    assert request["endpoint"] == route.removeprefix("/v1/") and request["rid"] == answer["rid"]
    assert request["body"] == body and answer["body"] == served.json()


def test_a_session_mixing_every_model_route_replays_byte_for_byte(gw: Gateway) -> None:
    calls = [(route, PROBES[route].body(PROBES[route].model)) for route in ROUTES]
    calls += [(route, {**body, "stream": True}) for route, body in calls if PROBES[route].streams]
    opened = gw.open_session(OPEN_PLAN)
    recorded = [_post(gw, opened["token"], route, body) for route, body in calls]
    assert [r.status_code for r in recorded] == [200] * len(calls)

    replay = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/replay", json={"mode": "recorded"})
    assert replay.status_code == 201, replay.text
    replayed = [_post(gw, replay.json()["token"], route, body) for route, body in calls]
    for (route, body), first, again in zip(calls, recorded, replayed, strict=True):
        assert again.status_code == 200, (route, again.text)
        assert again.content == first.content, (route, body.get("stream"))
        assert again.headers["x-abc-cost-usd" if not body.get("stream") else "content-type"] == \
            first.headers["x-abc-cost-usd" if not body.get("stream") else "content-type"]
    spent = gw.session(replay.json()["session_id"])["spent_nanos"]
    assert spent == gw.session(opened["session_id"])["spent_nanos"] and int(spent) > 0
