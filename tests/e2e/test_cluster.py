"""Redis Cluster for real: budgets across replicas and slots, and a master killed under load.

- Three gateway processes on a 3-master cluster, 200 concurrent requests on one session
  while two more sessions of the same tenant spend too, under a tenant daily cap smaller
  than the sessions' budgets together: no session and no tenant is overspent, and the
  journals equal the counters to the nano-dollar. The session and the tenant live in
  different slots (different nodes, most likely): the two-slot protocol is what holds.
- A cluster with a replica per master; the master holding a session is killed with
  SIGKILL while requests flow. During the failover the gateway answers 503 and nothing
  else of the 5xx family; once the replica is promoted (and the old master is back as its
  replica, so settlements can be acknowledged again) it serves again without a restart;
  and every answer a client received is in the journal.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway import redis_keys
from gateway.capability import Keyring
from gateway.money import NANOS_PER_USD
from gateway.state.ledger import Ledger
from gateway.state.reaper import reap_due
from tests.conftest import OPEN_PLAN, Gateway, make_settings, start_gateway
from tests.http.test_budget_race import (
    HELLO,
    PLAN,
    Replica,
    admin,
    start_replicas,
    worst_case,
    write_config,
)
from tests.openai_support import bearer
from tests.redis_proc import RedisClusterProcess

PER_SESSION = 5  # a session's budget covers 5.5 worst cases
TENANT_CAP = 8  # the tenant's day covers 8.5: less than the three sessions' 16.5
RACE = 200  # concurrent requests on the first session
SIDE = 50  # and on each of the other two


@pytest.fixture
def replicas_on_cluster(tmp_path: Path, redis_cluster: RedisClusterProcess) -> Iterator[tuple[list[Replica], str]]:
    redis_cluster.flush()
    config = write_config(tmp_path, redis={"max_connections": 256, "timeout_ms": 10_000})
    started = start_replicas(config, redis_cluster.url, 3)
    yield started, redis_cluster.url
    for replica in started:
        replica.stop()


def _spread(replicas: list[Replica], tokens: list[tuple[str, int]]) -> list[httpx.Response]:
    """Every (token, count) fired at once, round-robin over the replicas."""

    async def go() -> list[httpx.Response]:
        clients = [httpx.AsyncClient(base_url=r.url, timeout=60, limits=httpx.Limits(max_connections=100)) for r in replicas]
        start = asyncio.Event()
        body = {"model": "gpt-4o-mini", "messages": HELLO}

        async def one(i: int, token: str) -> httpx.Response:
            await start.wait()
            return await clients[i % len(clients)].post("/v1/chat/completions", json=body, headers=bearer(token))

        try:
            jobs = [(token, n) for token, count in tokens for n in range(count)]
            tasks = [asyncio.ensure_future(one(i, token)) for i, (token, _) in enumerate(jobs)]
            await asyncio.sleep(0)
            start.set()
            return list(await asyncio.gather(*tasks))
        finally:
            for client in clients:
                await client.aclose()

    return asyncio.run(go())


def _journal(url: str, session_id: str) -> list[dict[bytes, bytes]]:
    client = redis.RedisCluster.from_url(url)
    try:
        return [fields for _, fields in client.xrange(redis_keys.journal(session_id))]
    finally:
        client.close()


def _charged(entries: list[dict[bytes, bytes]]) -> int:
    """What the journal says the session spent: the cost of every closing entry."""
    return sum(int(e.get(b"cost_nanos", b"0")) for e in entries if e[b"kind"] in (b"response", b"stream", b"error", b"aborted"))


def test_three_replicas_on_a_cluster_overspend_neither_the_session_nor_the_tenant(
    replicas_on_cluster: tuple[list[Replica], str],
) -> None:
    replicas, url = replicas_on_cluster
    tenant = f"cl{time.time_ns()}"
    with admin(replicas[0]) as a:
        probe = a.post("/admin/v1/plans/compile", json={**PLAN, "tenant": tenant}).json()
        worst = worst_case(probe["assembly"])
        cap = TENANT_CAP * worst + worst // 2
        budget = PER_SESSION * worst + worst // 2
        limited = {**PLAN, "tenant": tenant, "limits": {"tenant_usd_per_day": str(Decimal(cap) / NANOS_PER_USD)}}
        compiled = a.post("/admin/v1/plans/compile", json=limited)
        assert compiled.status_code == 201, compiled.text
        sessions = []
        for _ in range(3):
            opened = a.post("/admin/v1/sessions", json={"assembly_id": compiled.json()["assembly_id"], "budget_usd": str(Decimal(budget) / NANOS_PER_USD)})
            assert opened.status_code == 201, opened.text
            sessions.append(opened.json())
    assert 3 * budget > cap

    responses = _spread(replicas, [(sessions[0]["token"], RACE), (sessions[1]["token"], SIDE), (sessions[2]["token"], SIDE)])

    odd = [(r.status_code, r.text) for r in responses if r.status_code not in (200, 429)]
    logs = "".join(r.log.read_text(errors="replace") for r in replicas)
    assert not odd, (odd[:3], logs[-3000:])
    denied = Counter(r.json()["error"]["budget"] for r in responses if r.status_code == 429)
    assert set(denied) <= {"usd", "tenant_usd_day"} and denied["tenant_usd_day"] > 0, denied
    admitted = [r for r in responses if r.status_code == 200]
    assert 0 < len(admitted) <= TENANT_CAP

    spent = 0
    with admin(replicas[2]) as a:
        for opened in sessions:
            shown = a.get(f"/admin/v1/sessions/{opened['session_id']}").json()
            entries = _journal(url, opened["session_id"])
            assert shown["spent_nanos"] <= budget  # the session is not overspent
            assert shown["reserved_nanos"] == 0
            assert _charged(entries) == shown["spent_nanos"]  # journal == counter, to the nano-dollar
            assert sum(1 for e in entries if e[b"kind"] == b"response") == shown["requests"]
            spent += shown["spent_nanos"]
    assert spent == len(admitted) * worst
    assert spent == sum(int(Decimal(r.headers["x-abc-cost-usd"]) * NANOS_PER_USD) for r in admitted)

    client = redis.RedisCluster.from_url(url)
    try:
        day = int(client.get(redis_keys.tenant_spend(tenant, time.strftime("%Y%m%d", time.gmtime()))) or 0)
        holds = client.hlen(redis_keys.tenant_holds(tenant))
        tenant_node = client.get_node_from_key(redis_keys.tenant_holds(tenant)).name
        session_nodes = {client.get_node_from_key(redis_keys.session(s["session_id"])).name for s in sessions}
    finally:
        client.close()
    assert day == spent <= cap  # the tenant is not overspent, and its counter is exact
    assert holds == 0  # no hold left behind
    print(f"\ncluster race: admitted {len(admitted)}, denied {dict(denied)}; tenant on {tenant_node}, sessions on {sorted(session_nodes)}")


# --- failover --------------------------------------------------------------------------


@pytest.fixture
def cluster_with_replicas(tmp_path: Path) -> Iterator[RedisClusterProcess]:
    cluster = RedisClusterProcess(tmp_path / "cluster", masters=3, replicas=1).start()
    yield cluster
    cluster.stop()


def _wait_for(what: str, check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _has_replica(port: int) -> bool:
    client = redis.Redis(port=port, socket_timeout=1)
    try:
        role = client.execute_command("ROLE")
    except redis.RedisError:
        return False
    finally:
        client.close()
    return role[0] == b"master" and len(role[2]) > 0


@pytest.mark.timeout(180)
def test_a_master_killed_under_load_fails_closed_then_recovers_and_loses_no_answer(
    cluster_with_replicas: RedisClusterProcess, keyring: Keyring
) -> None:
    cluster = cluster_with_replicas
    settings = make_settings()
    settings = settings.model_copy(update={"redis": settings.redis.model_copy(update={"wait_replicas": 1, "timeout_ms": 500})})
    gw: Gateway = start_gateway(settings, cluster.url, keyring)
    try:
        opened = gw.open_session({**OPEN_PLAN, "name": "failover"})
        session_id, token = opened["session_id"], opened["token"]
        victim = cluster.master_of(redis_keys.session(session_id))
        seen: list[tuple[str, int, dict[str, Any]]] = []  # (request id, status, body)
        phase = {"n": 0}

        async def worker(w: int, stop: asyncio.Event) -> None:
            async with httpx.AsyncClient(base_url=gw.base_url, timeout=30) as client:
                n = 0
                while not stop.is_set():
                    n += 1
                    rid = f"fo-{w}-{n}"
                    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"call {n}"}], "max_tokens": 8}
                    r = await client.post("/v1/chat/completions", json=body, headers={**bearer(token), "x-request-id": rid})
                    seen.append((rid, r.status_code, r.json()))
                    phase["n"] += 1

        async def run() -> None:
            stop = asyncio.Event()
            workers = [asyncio.ensure_future(worker(w, stop)) for w in range(4)]
            while phase["n"] < 20:  # healthy traffic first
                await asyncio.sleep(0.05)
            cluster.kill(victim)  # SIGKILL
            await asyncio.to_thread(_wait_for, "a replica to take over", lambda: victim not in cluster.masters() and len(cluster.masters()) == 3)
            cluster.restart(victim)  # back, as the new master's replica
            await asyncio.to_thread(cluster.wait_healthy)
            new_master = cluster.master_of(redis_keys.session(session_id))
            await asyncio.to_thread(_wait_for, "the new master's replica", lambda: _has_replica(new_master))
            recovered = len(seen)
            deadline = time.monotonic() + 30
            while sum(1 for _, status, _ in seen[recovered:] if status == 200) < 20:
                assert time.monotonic() < deadline, Counter(status for _, status, _ in seen[recovered:])
                await asyncio.sleep(0.05)
            stop.set()
            await asyncio.gather(*workers)

        asyncio.run(run())
        statuses = Counter(status for _, status, _ in seen)
        print(f"\nfailover: killed master :{victim}; statuses {dict(statuses)}")
        assert set(statuses) <= {200, 503}, statuses  # fails closed, never another 5xx
        assert statuses[503] > 0  # the test did bite
        for _, status, body in seen:
            if status == 503:
                assert body["error"]["code"] == "service_unavailable", body

        # Every answer a client received is in the journal of the promoted master.
        entries = _journal(cluster.url, session_id)
        answered = {e[b"rid"].decode() for e in entries if e[b"kind"] == b"response"}
        acknowledged = {rid for rid, status, _ in seen if status == 200}
        assert acknowledged <= answered, sorted(acknowledged - answered)[:5]

        # And after the reaper, the journal still equals the counters.
        async def reap() -> None:
            from redis.asyncio.cluster import RedisCluster

            client = RedisCluster.from_url(cluster.url)
            try:
                ledger = Ledger(client, reservation_ttl_s=900, journal_retention_s=3600)
                while await reap_due(client, ledger, now=time.time() + 10_000):
                    pass
            finally:
                await client.aclose()

        asyncio.run(reap())
        shown = gw.session(session_id)
        assert shown["reserved_nanos"] == 0
        assert _charged(_journal(cluster.url, session_id)) == shown["spent_nanos"]
    finally:
        gw.close()

