"""Overload: past the in-flight cap a real `abc-gateway serve` process answers a clean 503
with Retry-After, its memory stays bounded, and it serves normally once the burst is over."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ADMIN_TOKEN
from tests.e2e.test_serve_process import Served, secrets_env, wait_ready
from tests.redis_proc import free_port

ABC_GATEWAY = Path(sys.executable).parent / "abc-gateway"
CAP = 16
PLAN: dict[str, Any] = {
    "name": "overload", "models": [{"name": "gpt-4o-mini", "max_tokens": 16}, {"name": "mock-slow", "max_tokens": 16}],
    "budget": {"usd": 100.0},
}
PROMPT = "x" * 20_000  # every request in the burst carries 20 kB


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def served(tmp_path: Path, redis_url: str) -> Iterator[Served]:
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "providers": [{"name": "mock", "kind": "mock"}],
        "models": [{"name": n, "provider": "mock", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}} for n in ("gpt-4o-mini", "mock-slow")],
        "server": {"max_in_flight": CAP, "retry_after_s": 2},
    }))
    port = free_port()
    err = tmp_path / "serve.err"
    with err.open("wb") as stderr:
        process = subprocess.Popen(
            [str(ABC_GATEWAY), "serve", "--config", str(config), "--port", str(port)],
            cwd=tmp_path, env=secrets_env(ABC_REDIS_URL=redis_url), stdout=subprocess.DEVNULL, stderr=stderr,
        )
    served = Served(process, f"http://127.0.0.1:{port}", port, tmp_path, err, time.monotonic())
    try:
        wait_ready(served)
        yield served
    finally:
        process.terminate()
        process.wait(timeout=15)


def token_for(base_url: str) -> str:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10) as admin:
        asm = admin.post("/admin/v1/plans/compile", json=PLAN).json()["assembly_id"]
        token: str = admin.post("/admin/v1/sessions", json={"assembly_id": asm}).json()["token"]
        return token


async def burst(base_url: str, token: str, n: int) -> list[httpx.Response]:
    body = {"model": "mock-slow", "messages": [{"role": "user", "content": PROMPT}]}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30) as client:
        calls = [client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}) for _ in range(n)]
        return list(await asyncio.gather(*calls))


def test_four_times_the_cap_gives_503s_with_retry_after_bounded_memory_and_recovery(served: Served) -> None:
    token = token_for(served.base_url)
    headers = {"Authorization": f"Bearer {token}"}
    hello = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
    assert httpx.post(served.base_url + "/v1/chat/completions", json=hello, headers=headers, timeout=10).status_code == 200
    before = rss_kib(served.process.pid)

    responses = asyncio.run(burst(served.base_url, token, 4 * CAP))
    after = rss_kib(served.process.pid)
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 503]
    print(f"\nburst of {4 * CAP} at cap {CAP}: {statuses.count(200)} served, {len(refused)} refused; "
          f"gateway RSS {before / 1024:.1f} MiB before, {after / 1024:.1f} MiB after")
    assert set(statuses) <= {200, 503}, statuses  # no 5xx of another kind
    assert 1 <= statuses.count(200) and len(refused) >= 2 * CAP
    for r in refused:
        assert r.headers["retry-after"] == "2"
        assert r.json()["error"]["code"] == "overloaded"
    assert after - before < 64 * 1024, "RSS grew by more than 64 MiB over one burst"

    # The burst is over: normal service again, within a second.
    deadline = time.monotonic() + 1.0
    while True:
        answered = httpx.post(served.base_url + "/v1/chat/completions", json=hello, headers=headers, timeout=10)
        if answered.status_code == 200 or time.monotonic() > deadline:
            break
    print(f"first normal answer {1.0 - (deadline - time.monotonic()):.3f} s after the burst")
    assert answered.status_code == 200, answered.text
    metrics = httpx.get(served.base_url + "/metrics", timeout=10).text
    assert 'abc_overload_refusals_total{what="request"}' in metrics
