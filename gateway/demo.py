"""`abc-gateway demo`: one machine, no network, no keys.

Starts an embedded Redis and the gateway with the built-in mock provider, compiles the
example plan, opens a session and drives it with the official OpenAI SDK, printing
what happened: answers, a denial, the cost, a journal excerpt and its verification, and
ends with `plan suggest`: the revision of the plan that the journals argue for.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import SecretStr

from gateway.mcp.demo import drive_tools, with_demo_tool_server
from gateway.server import BackgroundServer, keyring_for, redis_url_for
from gateway.settings import LogSettings, load_settings, packaged

LOCAL_PLAN = Path("config/plans/support-bot.yaml")


def plan_path() -> Path:
    """The example plan: the local copy when there is one, else the one shipped in the package."""
    return LOCAL_PLAN if LOCAL_PLAN.exists() else packaged("plans/support-bot.yaml")


def _say(title: str, detail: str = "") -> None:
    print(f"\n== {title}")
    if detail:
        print(detail)


def run_demo(*, config: str | None = None) -> int:
    settings = load_settings(config)
    admin_token = settings.admin_token.get_secret_value() if settings.admin_token else secrets.token_urlsafe(32)
    update: dict[str, Any] = {"admin_token": SecretStr(admin_token)}
    if "log" not in settings.model_fields_set:
        update["log"] = LogSettings(level="error")  # request lines (its denials too) would bury the story told on stdout
    settings = with_demo_tool_server(settings.model_copy(update=update))
    data_dir = Path(settings.redis.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    keyring = keyring_for(settings, demo_key_dir=data_dir)
    redis_url, embedded = redis_url_for(settings)
    print(f"ABC Gateway demo: Redis at {'embedded redis-server, data in ' + str(data_dir) if embedded else 'ABC_REDIS_URL'}")
    try:
        with BackgroundServer(settings, redis_url=redis_url, keyring=keyring) as server:
            print(f"gateway listening on {server.base_url} (mock provider, no network)")
            with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as admin:
                _drive(server.base_url, admin)
    finally:
        if embedded is not None:
            embedded.stop()
    return 0


def _admin(admin: httpx.Client, method: str, path: str, body: Any = None) -> Any:
    response = admin.request(method, path, json=body)
    response.raise_for_status()
    return response.json()


QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "My order A-1234 has not arrived. Can you check it?"}
]
LOOKUP_ORDER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup_order",
        "description": "Find an order by id",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
    },
}


def _drive(base_url: str, admin: httpx.Client) -> None:
    path = plan_path()
    plan = yaml.safe_load(path.read_text(encoding="utf-8"))
    compiled = _admin(admin, "POST", "/admin/v1/plans/compile", plan)
    _say(f"compiled {path} -> {compiled['assembly_id']}",
         "\n".join(f"  warning: {w}" for w in compiled["warnings"]) or "  no warnings")
    opened = _admin(admin, "POST", "/admin/v1/sessions",
                    {"assembly_id": compiled["assembly_id"], "budget_usd": 0.05, "labels": {"source": "demo"}})
    session_id = opened["session_id"]
    _say(f"opened {session_id}", f"  budget ${opened['budget_usd']}; the VCS token is the OpenAI API key")

    client = openai.OpenAI(base_url=base_url + "/v1", api_key=opened["token"], max_retries=0)
    _triage(client)
    name, arguments = _tool_call(client)
    _tool_result(client, name, arguments)
    _denials(client)

    shown = _admin(admin, "GET", f"/admin/v1/sessions/{session_id}")
    _say("session", f"  step {shown['current_step']}, {shown['requests']} requests admitted, spent ${shown['spent_usd']}, "
         f"reserved ${shown['reserved_usd']}, remaining ${shown['remaining_usd']}")
    _journal(admin, session_id)
    _journal(admin, drive_tools(base_url, admin, _say))
    _suggest(admin, compiled["assembly_id"])


def _triage(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=QUESTION)
    answer = raw.parse()
    _say("step 'triage': a plain chat completion",
         f"  assistant: {answer.choices[0].message.content}\n  cost ${raw.headers['x-abc-cost-usd']}, "
         f"budget left ${raw.headers['x-abc-budget-remaining-usd']}")


def _tool_call(client: openai.OpenAI) -> tuple[str, str]:
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=QUESTION, tools=[LOOKUP_ORDER], stream=True, stream_options={"include_usage": True}
    )
    name, arguments, chunks, usage = "", "", 0, None
    for chunk in stream:
        chunks += 1
        usage = chunk.usage or usage
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function is not None:
                    name += call.function.name or ""
                    arguments += call.function.arguments or ""
    _say("step 'answer': streamed, the model calls a whitelisted tool",
         f"  {chunks} chunks; tool call {name}({arguments}); usage {usage.total_tokens if usage else '?'} tokens")
    return name, arguments


def _tool_result(client: openai.OpenAI, name: str, arguments: str) -> None:
    follow_up: list[ChatCompletionMessageParam] = [
        *QUESTION,
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped", "eta": "tomorrow"}'},
    ]
    stream = client.chat.completions.create(model="gpt-4o-mini", messages=follow_up, tools=[LOOKUP_ORDER], stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    _say("step 'answer' again: streamed text after the tool result", f"  assistant: {text}")


def _denials(client: openai.OpenAI) -> None:
    refund: ChatCompletionToolParam = {
        "type": "function", "function": {"name": "refund_order", "parameters": {"type": "object", "properties": {}}}
    }
    attempts: list[tuple[str, dict[str, Any]]] = [
        ("denied: a tool the plan never allowed", {"tools": [refund]}),
        ("denied: overriding a pinned parameter", {"temperature": 1.5}),
    ]
    for title, extra in attempts:
        try:
            client.chat.completions.create(model="gpt-4o-mini", messages=QUESTION, **extra)
        except openai.PermissionDeniedError as exc:
            reason = exc.body.get("message") if isinstance(exc.body, dict) else str(exc)
            _say(title, f"  HTTP {exc.status_code}: {reason}")


def _journal(admin: httpx.Client, session_id: str) -> None:
    journal = _admin(admin, "GET", f"/admin/v1/sessions/{session_id}/journal?limit=100")
    lines = []
    for entry in journal["entries"]:
        detail = entry.get("code") or entry.get("event") or ""
        cost = entry.get("cost_nanos", entry.get("cost"))
        lines.append(f"  #{entry['seq']:<3} {entry['kind']:<9} step={entry.get('step') or '-':<7} "
                     f"{('cost=' + str(cost) + 'n$') if cost is not None else '':<14} {detail}  hash={entry['hash'][:12]}")
    _say("journal excerpt (hash-chained, nano-dollars)", "\n".join(lines))
    report = _admin(admin, "POST", f"/admin/v1/sessions/{session_id}/replay", {"mode": "verify"})
    _say("journal verify", "  " + json.dumps(report))


def _suggest(admin: httpx.Client, assembly_id: str) -> None:
    """The decision plane: what the journal suggests for the plan's next version."""
    versions = _admin(admin, "GET", "/admin/v1/plans/support-bot/versions")["data"]
    head = versions[-1]
    found = _admin(admin, "GET", "/admin/v1/plans/support-bot/suggestions")
    lines = [f"  version {head['version']} ({head['assembly_id']}), {head['sessions']} session(s) opened on it"
             + (" (this run's)" if head["assembly_id"] == assembly_id else "")]
    lines += [f"  [{c['action']}] {c['summary']}" for c in found["changes"]] or ["  no change suggested yet"]
    lines += [f"  (too little data: {note}; run the demo again)" for note in found["notes"]]
    lines += ["", "  " + found["yaml"].replace("\n", "\n  ").rstrip()]
    _say(f"plan suggest support-bot: {found['sessions']} session(s), {found['calls']} call(s) read from the journals",
         "\n".join(lines))
