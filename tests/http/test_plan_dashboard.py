"""The plan page at /admin/dashboard/plans: a static shell under a strict policy, and in
headless Chromium it draws a plan's lineage, latest suggestions and last evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.chromium import CHROMIUM, Chromium
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.openai_support import sdk

PLAN: dict[str, Any] = {
    "name": "paged-bot",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 256}],
    "budget": {"usd": 1},
}


def test_the_plan_page_is_a_data_free_shell_under_a_strict_policy(gw: Gateway) -> None:
    response = httpx.get(gw.base_url + "/admin/dashboard/plans")
    assert response.status_code == 200 and response.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(p.strip().split(" ", 1) for p in response.headers["content-security-policy"].split(";"))
    assert policy["default-src"] == "'none'" and policy["connect-src"] == "'self'"
    assert policy["script-src"].startswith("'sha256-") and "unsafe" not in policy["script-src"]
    assert "://" not in response.text  # nothing loaded from elsewhere
    assert httpx.get(gw.base_url + "/admin/v1/plans/paged-bot").status_code == 401


@pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"headless Chromium is not installed at {CHROMIUM}: apt-get install chromium (scripts/dev setup does it as root)",
)
async def test_the_plan_page_shows_lineage_suggestions_and_the_last_evaluation_with_its_live_part(
    gw: Gateway, tmp_path: Path
) -> None:
    first = gw.compile(PLAN)
    second = gw.compile({**PLAN, "budget": {"usd": 0.5}})
    opened = gw.open_session(second)
    with sdk(gw, opened["token"]) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    suggestions = gw.admin.get("/admin/v1/plans/paged-bot/suggestions").json()
    evaluation = gw.admin.post("/admin/v1/plans/evaluate", json={
        "plan": PLAN, "sessions": [opened["session_id"]], "live": {"budget_usd": 0.25}}).json()

    async with Chromium(tmp_path) as page:
        await page.navigate(gw.base_url + "/admin/dashboard/plans?plan=paged-bot")
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(ADMIN_TOKEN)};"
            "document.getElementById('load').click()"
        )
        await page.wait_for("document.getElementById('status').dataset.state === 'loaded'")
        shown = await page.evaluate("""(() => {
          const rows = (id) => [...document.querySelectorAll(`#${id} tbody tr`)].map((tr) => [...tr.cells].map((c) => c.textContent));
          return { versions: rows('versions'), changes: rows('changes'), evaluation: rows('evaluation'),
                   yaml: document.getElementById('yaml').textContent,
                   note: document.getElementById('evaluation-note').textContent };
        })()""")
        assert [e for e in page.errors if not e.startswith("network:")] == []
    assert [r[:3] for r in shown["versions"]] == [["2", second, first], ["1", first, "–"]]
    assert shown["versions"][0][5] == "1"  # the live evaluation's session is not one of the plan's
    assert [r[1] for r in shown["changes"]] == [c["summary"] for c in suggestions["changes"]]
    assert shown["yaml"] == suggestions["yaml"]
    summary = evaluation["sessions"][0]
    assert shown["evaluation"] == [[opened["session_id"], "1", "1", "0", summary["spend_actual_usd"], summary["spend_usd"], "no"]]
    totals = evaluation["live"]["totals"]
    assert shown["note"].endswith(
        f" Live (cap $0.250000000): 1 run, 0 not sent as denied; ${totals['live_spend_usd']} live against "
        f"${totals['recorded_spend_usd']} recorded.")
