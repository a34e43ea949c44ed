"""Budgets hold across replicas: three gateway processes on one Redis, 200 concurrent
requests on a session whose budget covers five worst cases. And a replica killed mid-request
leaves a reservation the reaper charges in full, once.

Each admitted request here costs exactly its worst case (the mock is cut at max_tokens and
the gateway's prompt count equals the mock's), so no refund ever frees room for a sixth:
the number admitted is fixed by the budget, not by timing.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aredis
import yaml

from gateway import redis_keys
from gateway.money import NANOS_PER_USD, cost_nanos, nanos_to_usd_str
from gateway.state.ledger import Ledger
from gateway.state.reaper import reap_due
from gateway.tokenizer import count_chat_prompt
from tests.conftest import ADMIN_TOKEN, ROOT, SIGNING_SECRET
from tests.openai_support import bearer
from tests.redis_proc import client_for, free_port, is_cluster_url

REPLICAS = 3
REQUESTS = 200
MAX_TOKENS = 8
HELLO = [{"role": "user", "content": "how much is left?"}]
PLAN: dict[str, Any] = {
    "name": "race",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": MAX_TOKENS}, {"name": "mock-slow", "max_tokens": 16}],
    "budget": {"usd": 1},
}


class Replica:
    """`abc-gateway serve` as a child process."""

    def __init__(self, config: Path, redis_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "ABC_REDIS_URL": redis_url,
            "ABC_ADMIN_TOKEN": ADMIN_TOKEN,
            "ABC_SIGNING_KEY": SIGNING_SECRET,
            **({"ABC_REDIS_CLUSTER": "1"} if is_cluster_url(redis_url) else {}),
        }
        command = [str(Path(sys.executable).with_name("abc-gateway")), "serve", "--config", str(config), "--port", str(self.port)]
        # stderr to a file: a pipe nobody reads blocks a chatty replica, and the log is evidence.
        self.log = config.parent / f"replica-{self.port}.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"replica exited: {self.log.read_text(errors='replace')[-2000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("replica did not become ready")

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def write_config(tmp_path: Path, **sections: Any) -> Path:
    settings = yaml.safe_load((ROOT / "config" / "gateway.yaml").read_text())
    settings["log"] = {"level": "error"}  # the replicas' stderr is a pipe nobody reads while they run
    settings.update(sections)
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def start_replicas(config: Path, redis_url: str, count: int) -> list[Replica]:
    replicas = [Replica(config, redis_url) for _ in range(count)]  # started side by side
    for replica in replicas:
        replica.wait_ready()
    return replicas


@pytest.fixture
def replicas(tmp_path: Path, redis_url: str) -> Iterator[list[Replica]]:
    # ~70 requests in flight per replica: more Redis connections than the default 64, whose
    # pool refuses (not queues) the excess, and a generous timeout: on a busy machine a Redis
    # call can take a while. Pool sizing and timeouts are not what this test is about.
    config = write_config(tmp_path, redis={"max_connections": 256, "timeout_ms": 10_000})
    started = start_replicas(config, redis_url, REPLICAS)
    yield started
    for replica in started:
        replica.stop()


def admin(replica: Replica) -> httpx.Client:
    return httpx.Client(base_url=replica.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)


def journal(redis_url: str, session_id: str) -> list[dict[bytes, bytes]]:
    client = client_for(redis_url)
    try:
        return [fields for _, fields in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()


def worst_case(assembly: dict[str, Any]) -> int:
    """(prompt tokens + max_tokens) at the Assembly's frozen prices."""
    grant = assembly["models"]["gpt-4o-mini"]
    prompt = count_chat_prompt(HELLO, grant["encoding"])
    price = grant["price"]
    return cost_nanos(prompt, price["input_nanos_per_mtok"]) + cost_nanos(MAX_TOKENS, price["output_nanos_per_mtok"])


async def fire(replicas: list[Replica], token: str) -> list[httpx.Response]:
    clients = [httpx.AsyncClient(base_url=r.url, timeout=60, limits=httpx.Limits(max_connections=100)) for r in replicas]
    try:
        body = {"model": "gpt-4o-mini", "messages": HELLO}
        start = asyncio.Event()

        async def one(i: int) -> httpx.Response:
            await start.wait()
            return await clients[i % len(clients)].post("/v1/chat/completions", json=body, headers=bearer(token))

        tasks = [asyncio.ensure_future(one(i)) for i in range(REQUESTS)]
        await asyncio.sleep(0)
        start.set()
        return list(await asyncio.gather(*tasks))
    finally:
        for client in clients:
            await client.aclose()


