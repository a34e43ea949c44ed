"""Budgets over real HTTP: cost headers are exact and agree with the session, exhausted
budgets and rate limits answer 429, the tenant's daily limit holds across sessions, and
cost reports add up to what the sessions spent."""

from __future__ import annotations

import asyncio
import re
import time
from decimal import Decimal
from typing import Any

import httpx
import openai
import pytest

from gateway import redis_keys
from gateway.cli import main as cli_main
from gateway.money import NANOS_PER_USD, cost_nanos, nanos_to_usd_str
from gateway.settings import ModelSettings, Price
from gateway.tokenizer import count_chat_prompt
from tests.conftest import ADMIN_TOKEN, BOTH_REDIS, OPEN_PLAN, Gateway, make_settings, start_gateway
from tests.openai_support import bearer, openai_error
from tests.redis_proc import client_for

pytestmark = BOTH_REDIS  # each test runs on a single Redis and on a Redis Cluster

HELLO = [{"role": "user", "content": "hello"}]
USD = r"^-?\d+\.\d{9}$"


def nanos(header: str) -> int:
    assert re.fullmatch(USD, header), header
    return int(Decimal(header) * NANOS_PER_USD)


def chat(gw: Gateway, token: str, model: str = "gpt-4o-mini", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": HELLO, **extra}
    return httpx.post(gw.openai_base + "/chat/completions", json=body, headers=bearer(token), timeout=30)


def prices(gw: Gateway, assembly_id: str, model: str) -> tuple[int, int]:
    price = gw.admin.get(f"/admin/v1/assemblies/{assembly_id}").json()["models"][model]["price"]
    return price["input_nanos_per_mtok"], price["output_nanos_per_mtok"]


def plan(**changes: Any) -> dict[str, Any]:
    return {**OPEN_PLAN, **changes}


def test_cost_headers_are_exact_and_match_the_session(gateway: Gateway) -> None:
    opened = gateway.open_session(OPEN_PLAN, budget_usd=0.5)
    asm = gateway.session(opened["session_id"])["assembly_id"]
    in_price, out_price = prices(gateway, asm, "gpt-4o-mini")
    total = 0
    for i in range(3):
        r = chat(gateway, opened["token"], max_tokens=10 + i)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        cost = nanos(r.headers["x-abc-cost-usd"])
        assert cost == cost_nanos(usage["prompt_tokens"], in_price) + cost_nanos(usage["completion_tokens"], out_price)
        assert cost > 0
        total += cost
        shown = gateway.session(opened["session_id"])
        assert shown["spent_nanos"] == total and shown["reserved_nanos"] == 0
        assert r.headers["x-abc-budget-remaining-usd"] == shown["remaining_usd"] == nanos_to_usd_str(500_000_000 - total)
        assert r.headers["x-abc-session"] == opened["session_id"]


def test_an_exhausted_budget_is_429_budget_exceeded_and_says_what_is_left(gateway: Gateway, redis_url: str) -> None:
    opened = gateway.open_session(OPEN_PLAN, budget_usd=0.0001)  # 100_000 nanos < one worst case
    r = chat(gateway, opened["token"])
    error = openai_error(r, 429)
    assert error["code"] == "budget_exceeded" and error["type"] == "insufficient_quota"
    assert error["budget"] == "usd" and error["remaining"] == "0.000100000"
    shown = gateway.session(opened["session_id"])
    assert (shown["spent_nanos"], shown["reserved_nanos"], shown["requests"]) == (0, 0, 0)
    # A request whose worst case fits is still admitted.
    assert chat(gateway, opened["token"], max_tokens=1).status_code == 200


def test_session_rpm_limit_denies_the_fourth_request_in_a_minute(gateway: Gateway) -> None:
    if time.time() % 60 > 55:  # keep the four requests inside one minute window
        time.sleep(60 - time.time() % 60 + 0.1)
    token = gateway.token(plan(name="rpm", limits={"session_rpm": 3}))
    for _ in range(3):
        assert chat(gateway, token, max_tokens=5).status_code == 200
    error = openai_error(chat(gateway, token, max_tokens=5), 429)
    assert error["code"] == "session_rpm" and error["type"] == "rate_limit_error"
    # Another session of the same plan has its own window.
    assert chat(gateway, gateway.token(plan(name="rpm", limits={"session_rpm": 3})), max_tokens=5).status_code == 200


def test_the_tenant_daily_limit_holds_across_sessions(gateway: Gateway, redis_url: str) -> None:
    tenant = f"t{time.time_ns()}"
    limit = 400_000
    limited = plan(name="daily", tenant=tenant, limits={"tenant_usd_per_day": 0.0004})
    first, second = gateway.open_session(limited), gateway.open_session(limited)
    # A session of the same tenant without the limit spends too; it must not loosen the limit.
    loose = gateway.token(plan(name="loose", tenant=tenant))
    asm = gateway.session(first["session_id"])["assembly_id"]
    in_price, out_price = prices(gateway, asm, "gpt-4o-mini")
    worst = cost_nanos(count_chat_prompt(HELLO, "o200k_base"), in_price) + cost_nanos(64, out_price)
    spent_today = 0  # by the limited sessions: what the tenant's day counter must hold
    for _ in range(20):
        for opened in (first, second):
            r = chat(gateway, opened["token"], max_tokens=64)
            if spent_today + worst > limit:
                error = openai_error(r, 429)
                assert error["code"] == "budget_exceeded" and error["budget"] == "tenant_usd_day"
                assert error["remaining"] == nanos_to_usd_str(limit - spent_today)
                break
            assert r.status_code == 200, r.text
            spent_today += nanos(r.headers["x-abc-cost-usd"])
        else:
            assert chat(gateway, loose, max_tokens=64).status_code == 200
            continue
        break
    else:
        pytest.fail("the tenant's daily limit never denied a request")
    client = client_for(redis_url)
    try:
        counter = int(client.get(redis_keys.tenant_spend(tenant, time.strftime("%Y%m%d", time.gmtime()))))
    finally:
        client.close()
    assert counter == spent_today <= limit


def test_a_request_id_reused_while_in_flight_is_refused_and_nothing_leaks(gateway: Gateway) -> None:
    opened = gateway.open_session(OPEN_PLAN)

    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            def send() -> Any:
                return client.post(
                    gateway.openai_base + "/chat/completions",
                    json={"model": "mock-slow", "messages": HELLO},
                    headers={**bearer(opened["token"]), "x-request-id": "client-chosen-id"},
                )
            first = asyncio.ensure_future(send())
            await asyncio.sleep(0.3)  # the first is reserved and waiting on the slow upstream
            return list(await asyncio.gather(first, send()))

    responses = asyncio.run(both())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 409], [r.text for r in responses]
    refused = next(r for r in responses if r.status_code == 409)
    assert openai_error(refused, 409)["code"] == "request_in_flight"
    done = next(r for r in responses if r.status_code == 200)
    shown = gateway.session(opened["session_id"])
    assert shown["reserved_nanos"] == 0
    assert shown["spent_nanos"] == nanos(done.headers["x-abc-cost-usd"])


