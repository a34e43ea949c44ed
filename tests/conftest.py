"""Shared fixtures: a real redis-server per test session (flushed per test), settings,
and a real gateway on a background thread that the official openai SDK can call.

`redis_url` is a single node by default. A module that sets `pytestmark = BOTH_REDIS`
runs each of its tests twice: on the single node and on a real 3-master Redis Cluster
(started once per test session); the gateways it starts then run in cluster mode."""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from pydantic import SecretStr

from gateway.capability import Keyring
from gateway.plugins import Registry
from gateway.server import BackgroundServer
from gateway.settings import Settings, load_settings
from tests.redis_proc import RedisClusterProcess, RedisProcess, is_cluster_url

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-" + secrets.token_hex(16)
SIGNING_SECRET = "test-signing-secret-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcess]:
    cluster = RedisClusterProcess(tmp_path_factory.mktemp("cluster"), masters=3).start()
    yield cluster
    cluster.stop()


# Run a module's tests on a single Redis and on a Redis Cluster: `pytestmark = BOTH_REDIS`.
BOTH_REDIS = pytest.mark.parametrize("redis_kind", ["single", "cluster"], indirect=True)


@pytest.fixture
def redis_kind(request: pytest.FixtureRequest) -> str:
    kind: str = getattr(request, "param", "single")
    return kind


@pytest.fixture
def redis_url(redis_kind: str, request: pytest.FixtureRequest) -> Iterator[str]:
    if redis_kind == "cluster":
        cluster: RedisClusterProcess = request.getfixturevalue("redis_cluster")
        cluster.flush()
        yield cluster.url
        return
    server: RedisProcess = request.getfixturevalue("redis_server")
    client = redis.Redis.from_url(server.url)
    client.flushall()
    client.close()
    yield server.url


def make_settings(**overrides: Any) -> Settings:
    """config/gateway.yaml plus test secrets; `overrides` replace top-level sections."""
    base = load_settings(ROOT / "config" / "gateway.yaml")
    update: dict[str, Any] = {"admin_token": SecretStr(ADMIN_TOKEN), "signing_key": SecretStr(SIGNING_SECRET)}
    update.update(overrides)
    return base.model_copy(update=update)


@pytest.fixture
def settings() -> Settings:
    return make_settings()


@pytest.fixture
def keyring() -> Keyring:
    return Keyring.from_sources(SIGNING_SECRET)


@dataclass
class Gateway:
    """A running gateway plus an admin client for compiling plans and opening sessions."""

    server: BackgroundServer
    admin: httpx.Client

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def openai_base(self) -> str:
        return self.server.base_url + "/v1"

    def compile(self, plan: dict[str, Any]) -> str:
        response = self.admin.post("/admin/v1/plans/compile", json=plan)
        assert response.status_code == 201, response.text
        assembly_id: str = response.json()["assembly_id"]
        return assembly_id

    def open_session(self, plan_or_assembly: dict[str, Any] | str, **options: Any) -> dict[str, Any]:
        assembly_id = plan_or_assembly if isinstance(plan_or_assembly, str) else self.compile(plan_or_assembly)
        response = self.admin.post("/admin/v1/sessions", json={"assembly_id": assembly_id, **options})
        assert response.status_code == 201, response.text
        opened: dict[str, Any] = response.json()
        return opened

    def token(self, plan: dict[str, Any], **options: Any) -> str:
        token: str = self.open_session(plan, **options)["token"]
        return token

    def close(self) -> None:
        self.admin.close()
        self.server.stop()

    def __enter__(self) -> Gateway:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def session(self, session_id: str) -> dict[str, Any]:
        response = self.admin.get(f"/admin/v1/sessions/{session_id}")
        assert response.status_code == 200, response.text
        shown: dict[str, Any] = response.json()
        return shown


def for_redis(settings: Settings, redis_url: str) -> Settings:
    """`settings` in cluster mode when `redis_url` is a test cluster's."""
    if not is_cluster_url(redis_url):
        return settings
    return settings.model_copy(update={"redis": settings.redis.model_copy(update={"cluster": True, "url": redis_url})})


def start_gateway(settings: Settings, redis_url: str, keyring: Keyring, *, plugins: Registry | None = None) -> Gateway:
    """`plugins`: what this replica can run; absent, the installed entry points."""
    server = BackgroundServer(for_redis(settings, redis_url), redis_url=redis_url, keyring=keyring, plugins=plugins).start()
    admin = httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=30)
    return Gateway(server, admin)


_SERVER_ERROR = re.compile(r'^abc_requests_total\{[^}]*status="500"[^}]*\} (\S+)$', re.MULTILINE)


def assert_no_server_errors(gw: Gateway) -> None:
    """The gateway's own request counter shows no 500 (an unhandled exception) at all."""
    text = httpx.get(gw.base_url + "/metrics", timeout=30).text
    hits = [float(v) for v in _SERVER_ERROR.findall(text)]
    assert not any(hits), "the gateway answered 500: " + ", ".join(_SERVER_ERROR.findall(text))


@pytest.fixture
def gateway(settings: Settings, redis_url: str, keyring: Keyring) -> Iterator[Gateway]:
    gw = start_gateway(settings, redis_url, keyring)
    try:
        yield gw
    finally:
        gw.close()


@pytest.fixture
def gw(gateway: Gateway) -> Iterator[Gateway]:
    """The gateway, checked afterwards for any 500 (an unhandled exception) it answered."""
    yield gateway
    assert_no_server_errors(gateway)


# A plan over the mock models in config/gateway.yaml, open enough for most tests.
OPEN_PLAN: dict[str, Any] = {
    "name": "open-test",
    "tenant": "acme",
    "models": [
        {"name": "gpt-4o-mini", "max_tokens": 256, "max_n": 4},
        {"name": "gpt-4o", "max_tokens": 256},
        {"name": "text-embedding-3-small", "max_tokens": 1},
        {"name": "gpt-3.5-turbo-instruct", "max_tokens": 256},
        {"name": "mock-slow", "max_tokens": 64},
        {"name": "mock-error", "max_tokens": 64},
        {"name": "mock-cut", "max_tokens": 256},
    ],
    "tools": [
        {
            "name": "lookup_order",
            "description": "Find an order by id",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]},
        }
    ],
    "budget": {"usd": 10.0, "tokens": 10_000_000, "requests": 10_000},
    "ttl_s": 3600,
}
