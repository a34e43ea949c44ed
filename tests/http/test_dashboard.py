"""The cost dashboard: GET /admin/v1/costs/series against real traffic, and the page at
/admin/dashboard driven in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway import redis_keys
from gateway.money import NANOS_PER_USD, nanos_to_usd_str
from tests.chromium import CHROMIUM, Chromium
from tests.conftest import ADMIN_TOKEN, BOTH_REDIS, OPEN_PLAN, Gateway
from tests.openai_support import bearer, openai_error, sdk
from tests.redis_proc import client_for

TENANTS = ("acme", "globex")
MODELS = ("gpt-4o-mini", "gpt-4o")



def nanos(usd: str) -> int:
    whole, _, frac = usd.partition(".")
    return int(whole) * NANOS_PER_USD + int(frac.ljust(9, "0"))


def spend_on_two_tenants_and_two_models(gw: Gateway) -> dict[str, dict[str, int]]:
    """Real calls through the openai SDK; returns nanos spent by tenant, model and session."""
    assembly = gw.compile({**OPEN_PLAN, "tenant": None})
    spent: dict[str, dict[str, int]] = {"tenant": {}, "model": {}, "session": {}}
    for t, tenant in enumerate(TENANTS):
        for s in range(2):
            opened = gw.open_session(assembly, tenant=tenant)
            with sdk(gw, opened["token"]) as client:
                for model in MODELS if s == 0 else MODELS[t : t + 1]:
                    raw = client.chat.completions.with_raw_response.create(
                        model=model, messages=[{"role": "user", "content": f"hello {tenant} {s}"}], max_tokens=16 + 8 * t
                    )
                    cost = nanos(raw.headers["x-abc-cost-usd"])
                    spent["model"][model] = spent["model"].get(model, 0) + cost
            session_id = opened["session_id"]
            spent["session"][session_id] = gw.session(session_id)["spent_nanos"]
            spent["tenant"][tenant] = spent["tenant"].get(tenant, 0) + spent["session"][session_id]
    return spent


def series(gw: Gateway, **params: str) -> dict[str, Any]:
    response = gw.admin.get("/admin/v1/costs/series", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@BOTH_REDIS
def test_the_series_adds_up_to_the_report_and_to_the_sessions(gw: Gateway) -> None:
    before = datetime.now(UTC)
    spent = spend_on_two_tenants_and_two_models(gw)
    after = datetime.now(UTC)
    window = {"since": (before - timedelta(hours=3)).isoformat(), "until": (after + timedelta(seconds=1)).isoformat()}
    assert all(spent[g] and all(spent[g].values()) for g in spent)
    assert set(spent["model"]) == set(MODELS)

    for group in ("tenant", "model", "session", "assembly"):
        body = series(gw, group_by=group, **window)
        report = gw.admin.get("/admin/v1/costs", params={"group_by": group, **window}).json()
        assert (body["group_by"], body["since"], body["until"]) == (group, report["since"], report["until"])
        sums = {s["key"]: sum(s["nanos"]) for s in body["series"]}
        assert sums == {r["key"]: r["cost_nanos"] for r in report["rows"]}
        assert [s["key"] for s in body["series"]] == [r["key"] for r in report["rows"]]  # same order
        assert body["total_nanos"] == report["total_nanos"] == sum(spent["session"].values())
        assert body["total_usd"] == report["total_usd"]
        for s in body["series"]:
            assert len(s["nanos"]) == len(s["usd"]) == len(body["buckets"])
            assert s["usd"] == [nanos_to_usd_str(n) for n in s["nanos"]]
            assert (s["total_nanos"], s["total_usd"]) == (sum(s["nanos"]), nanos_to_usd_str(sum(s["nanos"])))
        if group != "assembly":
            assert sums == spent[group]

    # Hourly buckets: every UTC hour that overlaps the window, and the spend in the hour it happened.
    body = series(gw, group_by="tenant", **window)
    hours = [datetime.fromisoformat(b) for b in body["buckets"]]
    first = (before - timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    assert hours == [first + timedelta(hours=i) for i in range(len(hours))]
    assert len(hours) in (4, 5)  # 5 when the hour turned during the calls
    spent_in = {hours[i] for s in body["series"] for i, n in enumerate(s["nanos"]) if n}
    assert spent_in <= {before.replace(minute=0, second=0, microsecond=0), after.replace(minute=0, second=0, microsecond=0)}


@BOTH_REDIS
def test_the_series_puts_each_rollup_hour_in_its_bucket_and_keeps_empty_hours(gw: Gateway, redis_url: str) -> None:
    client = client_for(redis_url)
    try:
        for bucket, fields in {
            "2030010108": {("acme", "s1", "gpt-4o", "asm1"): 7},  # before the window
            "2030010110": {("acme", "s1", "gpt-4o", "asm1"): 1500, ("globex", "s2", "gpt-4o", "asm1"): 20},
            "2030010112": {("acme", "s3", "gpt-4o-mini", "asm1"): 3},
            "2030010113": {("globex", "s2", "gpt-4o", "asm1"): 9},  # `until` is exclusive
        }.items():
            for dims, value in fields.items():
                shard = redis_keys.shard_of(dims[1], redis_keys.DEFAULT_SHARDS)  # the session's shard, as the gateway writes
                client.hincrby(redis_keys.cost_rollup(bucket, shard), redis_keys.cost_field(*dims), value)
            client.zadd(redis_keys.COST_BUCKETS, {bucket: int(bucket)})
    finally:
        client.close()

    body = series(gw, group_by="tenant", since="2030-01-01T09:30:00Z", until="2030-01-01T13:00:00Z")
    assert body["buckets"] == [f"2030-01-01T{h:02d}:00:00Z" for h in (9, 10, 11, 12)]
    assert body["series"][0] == {
        "key": "acme",
        "nanos": [0, 1500, 0, 3],
        "usd": ["0.000000000", "0.000001500", "0.000000000", "0.000000003"],
        "total_nanos": 1503,
        "total_usd": "0.000001503",
    }
    assert [(s["key"], s["nanos"]) for s in body["series"][1:]] == [("globex", [0, 20, 0, 0])]
    assert body["total_nanos"] == 1523
    by_model = series(gw, group_by="model", since="2030-01-01T09:30:00Z", until="2030-01-01T13:00:00Z")
    assert [(s["key"], s["nanos"]) for s in by_model["series"]] == [("gpt-4o", [0, 1520, 0, 0]), ("gpt-4o-mini", [0, 0, 0, 3])]

    empty = series(gw, group_by="model", since="2001-01-01", until="2001-01-01T02:00:00Z")
    assert (empty["buckets"], empty["series"], empty["total_nanos"]) == (["2001-01-01T00:00:00Z", "2001-01-01T01:00:00Z"], [], 0)
    month = series(gw, group_by="model", since="2030-01-01", until="2030-01-31")  # the page's longest window
    assert len(month["buckets"]) == 720 and month["series"][0]["nanos"][10] == 1520
    default = series(gw)  # the last 24 hours by tenant: 24 or 25 buckets, as the window straddles hours
    assert default["group_by"] == "tenant" and len(default["buckets"]) in (24, 25)


def test_the_series_refuses_bad_parameters_and_callers_without_the_admin_token(gw: Gateway) -> None:
    for bad in (
        {"group_by": "planet"},
        {"since": "yesterday-ish"},
        {"since": "2030-01-02", "until": "2030-01-01"},
        {"since": "2030-01-01", "until": "2030-03-01"},  # longer than a series may span
    ):
        error = openai_error(gw.admin.get("/admin/v1/costs/series", params=bad), 400)
        assert error["type"] == "invalid_request_error"
    url = gw.base_url + "/admin/v1/costs/series"
    openai_error(httpx.get(url), 401)
    openai_error(httpx.get(url, headers=bearer(gw.token(OPEN_PLAN))), 401)
    openai_error(httpx.get(url, headers=bearer(ADMIN_TOKEN + "x")), 401)


def test_the_dashboard_shell_carries_a_strict_policy_that_admits_only_its_own_inline_code(gw: Gateway) -> None:
    response = httpx.get(gw.base_url + "/admin/dashboard")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    policy = dict(p.strip().split(" ", 1) for p in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["frame-ancestors"] == "'none'"
    assert policy["connect-src"] == "'self'" and policy["img-src"] == "'self' data:"
    for directive in ("script-src", "style-src"):
        assert policy[directive].startswith("'sha256-") and "unsafe" not in policy[directive]
    assert set(re.findall(r"\w+://[^\s\"'`]*", response.text)) == {"http://www.w3.org/2000/svg"}  # no CDN
    assert httpx.post(gw.base_url + "/admin/dashboard").status_code == 401


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"headless Chromium is not installed at {CHROMIUM}: apt-get install chromium (scripts/dev setup does it as root)",
)
async def test_the_dashboard_draws_spend_by_tenant_and_model_in_a_browser(
    gw: Gateway, redis_url: str, tmp_path: Path
) -> None:
    started = time.monotonic()
    spend_on_two_tenants_and_two_models(gw)
    # And an earlier hour, as a settlement then would have written it: its bar goes in its slot.
    earlier = (datetime.now(UTC) - timedelta(hours=3)).strftime("%Y%m%d%H")
    client = client_for(redis_url)
    client.hincrby(redis_keys.cost_rollup(earlier, 0), redis_keys.cost_field("acme", "s0", "gpt-4o", "a0"), 123_456)
    client.zadd(redis_keys.COST_BUCKETS, {earlier: int(earlier)})
    client.close()
    earlier_iso = datetime.strptime(earlier, "%Y%m%d%H").strftime("%Y-%m-%dT%H:00:00Z")
    api = {g: gw.admin.get("/admin/v1/costs", params={"group_by": g}).json() for g in ("tenant", "model")}
    url = gw.base_url + "/admin/dashboard"

    async with Chromium(tmp_path) as page:
        await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=960, deviceScaleFactor=1, mobile=False)
        await page.navigate(url)
        assert await page.evaluate("document.querySelectorAll('svg.chart rect').length") == 0

        await fill_token_and_load(page, ADMIN_TOKEN + "x")
        assert await page.wait_for("document.getElementById('status').dataset.state === 'error'")
        assert "invalid admin token" in await page.evaluate("document.getElementById('status').textContent")
        assert await page.evaluate("sessionStorage.length + document.querySelectorAll('#totals tbody tr').length") == 0

        await fill_token_and_load(page, ADMIN_TOKEN)
        await page.wait_for("document.getElementById('status').dataset.state === 'loaded'")
        shown = await page.evaluate(DOM_SUMMARY.replace("EARLIER", earlier_iso))
        await page.screenshot(Path(os.environ.get("ABC_DASHBOARD_SCREENSHOT", tmp_path / "dashboard.png")))

        for group, keys, key_earlier in (("tenant", TENANTS, "acme"), ("model", MODELS, "gpt-4o")):
            assert set(shown["bars"][group]) == set(keys), group
            assert shown["earlier"][group] == [key_earlier]
            assert shown["legend"][group] == [r["key"] for r in api[group]["rows"]]
            assert shown["buckets"][group] in ("24", "25")
        assert shown["rows"] == [
            [group, r["key"], r["cost_usd"]] for group in ("tenant", "model") for r in api[group]["rows"]
        ]
        assert shown["total"] == api["tenant"]["total_usd"] == api["model"]["total_usd"]
        assert shown["stored"] == {"session": [ADMIN_TOKEN], "local": 0, "cookie": ""}
        # 401s from the wrong token are the only network errors; nothing else may complain.
        assert [e for e in page.errors if not e.startswith("network:")] == []

        # A reload in the same tab loads again from sessionStorage, without asking.
        await page.send("Page.reload")
        await page.wait_for("document.getElementById('status').dataset.state === 'loaded'")
        assert (await page.evaluate(DOM_SUMMARY.replace("EARLIER", earlier_iso)))["rows"] == shown["rows"]

        # The browser enforces the policy: no foreign script runs, nothing leaves for elsewhere.
        probe = await page.evaluate(CSP_PROBE)
        assert probe == {"injected_script_ran": False, "violations": ["connect-src", "script-src-elem"]}

        await page.evaluate("document.getElementById('forget').click()")
        assert await page.evaluate("[sessionStorage.length, document.querySelectorAll('svg.chart rect').length]") == [0, 0]
    assert time.monotonic() - started < 20


async def fill_token_and_load(page: Chromium, token: str) -> None:
    await page.evaluate(
        f"document.getElementById('token').value = {json.dumps(token)};"
        "document.getElementById('status').dataset.state = 'idle';"
        "document.getElementById('load').click()"
    )


DOM_SUMMARY = """(() => {
  const keys = (sel) => [...document.querySelectorAll(sel)].map((e) => e.dataset.key);
  return {
    bars: { tenant: [...new Set(keys('#chart-tenant rect[data-key]'))], model: [...new Set(keys('#chart-model rect[data-key]'))] },
    legend: { tenant: keys('#legend-tenant li'), model: keys('#legend-model li') },
    earlier: Object.fromEntries(['tenant', 'model'].map((g) => [g, keys(`#chart-${g} rect[data-bucket="EARLIER"]`)])),
    buckets: { tenant: document.getElementById('chart-tenant').dataset.buckets, model: document.getElementById('chart-model').dataset.buckets },
    rows: [...document.querySelectorAll('#totals tbody tr')].map((tr) => [tr.dataset.group, tr.dataset.key, tr.querySelector('.usd').textContent]),
    total: document.getElementById('grand-total').textContent,
    stored: { session: Object.keys(sessionStorage).map((k) => sessionStorage.getItem(k)), local: localStorage.length, cookie: document.cookie },
  };
})()"""

CSP_PROBE = """(async () => {
  const violations = [];
  document.addEventListener('securitypolicyviolation', (e) => violations.push(e.effectiveDirective));
  const script = document.createElement('script');
  script.textContent = 'window.injectedScriptRan = true;';
  document.body.appendChild(script);
  try { await fetch('http://127.0.0.2:9/'); } catch (_) { /* refused by the policy */ }
  await new Promise((resolve) => setTimeout(resolve, 100));
  return { injected_script_ran: window.injectedScriptRan === true, violations: violations.sort() };
})()"""