def test_cost_report_groups_spend_and_adds_up_to_the_sessions(redis_url: str, keyring: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    base = make_settings()
    settings = make_settings(models=[*base.models, ModelSettings(name="mock-other", provider="mock", price=Price(input_per_mtok=2.0, output_per_mtok=4.0))])
    gw = start_gateway(settings, redis_url, keyring)
    try:
        two_models = plan(tenant=None, models=[*OPEN_PLAN["models"], {"name": "mock-other", "max_tokens": 64}])
        asm = gw.compile(two_models)
        sessions = {
            "acme": [gw.open_session(asm, tenant="acme") for _ in range(2)],
            "globex": [gw.open_session(asm, tenant="globex")],
        }
        spent_by_model: dict[str, int] = {}
        for tenant, opened in sessions.items():
            for i, s in enumerate(opened):
                for model in ("gpt-4o-mini", "mock-other")[: 1 + (i + len(tenant)) % 2]:
                    r = chat(gw, s["token"], model=model, max_tokens=20)
                    assert r.status_code == 200, r.text
                    spent_by_model[model] = spent_by_model.get(model, 0) + nanos(r.headers["x-abc-cost-usd"])
        spent = {s["session_id"]: gw.session(s["session_id"])["spent_nanos"] for group in sessions.values() for s in group}
        by_tenant = {t: sum(spent[s["session_id"]] for s in group) for t, group in sessions.items()}

        report = gw.admin.get("/admin/v1/costs", params={"group_by": "tenant"}).json()
        assert {r["key"]: r["cost_nanos"] for r in report["rows"]} == by_tenant
        assert [r["cost_nanos"] for r in report["rows"]] == sorted(by_tenant.values(), reverse=True)
        assert report["total_nanos"] == sum(spent.values())
        assert report["total_usd"] == nanos_to_usd_str(sum(spent.values()))
        for row in report["rows"]:
            assert row["cost_usd"] == nanos_to_usd_str(row["cost_nanos"])

        rows = gw.admin.get("/admin/v1/costs", params={"group_by": "session"}).json()["rows"]
        assert {r["key"]: r["cost_nanos"] for r in rows} == spent
        rows = gw.admin.get("/admin/v1/costs", params={"group_by": "model"}).json()["rows"]
        assert {r["key"]: r["cost_nanos"] for r in rows} == spent_by_model
        rows = gw.admin.get("/admin/v1/costs", params={"group_by": "assembly"}).json()["rows"]
        assert rows == [{"key": asm, "cost_usd": nanos_to_usd_str(sum(spent.values())), "cost_nanos": sum(spent.values())}]

        # Windows: the hours that overlap [since, until); dates, datetimes and epoch seconds.
        past = gw.admin.get("/admin/v1/costs", params={"group_by": "tenant", "since": "2001-01-01", "until": "2001-01-02T00:00:00Z"}).json()
        assert (past["rows"], past["total_nanos"], past["since"], past["until"]) == ([], 0, "2001-01-01T00:00:00Z", "2001-01-02T00:00:00Z")
        hour = int(time.time()) // 3600 * 3600
        now_window = gw.admin.get("/admin/v1/costs", params={"group_by": "tenant", "since": str(hour), "until": str(hour + 3600)}).json()
        assert now_window["total_nanos"] in (0, sum(spent.values()))  # 0 only if the hour turned mid-test

        for bad in ({"group_by": "planet"}, {"since": "yesterday-ish"}, {"since": "2030-01-02", "until": "2030-01-01"}):
            error = openai_error(gw.admin.get("/admin/v1/costs", params=bad), 400)
            assert error["type"] == "invalid_request_error"
        assert httpx.get(gw.base_url + "/admin/v1/costs").status_code == 401

        monkeypatch.setenv("ABC_ADMIN_TOKEN", ADMIN_TOKEN)
        capsys.readouterr()
        assert cli_main(["admin", "--url", gw.base_url, "costs", "--group-by", "tenant"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out[1].split() == ["key", "cost_usd", "cost_nanos", "share"]
        table = {line.split()[0]: line.split()[1] for line in out[3:]}
        assert table == {**{t: nanos_to_usd_str(v) for t, v in by_tenant.items()}, "TOTAL": nanos_to_usd_str(sum(spent.values()))}
    finally:
        gw.close()


def test_a_free_model_settles_at_zero(redis_url: str, keyring: Any) -> None:
    """A zero price makes zero estimates; settling them must not trip over Lua's -0."""
    base = make_settings()
    free = ModelSettings(name="mock-free", provider="mock", price=Price(input_per_mtok=0, output_per_mtok=0))
    gw = start_gateway(make_settings(models=[*base.models, free]), redis_url, keyring)
    try:
        opened = gw.open_session(plan(name="free", models=[{"name": "mock-free", "max_tokens": 32}]))
        for _ in range(2):
            r = chat(gw, opened["token"], model="mock-free")
            assert r.status_code == 200, r.text
            assert r.headers["x-abc-cost-usd"] == "0.000000000"
        shown = gw.session(opened["session_id"])
        assert (shown["spent_nanos"], shown["reserved_nanos"], shown["requests"]) == (0, 0, 2)
    finally:
        gw.close()


def test_a_million_dollar_budget_is_exact_integer_money(gateway: Gateway) -> None:
    # Lua prints numbers >= 1e14 in float notation unless told otherwise; nano-dollars of
    # a $1M budget are 1e15, so every figure must still come back as an exact integer.
    plan = {**OPEN_PLAN, "budget": {"usd": 1_000_000}}
    opened = gateway.open_session(plan)
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=opened["token"], max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    cost = raw.headers["x-abc-cost-usd"]
    left = raw.headers["x-abc-budget-remaining-usd"]
    assert Decimal(cost) + Decimal(left) == Decimal("1000000")
    shown = gateway.session(opened["session_id"])
    assert shown["spent_nanos"] == int(Decimal(cost) * 10**9)
    assert shown["remaining_usd"] == left