def test_replicas_never_overspend_a_shared_session(replicas: list[Replica], redis_url: str) -> None:
    with admin(replicas[0]) as a:
        compiled = a.post("/admin/v1/plans/compile", json=PLAN).json()
        worst = worst_case(compiled["assembly"])
        budget = 5 * worst + worst // 2
        opened = a.post("/admin/v1/sessions", json={"assembly_id": compiled["assembly_id"], "budget_usd": str(Decimal(budget) / NANOS_PER_USD)})
        assert opened.status_code == 201, opened.text
        session_id, token = opened.json()["session_id"], opened.json()["token"]
        assert a.get(f"/admin/v1/sessions/{session_id}").json()["budget_usd"] == nanos_to_usd_str(budget)

    started = time.perf_counter()
    responses = asyncio.run(fire(replicas, token))
    elapsed = time.perf_counter() - started

    admitted = [r for r in responses if r.status_code == 200]
    denied = [r for r in responses if r.status_code == 429]
    odd = [(r.status_code, r.text) for r in responses if r.status_code not in (200, 429)]
    assert len(admitted) + len(denied) == REQUESTS, odd[:3]
    for r in denied:
        assert r.json()["error"]["code"] == "budget_exceeded", r.text
    charged = sum(int(Decimal(r.headers["x-abc-cost-usd"]) * NANOS_PER_USD) for r in admitted)
    with admin(replicas[1]) as a:  # any replica sees the same session
        shown = a.get(f"/admin/v1/sessions/{session_id}").json()
    entries = journal(redis_url, session_id)
    estimates = {int(e[b"est_nanos"]) for e in entries if e[b"kind"] == b"request"}

    print(
        f"\nrace: {REPLICAS} replicas, {REQUESTS} concurrent requests in {elapsed:.2f}s: "
        f"admitted {len(admitted)}, denied {len(denied)} (429 budget_exceeded); "
        f"worst case {worst} nanos, budget {budget} nanos, spent {shown['spent_nanos']} nanos, "
        f"sum of x-abc-cost-usd {charged} nanos, reserved {shown['reserved_nanos']}"
    )
    assert estimates == {worst}  # the gateway reserved exactly the worst case we computed
    assert shown["spent_nanos"] <= budget
    assert len(admitted) * worst <= budget
    assert len(admitted) == 5  # every admitted call cost its full worst case: room for five
    assert charged == shown["spent_nanos"]
    assert shown["reserved_nanos"] == 0
    assert shown["requests"] == len(admitted)
    assert len({r.headers["x-request-id"] for r in responses}) == REQUESTS
    # Admissions and denials came from every replica, not one.
    served = {r.request.url.port for r in responses}
    assert served == {replica.port for replica in replicas}


def test_a_replica_killed_mid_request_leaves_a_reservation_the_reaper_charges_once(tmp_path: Path, redis_url: str) -> None:
    config = write_config(tmp_path, budget={"reservation_ttl_s": 1, "reaper_interval_s": 3600})
    (replica,) = start_replicas(config, redis_url, 1)
    try:
        with admin(replica) as a:
            compiled = a.post("/admin/v1/plans/compile", json=PLAN).json()
            opened = a.post("/admin/v1/sessions", json={"assembly_id": compiled["assembly_id"]}).json()
        body = {"model": "mock-slow", "messages": HELLO}  # the mock answers after 2 s

        async def doomed() -> None:
            async with httpx.AsyncClient(base_url=replica.url, timeout=10) as client:
                call = asyncio.ensure_future(client.post("/v1/chat/completions", json=body, headers=bearer(opened["token"])))
                deadline = time.monotonic() + 5
                while not any(e[b"kind"] == b"request" for e in journal(redis_url, opened["session_id"])):
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.02)
                replica.kill()  # crash with the request reserved, unsettled
                with pytest.raises(httpx.HTTPError):
                    await call

        asyncio.run(doomed())
    finally:
        replica.stop()

    estimate = next(int(e[b"est_nanos"]) for e in journal(redis_url, opened["session_id"]) if e[b"kind"] == b"request")

    async def reap() -> tuple[int, int, dict[str, int]]:
        client = aredis.Redis.from_url(redis_url)
        ledger = Ledger(client, reservation_ttl_s=1, journal_retention_s=3600)
        try:
            first = await reap_due(client, ledger, now=time.time() + 2)
            second = await reap_due(client, ledger, now=time.time() + 3600)
            raw = await client.hgetall(redis_keys.session(opened["session_id"]))
            return first, second, {k.decode(): int(v) for k, v in raw.items() if v.isdigit()}
        finally:
            await client.aclose()

    first, second, session = asyncio.run(reap())
    assert (first, second) == (1, 0)
    assert (session["spent_nanos"], session["reserved_nanos"]) == (estimate, 0)
    last = journal(redis_url, opened["session_id"])[-1]
    assert (last[b"kind"], int(last[b"cost_nanos"])) == (b"aborted", estimate)
