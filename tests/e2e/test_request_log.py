"""The request log of a real `abc-gateway serve`: one JSON line per request on stderr,
after a known mix of calls, with the right fields and no secret or prompt anywhere."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.money import NANOS_PER_USD
from tests.e2e.test_serve_process import SETTINGS, Launcher, admin

PRICE = {"input_per_mtok": 1.0, "output_per_mtok": 2.0}
MODELS = [*SETTINGS["models"], *({"name": n, "provider": "mock", "price": PRICE} for n in ("mock-error", "mock-cut"))]
PLAN: dict[str, Any] = {
    "name": "log-test",
    "tenant": "acme",
    "models": [{"name": n, "max_tokens": 64} for n in ("gpt-4o-mini", "mock-error", "mock-cut")],
    "budget": {"usd": 1.0},
}
FIELDS = {
    "ts", "level", "msg", "request_id", "session_id", "assembly_id", "tenant", "route", "model", "served_by",
    "status", "code", "tokens_in", "tokens_out", "cost_nanos", "gateway_ms", "upstream_ms", "ttft_ms", "stream",
}
FORGED = 'gpt-4o-mini\n{"level":"info","msg":"request","status":200}\x1b[31m'


class ModelsLauncher(Launcher):
    def write_settings(self, data_dir: Path, **extra: Any) -> Path:
        return super().write_settings(data_dir, models=MODELS, **extra)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = ModelsLauncher(tmp_path)
    yield launcher
    launcher.cleanup()


def usd_nanos(text: str) -> int:
    whole, _, frac = text.partition(".")
    return int(whole) * NANOS_PER_USD + int(frac.ljust(9, "0"))


def test_every_request_is_one_json_line_with_its_outcome_and_no_secret(launcher: Launcher) -> None:
    served = launcher.serve()
    prompt_canary = "PROMPT-CANARY-" + secrets.token_hex(8)
    key_canary = "sk-KEY-CANARY-" + secrets.token_hex(8)
    token_canary = "TOKEN-CANARY-" + secrets.token_hex(8)
    with admin(served.base_url) as a:
        assembly_id = a.post("/admin/v1/plans/compile", json=PLAN).json()["assembly_id"]
        opened = a.post("/admin/v1/sessions", json={"assembly_id": assembly_id}).json()
        poor = a.post("/admin/v1/sessions", json={"assembly_id": assembly_id, "budget_usd": 0.000001}).json()
    messages = [{"role": "user", "content": f"hello {prompt_canary}"}]
    calls: dict[str, tuple[str, dict[str, Any]]] = {  # request id -> (token, body)
        "ok": (opened["token"], {"model": "gpt-4o-mini", "messages": messages}),
        "streamed": (opened["token"], {"model": "gpt-4o-mini", "messages": messages, "stream": True}),
        "override": (opened["token"], {"model": "gpt-4o-mini", "messages": messages, "api_key": key_canary}),
        "badtoken": (token_canary, {"model": "gpt-4o-mini", "messages": messages}),
        "budget": (poor["token"], {"model": "gpt-4o-mini", "messages": messages}),
        "upstream": (opened["token"], {"model": "mock-error", "messages": messages}),
        "cut": (opened["token"], {"model": "mock-cut", "messages": messages, "stream": True}),
        "forged": (opened["token"], {"model": FORGED, "messages": messages}),
    }
    answers: dict[str, httpx.Response] = {}
    with httpx.Client(base_url=served.base_url, timeout=10) as client:
        for name, (token, body) in calls.items():
            headers = {"Authorization": f"Bearer {token}", "x-request-id": f"req-{name}"}
            answers[name] = client.post("/v1/chat/completions", json=body, headers=headers)
        assert client.get("/healthz").status_code == 200  # a probe: debug level, not written
    assert served.stop() == 0
    err = served.stderr()

    lines = [json.loads(line) for line in err.splitlines()]  # every line is one JSON object
    started = [line for line in lines if line["msg"] == "listening"]
    assert len(started) == 1
    assert started[0]["listen"] == served.base_url and started[0]["providers"] == ["mock:mock"]
    assert started[0]["config"].endswith("gateway.yaml") and started[0]["redis"].startswith("unix://")
    logged = {line["request_id"]: line for line in lines if line["msg"] == "request" and line["route"] == "/v1/chat/completions"}
    assert set(logged) == {f"req-{name}" for name in calls}
    for line in logged.values():
        assert set(line) == FIELDS and line["route"] == "/v1/chat/completions"
    log = {name: logged[f"req-{name}"] for name in calls}

    ok = log["ok"]
    assert (ok["status"], ok["code"], ok["level"], ok["stream"]) == (200, None, "info", False)
    assert (ok["session_id"], ok["assembly_id"], ok["tenant"]) == (opened["session_id"], assembly_id, "acme")
    assert ok["model"] == ok["served_by"] == "gpt-4o-mini"
    usage = answers["ok"].json()["usage"]
    assert (ok["tokens_in"], ok["tokens_out"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert ok["cost_nanos"] == usd_nanos(answers["ok"].headers["x-abc-cost-usd"]) > 0
    assert ok["gateway_ms"] > 0 and ok["upstream_ms"] >= 0 and ok["ttft_ms"] is None

    streamed = log["streamed"]
    assert (streamed["status"], streamed["stream"], streamed["code"]) == (200, True, None)
    assert streamed["ttft_ms"] is not None and streamed["tokens_out"] > 0 and streamed["cost_nanos"] > 0

    for name, status, code in (
        ("override", 403, "capability_denied"), ("badtoken", 401, "invalid_api_key"),
        ("budget", answers["budget"].status_code, "budget_exceeded"), ("upstream", 502, "upstream_error"),
    ):
        assert answers[name].status_code == status and answers[name].json()["error"]["code"] == code, name
        assert (log[name]["status"], log[name]["code"], log[name]["level"]) == (status, code, "warning" if status < 500 else "error"), name
    assert log["badtoken"]["session_id"] is None and log["override"]["session_id"] == opened["session_id"]
    assert log["budget"]["status"] in (402, 429) and log["budget"]["cost_nanos"] is None
    assert log["upstream"]["served_by"] == "mock-error" and log["upstream"]["cost_nanos"] == 0

    cut = log["cut"]  # the stream had started: 200 on the wire, the failure in `code`
    assert (cut["status"], cut["code"], cut["stream"]) == (200, "upstream_error", True)
    assert cut["tokens_out"] > 0 and cut["cost_nanos"] > 0

    assert log["forged"]["model"] == FORGED and log["forged"]["status"] == answers["forged"].status_code >= 400
    assert "\x1b" not in err and err.count('"msg":"request"') == len(logged) + 3  # + compile and two sessions
    for secret in (opened["token"], poor["token"], token_canary, key_canary, prompt_canary, "Authorization"):
        assert secret not in err
