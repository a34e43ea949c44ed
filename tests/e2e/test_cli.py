"""The `abc-gateway` console script: offline compile, and admin / replay / journal commands
against a running gateway, as an operator would type them."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import yaml

from gateway.cli import main
from tests.conftest import ADMIN_TOKEN, OPEN_PLAN, ROOT, Gateway

ABC_GATEWAY = Path(sys.executable).parent / "abc-gateway"
SUPPORT_BOT = ROOT / "config" / "plans" / "support-bot.yaml"
SUPPORT_BOT_ID = "asm_33387b12578f05741d0909a32438fb8b"


def cli_env(admin_token: str | None = ADMIN_TOKEN) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABC_")}
    if admin_token is not None:
        env["ABC_ADMIN_TOKEN"] = admin_token
    return env


def run(*args: str, cwd: Path = ROOT, admin_token: str | None = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ABC_GATEWAY), *args], cwd=cwd, env=cli_env(admin_token),
                          capture_output=True, text=True, timeout=60)


def ok(*args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    done = run(*args, **kwargs)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return done


def test_compile_prints_the_assembly_and_its_golden_id() -> None:
    done = ok("compile", str(SUPPORT_BOT.relative_to(ROOT)))
    assert f"assembly_id: {SUPPORT_BOT_ID}" in done.stderr.splitlines()
    assembly = json.loads(done.stdout)
    # The printed JSON is the Assembly itself: re-canonicalised, it hashes to the id.
    digest = hashlib.sha256(orjson.dumps(assembly, option=orjson.OPT_SORT_KEYS)).hexdigest()
    assert "asm_" + digest[:32] == SUPPORT_BOT_ID
    assert [s["id"] for s in assembly["steps"]] == ["triage", "answer"]


def test_compile_of_an_invalid_plan_lists_every_problem_with_its_path(tmp_path: Path) -> None:
    plan = {
        "name": "broken",
        "tenant": "acme",
        "models": [{"name": "no-such-model", "max_tokens": 16}],
        "budget": {"usd": 1},
        "steps": [{"id": "a", "model": "gpt-4o-mini", "tools": ["ghost"], "next": ["nowhere"]}],
    }
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(plan), encoding="utf-8")
    done = run("compile", str(path))
    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    for where in ("models.0.name", "steps.0.model", "steps.0.tools.0", "steps.0.next.0"):
        assert where in done.stderr, where


def test_compile_of_a_plan_with_unknown_fields_names_them(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**OPEN_PLAN, "budjet": {"usd": 1}, "ttl_s": -5}), encoding="utf-8")
    done = run("compile", str(path))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "budjet" in done.stderr and "ttl_s" in done.stderr


def test_the_admin_commands_drive_a_session_from_the_terminal(gateway: Gateway, tmp_path: Path) -> None:
    url = ["--url", gateway.base_url]
    compiled = json.loads(ok("admin", *url, "compile", str(SUPPORT_BOT)).stdout)
    assert compiled["assembly_id"] == SUPPORT_BOT_ID

    created = json.loads(ok("admin", *url, "sessions", "create", "--assembly-id", SUPPORT_BOT_ID, "--budget-usd", "0.5",
                            "--ttl-s", "600", "--label", "who=cli", "--label", "ticket=a=b").stdout)
    session_id, token = created["session_id"], created["token"]
    assert session_id.startswith("sess_") and token.count(".") == 2  # a JWT

    client = openai.OpenAI(base_url=gateway.openai_base, api_key=token, max_retries=0)
    assert client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]).choices

    shown = json.loads(ok("admin", *url, "sessions", "show", session_id).stdout)
    assert shown["state"] == "active" and shown["current_step"] == "triage" and shown["requests"] == 1
    assert shown["spent_nanos"] > 0 and shown["budget_usd"] == "0.500000000"
    assert shown["labels"] == {"who": "cli", "ticket": "a=b"}

    table = ok("admin", *url, "costs", "--group-by", "session").stdout
    assert table.startswith("cost by session, ")
    assert session_id in table and "TOTAL" in table and "100.0%" in table
    report = json.loads(ok("admin", *url, "costs", "--group-by", "tenant", "--json").stdout)
    assert [row["key"] for row in report["rows"]] == ["acme"] and report["total_nanos"] == shown["spent_nanos"]

    revoked = json.loads(ok("admin", *url, "sessions", "revoke", session_id).stdout)
    assert revoked == {"session_id": session_id, "state": "revoked"}
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "again"}])
    assert json.loads(ok("admin", *url, "sessions", "show", session_id).stdout)["state"] == "revoked"


def test_replay_verify_and_journal_export_against_a_live_gateway(gateway: Gateway, tmp_path: Path) -> None:
    opened = gateway.open_session(OPEN_PLAN)
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=opened["token"], max_retries=0)
    client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "one"}])
    assert list(client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "two"}],
                                               stream=True))
    session_id = opened["session_id"]
    url = ["--url", gateway.base_url]

    verified = ok("replay", session_id, "--mode", "verify", *url)
    header, _rule, row = verified.stdout.splitlines()[:3]
    assert header.split() == ["integrity", "entries", "first_broken_seq", "first_broken_id", "reason"]
    assert row.split()[:2] == ["ok", "5"]  # opened + two requests and their answers

    exported = tmp_path / "journal.jsonl"
    with exported.open("w", encoding="utf-8") as out:
        done = subprocess.run([str(ABC_GATEWAY), "journal", "export", session_id, *url],
                              cwd=ROOT, env=cli_env(), stdout=out, stderr=subprocess.PIPE, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in exported.read_text(encoding="utf-8").splitlines()]
    assert f"exported {len(lines)} entries of {session_id}" in done.stderr
    assert len(lines) == 5
    kinds = [line["fields"]["kind"] for line in lines]
    assert kinds == ["state", "request", "response", "request", "stream"]
    assert opened["token"] not in exported.read_text(encoding="utf-8")

    recorded = ok("replay", session_id, "--mode", "recorded", *url)
    assert "2 calls: 2 match, 0 differ" in recorded.stdout


def test_admin_commands_fail_in_one_line_without_a_traceback(gateway: Gateway) -> None:
    url = ["--url", gateway.base_url]
    no_token = run("admin", *url, "sessions", "show", "sess_x", admin_token=None)
    assert no_token.returncode == 2 and no_token.stderr.strip() == "abc-gateway: ABC_ADMIN_TOKEN is not set"

    wrong = run("admin", *url, "sessions", "show", "sess_x", admin_token="wrong-token")
    assert wrong.returncode == 2 and "HTTP 401" in wrong.stderr and "Traceback" not in wrong.stderr

    missing = run("admin", *url, "sessions", "show", "sess_missing")
    assert missing.returncode == 2 and "HTTP 404" in missing.stderr and "session_not_found" in missing.stderr


def test_admin_errors_in_process(
    gateway: Gateway, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ABC_ADMIN_TOKEN", ADMIN_TOKEN)
    assert main(["admin", "--url", "http://127.0.0.1:9", "sessions", "show", "sess_x"]) == 2
    assert "cannot reach the gateway at http://127.0.0.1:9" in capsys.readouterr().err

    assert main(["admin", "--url", gateway.base_url, "sessions", "create", "--assembly-id", "asm_" + "0" * 32]) == 2
    err = capsys.readouterr().err
    assert err.startswith("abc-gateway: POST /admin/v1/sessions: HTTP 404") and err.count("\n") == 1

    assert main(["replay", "sess_missing", "--mode", "verify", "--url", gateway.base_url]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_compile_uses_the_settings_named_by_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings: dict[str, Any] = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text(encoding="utf-8"))
    settings["models"] = [m for m in settings["models"] if m["name"] != "gpt-4o-mini"]
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(settings), encoding="utf-8")
    assert main(["compile", str(SUPPORT_BOT), "--config", str(config)]) == 2
    assert "unknown model 'gpt-4o-mini'" in capsys.readouterr().err
    assert main(["compile", str(SUPPORT_BOT), "--config", str(ROOT / "config" / "gateway.yaml")]) == 0
    assert f"assembly_id: {SUPPORT_BOT_ID}" in capsys.readouterr().err
