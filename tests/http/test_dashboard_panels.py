"""The dashboard's operational panels: GET /admin/v1/dashboard against real traffic, and the
page drawing them in headless Chromium (denials by reason, top sessions with their journals,
gateway overhead, tool spend)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chromium import CHROMIUM, Chromium
from tests.conftest import ADMIN_TOKEN, OPEN_PLAN, Gateway
from tests.http.test_dashboard import fill_token_and_load, spend_on_two_tenants_and_two_models

UNLISTED_TOOL = {"type": "function", "function": {"name": "refund", "parameters": {"type": "object", "properties": {}}}}


def deny(gw: Gateway) -> dict[str, int]:
    """Denials of three kinds; returns how many of each reason the metrics counted."""
    opened = gw.open_session({**OPEN_PLAN, "tenant": "acme"}, budget_usd=0.000001)
    headers = {"Authorization": f"Bearer {opened['token']}"}
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=gw.base_url, timeout=10) as client:
        for body, status in (
            ({**chat, "tools": [UNLISTED_TOOL]}, 403), ({**chat, "tools": [UNLISTED_TOOL]}, 403),
            ({**chat, "model": "gpt-4"}, 404), (chat, None),
        ):
            response = client.post("/v1/chat/completions", json=body, headers=headers)
            assert response.status_code == status if status else response.status_code in (402, 429), response.text
        metrics = client.get("/metrics").text
    counted: dict[str, int] = {}
    for line in metrics.splitlines():
        if line.startswith("abc_denials_total{"):
            reason = line.split('reason="', 1)[1].split('"', 1)[0]
            counted[reason] = int(float(line.rsplit(" ", 1)[1]))
    return counted


def panels(gw: Gateway) -> dict[str, Any]:
    response = gw.admin.get("/admin/v1/dashboard")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_the_panels_count_denials_rank_sessions_and_measure_overhead(gw: Gateway) -> None:
    spent = spend_on_two_tenants_and_two_models(gw)
    counted = deny(gw)
    body = panels(gw)

    assert {s["key"]: s["total"] for s in body["denials"]["series"]} == counted and len(counted) >= 2
    assert body["denials"]["total"] == sum(counted.values()) == 4
    assert all(len(s["counts"]) == len(body["denials"]["buckets"]) for s in body["denials"]["series"])
    ranked = sorted(spent["session"].items(), key=lambda kv: (-kv[1], kv[0]))
    assert [(s["session_id"], s["cost_nanos"]) for s in body["top_sessions"]] == ranked
    calls = 6  # spend_on_two_tenants_and_two_models settles six calls
    assert body["overhead"]["count"] == calls and 0 < body["overhead"]["p50_ms"] <= body["overhead"]["p99_ms"]
    assert body["tools"] == []  # tool calls are priced (MCP), but none ran here
    assert httpx.get(gw.base_url + "/admin/v1/dashboard").status_code == 401


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"headless Chromium is not installed at {CHROMIUM}: apt-get install chromium (scripts/dev setup does it as root)",
)
async def test_the_dashboard_draws_denials_top_sessions_overhead_and_journals_in_a_browser(gw: Gateway, tmp_path: Path) -> None:
    spend_on_two_tenants_and_two_models(gw)
    counted = deny(gw)
    api = panels(gw)
    top = api["top_sessions"][0]["session_id"]

    async with Chromium(tmp_path) as page:
        await page.send("Emulation.setDeviceMetricsOverride", width=1280, height=1500, deviceScaleFactor=1, mobile=False)
        await page.navigate(gw.base_url + "/admin/dashboard")
        await fill_token_and_load(page, ADMIN_TOKEN)
        await page.wait_for("document.getElementById('status').dataset.state === 'loaded'")
        shown = await page.evaluate(PANELS)
        assert set(shown["denial_bars"]) == set(counted) == set(shown["denial_legend"])
        assert shown["sessions"] == [[s["session_id"], s["cost_usd"], f"#journal={s['session_id']}"] for s in api["top_sessions"]]
        assert shown["p50"] == f"{api['overhead']['p50_ms']:.3f} ms" and shown["p99"] == f"{api['overhead']['p99_ms']:.3f} ms"
        assert shown["count"] == str(api["overhead"]["count"])
        assert shown["tools"] == {"rows": 0, "empty": "No tool spend in this window."}
        assert shown["journal_hidden"] is True

        await page.evaluate("document.querySelector('#top-sessions a.journal-link').click()")
        await page.wait_for("!document.getElementById('journal').hidden")
        journal = await page.evaluate(JOURNAL)
        assert journal["session"] == top
        assert journal["kinds"][0] == "state" and "response" in journal["kinds"]
        await page.evaluate("window.scrollTo(0, 0)")
        await page.screenshot(Path(os.environ.get("ABC_DASHBOARD_PANELS_SCREENSHOT", tmp_path / "panels.png")))
        assert [e for e in page.errors if not e.startswith("network:")] == []


PANELS = """(() => {
  const keys = (sel) => [...new Set([...document.querySelectorAll(sel)].map((e) => e.dataset.key))];
  const empty = document.getElementById('tools-empty');
  return {
    denial_bars: keys('#chart-denials rect[data-key]'),
    denial_legend: keys('#legend-denials li'),
    sessions: [...document.querySelectorAll('#top-sessions tbody tr')].map((tr) =>
      [tr.querySelector('code').textContent, tr.querySelector('.usd').textContent, tr.querySelector('a').getAttribute('href')]),
    p50: document.getElementById('overhead-p50').textContent,
    p99: document.getElementById('overhead-p99').textContent,
    count: document.getElementById('overhead-count').textContent,
    tools: { rows: document.querySelectorAll('#tools tbody tr').length, empty: empty.hidden ? null : empty.textContent },
    journal_hidden: document.getElementById('journal').hidden,
  };
})()"""

JOURNAL = """(() => ({
  session: document.getElementById('journal-session').textContent,
  kinds: [...document.querySelectorAll('#journal-entries tbody tr')].map((tr) => tr.dataset.kind),
}))()"""
