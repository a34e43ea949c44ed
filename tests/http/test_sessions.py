"""Opening, showing and revoking sessions on the admin API: a budget may be lowered, never
raised; TTL, tenant and labels are kept; unknown sessions are 404."""

from __future__ import annotations

import base64
import json
import time
from decimal import Decimal
from typing import Any

import openai
import pytest

from tests.conftest import BOTH_REDIS, OPEN_PLAN, Gateway
from tests.openai_support import openai_error, sdk

pytestmark = BOTH_REDIS  # each test runs on a single Redis and on a Redis Cluster

HELLO = [{"role": "user", "content": "hello"}]
PLAN: dict[str, Any] = {**OPEN_PLAN, "name": "sessions", "budget": {"usd": 1.0}, "ttl_s": 600}



@pytest.fixture
def assembly_id(gw: Gateway) -> str:
    return gw.compile(PLAN)


def _open(gw: Gateway, **body: Any) -> Any:
    return gw.admin.post("/admin/v1/sessions", json=body)


def _token_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


def test_a_lower_budget_is_accepted_and_shown(gw: Gateway, assembly_id: str) -> None:
    response = _open(gw, assembly_id=assembly_id, budget_usd=0.25)
    assert response.status_code == 201
    opened = response.json()
    assert Decimal(opened["budget_usd"]) == Decimal("0.25")
    shown = gw.session(opened["session_id"])
    assert Decimal(shown["budget_usd"]) == Decimal(shown["remaining_usd"]) == Decimal("0.25")
    assert shown["state"] == "active" and shown["assembly_id"] == assembly_id


def test_the_assemblys_own_budget_is_the_default_and_the_ceiling(
    gw: Gateway, assembly_id: str
) -> None:
    default = _open(gw, assembly_id=assembly_id).json()
    assert Decimal(default["budget_usd"]) == Decimal("1")
    assert _open(gw, assembly_id=assembly_id, budget_usd=1.0).status_code == 201
    error = openai_error(_open(gw, assembly_id=assembly_id, budget_usd=1.01), 400)
    assert error["param"] == "budget_usd"
    openai_error(_open(gw, assembly_id=assembly_id, budget_usd=-1), 400)


def test_a_session_budget_is_enforced(gw: Gateway, assembly_id: str) -> None:
    opened = _open(gw, assembly_id=assembly_id, budget_usd=0.000001).json()
    with pytest.raises(openai.RateLimitError) as caught:
        sdk(gw, opened["token"]).chat.completions.create(model="gpt-4o-mini", messages=HELLO)
    assert caught.value.status_code == 429 and caught.value.code == "budget_exceeded"
    assert gw.session(opened["session_id"])["spent_nanos"] == 0


def test_spend_shows_on_the_session(gw: Gateway, assembly_id: str) -> None:
    opened = _open(gw, assembly_id=assembly_id).json()
    raw = sdk(gw, opened["token"]).chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=HELLO
    )
    shown = gw.session(opened["session_id"])
    assert shown["requests"] == 1 and shown["spent_nanos"] > 0 and shown["reserved_nanos"] == 0
    assert Decimal(shown["spent_usd"]) == Decimal(raw.headers["x-abc-cost-usd"])
    assert Decimal(shown["remaining_usd"]) == Decimal(raw.headers["x-abc-budget-remaining-usd"])
    assert Decimal(shown["remaining_usd"]) == Decimal("1") - Decimal(shown["spent_usd"])


def test_ttl_sets_the_expiry_of_the_session_and_its_token(gw: Gateway, assembly_id: str) -> None:
    before = int(time.time())
    opened = _open(gw, assembly_id=assembly_id, ttl_s=120).json()
    assert before + 120 <= opened["expires_at"] <= int(time.time()) + 120
    assert _token_claims(opened["token"])["exp"] == opened["expires_at"]
    assert gw.session(opened["session_id"])["expires_at"] == opened["expires_at"]
    default = _open(gw, assembly_id=assembly_id).json()
    assert default["expires_at"] >= before + 600  # the plan's ttl_s
    openai_error(_open(gw, assembly_id=assembly_id, ttl_s=0), 400)
    openai_error(_open(gw, assembly_id=assembly_id, ttl_s=10**9), 400)


def test_labels_and_tenant_are_kept(gw: Gateway, assembly_id: str) -> None:
    labels = {"team": "support", "ticket": "T-1"}
    opened = _open(gw, assembly_id=assembly_id, labels=labels, tenant="acme").json()
    shown = gw.session(opened["session_id"])
    assert shown["labels"] == labels and shown["tenant"] == "acme"
    openai_error(_open(gw, assembly_id=assembly_id, labels={"n": 1}), 400)
    assert (
        openai_error(_open(gw, assembly_id=assembly_id, tenant="someone-else"), 400)["param"]
        == "tenant"
    )


def test_bad_session_requests_are_400_or_404(gw: Gateway, assembly_id: str) -> None:
    openai_error(_open(gw, assembly_id=assembly_id, colour="blue"), 400)
    openai_error(_open(gw, assembly_id="not-an-assembly"), 400)
    openai_error(_open(gw, assembly_id="asm_" + "0" * 32), 404)
    openai_error(gw.admin.post("/admin/v1/sessions", content=b"{", headers={"Content-Type": "application/json"}), 400)


def test_unknown_sessions_are_404(gw: Gateway) -> None:
    openai_error(gw.admin.post("/admin/v1/sessions/sess_nope/revoke"), 404)
    openai_error(gw.admin.get("/admin/v1/sessions/sess_nope"), 404)


def test_revoking_shows_on_the_session_and_repeats_harmlessly(
    gw: Gateway, assembly_id: str
) -> None:
    opened = _open(gw, assembly_id=assembly_id).json()
    for _ in range(2):
        response = gw.admin.post(f"/admin/v1/sessions/{opened['session_id']}/revoke")
        assert response.status_code == 200 and response.json()["state"] == "revoked"
    assert gw.session(opened["session_id"])["state"] == "revoked"
