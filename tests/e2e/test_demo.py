"""`abc-gateway demo` on a bare machine: no ABC_* variables, no network, only config/."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.embedded_redis import socket_answers
from tests.conftest import ROOT
from tests.e2e.test_serve_process import clean_env, pids_mentioning

ABC_GATEWAY = Path(sys.executable).parent / "abc-gateway"


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    shutil.copytree(ROOT / "config", tmp_path / "config")
    yield tmp_path
    for pid in pids_mentioning(str(tmp_path)):  # a failed run must not leave its redis-server behind
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def run_demo(cwd: Path) -> str:
    begin = time.monotonic()
    done = subprocess.run([str(ABC_GATEWAY), "demo"], cwd=cwd, env=clean_env(),
                          capture_output=True, text=True, timeout=180)
    print(f"\ndemo ran in {time.monotonic() - begin:.2f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    return done.stdout


def section(out: str, title: str) -> str:
    """The lines under `== title...` up to the next section."""
    match = re.search(rf"^== {re.escape(title)}.*?$(.*?)(?=^== |\Z)", out, re.M | re.S)
    assert match, f"no section {title!r} in:\n{out}"
    return match.group(0)


def test_demo_runs_everything_and_cleans_up(workdir: Path) -> None:
    out = run_demo(workdir)

    assert "Redis at embedded redis-server" in out
    assert "compiled config/plans/support-bot.yaml -> asm_33387b12578f05741d0909a32438fb8b" in out
    plain = section(out, "step 'triage': a plain chat completion")
    assert re.search(r"assistant: \S", plain) and re.search(r"cost \$0\.\d{9}, budget left \$0\.\d{9}", plain)
    streamed = section(out, "step 'answer': streamed, the model calls a whitelisted tool")
    assert re.search(r"\d+ chunks; tool call lookup_order\(\{.*\"order_id\".*\}\); usage \d+ tokens", streamed)
    denied = section(out, "denied: a tool the plan never allowed")
    assert "HTTP 403: tool 'refund_order' is not in this session's VCS" in denied
    assert "HTTP 403: 'temperature' is pinned" in section(out, "denied: overriding a pinned parameter")
    spend = section(out, "session")
    assert re.search(r"spent \$0\.0*[1-9]\d*, reserved \$0\.000000000, remaining \$0\.\d{9}", spend)
    journal = section(out, "journal excerpt")
    assert re.search(r"#1\s+state", journal) and re.search(r"response\s+step=triage\s+cost=\d+n\$", journal)
    assert "stream" in journal and "capability_denied" in journal
    verify = json.loads(section(out, "journal verify").splitlines()[1])
    assert verify["integrity"] == "ok" and verify["entries"] == len(re.findall(r"^\s+#\d+", journal, re.M))
    # The MCP part: a stdio tool server the gateway started, driven with the MCP SDK's client.
    assert "['shop__lookup_order']" in section(out, "MCP tools/list through the gateway")
    assert "'status': 'shipped'" in section(out, "MCP tools/call shop__lookup_order")
    assert "(capability_denied)" in section(out, "denied: a case variant of the tool's name")
    assert "spent $0.001000000" in section(out, "tool session")
    suggested = section(out, "plan suggest support-bot: 1 session(s), 3 call(s)")
    assert "version 1 (asm_33387b12578f05741d0909a32438fb8b), 1 session(s) opened on it" in suggested
    assert "too little data: 1 session(s); budgets need 3" in suggested
    assert "  name: support-bot" in suggested and out.rstrip().endswith("next: [answer]")

    var = workdir / "var"
    key = var / "demo-signing-ed25519.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    assert (var / "appendonlydir").is_dir()
    assert not socket_answers(var / "redis.sock")
    assert pids_mentioning(str(var)) == []  # the embedded redis-server is gone

    # A second run reuses the key (tokens signed with it stay valid) and the AOF.
    pem = key.read_bytes()
    again = run_demo(workdir)
    assert "journal verify" in again and key.read_bytes() == pem
    assert "version 1 (asm_33387b12578f05741d0909a32438fb8b), 2 session(s) opened on it" in again
    assert pids_mentioning(str(var)) == []
