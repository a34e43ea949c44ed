"""Properties of the budget scripts under random request mixes, against real Redis.

Whatever the mix (full, partial and zero spend, failures, orphans the reaper charges,
orphans settled after the reaper) and however reserves and settles interleave, spend
never exceeds the budget, and once everything is settled nothing stays reserved and
spend is exactly the sum of what each admitted request was charged.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass, field

import redis.asyncio as aredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import redis_keys as keys
from gateway.assembly.compile import compile_plan
from gateway.assembly.model import Assembly, Limits
from gateway.assembly.plan import parse_plan
from gateway.capability import Keyring
from gateway.errors import BudgetExceeded
from gateway.sessions import SessionStore
from gateway.state.entries import Kind, make_entry, verify_chain
from gateway.state.ledger import CostTags, Ledger
from gateway.state.reaper import reap_due
from tests.conftest import SIGNING_SECRET, make_settings

ASSEMBLY: Assembly = compile_plan(
    parse_plan({"name": "properties", "models": [{"name": "gpt-4o-mini", "max_tokens": 64}], "budget": {"usd": 100}}),
    make_settings(),
).assembly
OUTCOMES = ("full", "partial", "zero", "fail", "orphan", "reaped_then_settled")


@dataclass(frozen=True)
class Op:
    est: int
    outcome: str
    fraction: float  # of the estimate actually spent, for "partial" and "fail"


@dataclass
class Tally:
    admitted: int = 0
    denied: int = 0
    charged: int = 0
    charged_tokens: int = 0
    late: list[tuple[str, Op]] = field(default_factory=list)  # reaped, then settled


ops = st.builds(
    Op,
    est=st.integers(0, 60_000),
    outcome=st.sampled_from(OUTCOMES),
    fraction=st.floats(0, 1),
)


def actual(op: Op) -> int:
    if op.outcome in ("full",):
        return op.est
    if op.outcome in ("partial", "fail", "reaped_then_settled"):
        return int(op.est * op.fraction)
    return 0


def tokens_of(nanos: int) -> int:
    return nanos // 1000


class World:
    """One session on a fresh tenant, a Ledger with a tiny reservation TTL, and the tally."""

    def __init__(self, redis: aredis.Redis, budget: int, tenant_day: int | None) -> None:
        self.redis = redis
        self.ledger = Ledger(redis, reservation_ttl_s=1, journal_retention_s=3600)
        self.budget = budget
        self.tenant = "t" + secrets.token_hex(6)
        self.limits = Limits(tenant_usd_nanos_per_day=tenant_day)
        self.tally = Tally()
        self.session_id = ""

    async def open(self) -> None:
        store = SessionStore(self.redis, self.ledger, Keyring.from_sources(SIGNING_SECRET), retention_s=3600)
        opened = await store.open(ASSEMBLY, tenant=self.tenant, budget_nanos=self.budget, ttl_s=None, labels={})
        self.session_id = opened.session_id

    async def state(self) -> dict[str, int]:
        raw = await self.redis.hgetall(keys.session(self.session_id))
        return {k.decode(): int(v) for k, v in raw.items() if v.isdigit()}

    async def spent_today(self) -> int:
        day = time.strftime("%Y%m%d", time.gmtime())
        return int(await self.redis.get(keys.tenant_spend(self.tenant, day)) or 0)

    def _tags(self) -> CostTags:
        return CostTags(tenant=self.tenant, session_id=self.session_id, model="gpt-4o-mini", assembly_id=ASSEMBLY.id)

    async def settle(self, rid: str, nanos: int, *, ok: bool) -> None:
        kind = Kind.RESPONSE if ok else Kind.ERROR
        await self.ledger.settle(
            session_id=self.session_id, request_id=rid, actual_nanos=nanos, actual_tokens=tokens_of(nanos),
            advance=ok, entry=make_entry(kind, rid=rid, cost=nanos), tags=self._tags(),
        )

    async def run(self, op: Op) -> bool:
        rid = "req_" + secrets.token_hex(8)
        try:
            await self.ledger.reserve(
                session_id=self.session_id, tenant=self.tenant, request_id=rid, est_nanos=op.est,
                est_tokens=tokens_of(op.est), step_candidates="", limits=self.limits,
                entry=make_entry(Kind.REQUEST, rid=rid, est_nanos=op.est),
            )
        except BudgetExceeded:
            self.tally.denied += 1
            return False
        self.tally.admitted += 1
        await asyncio.sleep(0)  # let other requests interleave between reserve and settle
        if op.outcome == "orphan":
            self.tally.charged += op.est
            self.tally.charged_tokens += tokens_of(op.est)
        elif op.outcome == "reaped_then_settled":
            self.tally.late.append((rid, op))
            self.tally.charged += actual(op)
            self.tally.charged_tokens += tokens_of(actual(op))
        else:
            await self.settle(rid, actual(op), ok=op.outcome != "fail")
            self.tally.charged += actual(op)
            self.tally.charged_tokens += tokens_of(actual(op))
        return True

    async def watch(self, stop: asyncio.Event) -> None:
        """Sample the session while requests run: the budget holds at every instant we look."""
        while not stop.is_set():
            s = await self.state()
            assert s["spent_nanos"] + s["reserved_nanos"] <= self.budget, s
            await asyncio.sleep(0)

    async def finish(self) -> None:
        """The reaper charges the orphans; the slow-but-alive ones settle afterwards."""
        await reap_due(self.redis, self.ledger, now=time.time() + 5)
        for rid, op in self.tally.late:
            await self.settle(rid, actual(op), ok=True)


async def scenario(redis_url: str, budget: int, tenant_day: int | None, batches: list[list[Op]]) -> None:
    redis = aredis.Redis.from_url(redis_url)
    try:
        world = World(redis, budget, tenant_day)
        await world.open()
        for batch in batches:
            before = await world.state()
            today_before = await world.spent_today()
            stop = asyncio.Event()
            watcher = asyncio.ensure_future(world.watch(stop))
            results = await asyncio.gather(*(world.run(op) for op in batch))
            stop.set()
            await watcher
            if len(batch) == 1:
                # Alone, admission is exact: admitted iff the worst case fits what is left.
                fits = before["spent_nanos"] + before["reserved_nanos"] + batch[0].est <= budget
                if tenant_day is not None:
                    fits = fits and today_before + batch[0].est <= tenant_day
                assert results[0] == fits
        await world.finish()

        s = await world.state()
        assert s["reserved_nanos"] == 0 and s["reserved_tokens"] == 0
        assert s["spent_nanos"] == world.tally.charged
        assert s["spent_tokens"] == world.tally.charged_tokens
        assert s["spent_nanos"] <= budget
        assert s["requests"] == world.tally.admitted
        # Left behind only: the reaper's marks ("R...") of orphans, kept for a late settle.
        held = await redis.hvals(keys.reservations(world.session_id))
        assert all(v.startswith(b"R") for v in held)
        if tenant_day is not None:
            counter = await world.spent_today()
            assert counter == world.tally.charged
            assert counter <= tenant_day
        assert verify_chain(await redis.xrange(keys.journal(world.session_id))).ok
    finally:
        await redis.aclose()


def _chunks(items: list[Op], sizes: list[int]) -> list[list[Op]]:
    out, i = [], 0
    for size in sizes:
        if i >= len(items):
            break
        out.append(items[i:i + size])
        i += size
    if i < len(items):
        out.append(items[i:])
    return out


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    budget=st.integers(0, 300_000),
    tenant_day=st.one_of(st.none(), st.integers(0, 300_000)),
    items=st.lists(ops, min_size=1, max_size=30),
    sizes=st.lists(st.integers(1, 12), min_size=1, max_size=10),
)
def test_random_mixes_never_overspend_and_release_every_reservation(
    redis_url: str, budget: int, tenant_day: int | None, items: list[Op], sizes: list[int]
) -> None:
    asyncio.run(scenario(redis_url, budget, tenant_day, _chunks(items, sizes)))


async def burst(redis_url: str, fits: int, est: int, requests: int) -> tuple[int, dict[str, int]]:
    redis = aredis.Redis.from_url(redis_url)
    try:
        # Room for `fits` worst cases and a bit, never for one more.
        world = World(redis, fits * est + est // 2, None)
        await world.open()
        results = await asyncio.gather(*(world.run(Op(est, "orphan", 1.0)) for _ in range(requests)))
        return sum(results), await world.state()
    finally:
        await redis.aclose()


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fits=st.integers(0, 10), est=st.integers(2, 10**8), requests=st.integers(1, 40))
def test_a_concurrent_burst_admits_exactly_what_the_budget_covers(redis_url: str, fits: int, est: int, requests: int) -> None:
    admitted, state = asyncio.run(burst(redis_url, fits, est, requests))
    assert admitted == min(fits, requests)
    assert state["reserved_nanos"] == admitted * est <= state.get("budget_nanos", 0)
