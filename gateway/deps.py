"""Everything a request needs, built once per process and hung off the app."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gateway.assembly.store import AssemblyStore
from gateway.capability import Keyring, Verifier
from gateway.mcp.upstream import ToolServers
from gateway.metrics import Metrics
from gateway.pipeline.deployments import Balancer
from gateway.plugins import Registry
from gateway.providers.base import Provider
from gateway.redis_client import AnyRedis
from gateway.request_log import RequestLog
from gateway.sessions import SessionStore
from gateway.settings import Settings
from gateway.state.ledger import Ledger
from gateway.tracing import Tracer


@dataclass(frozen=True)
class Deps:
    settings: Settings
    redis: AnyRedis
    ledger: Ledger
    assemblies: AssemblyStore
    sessions: SessionStore
    keyring: Keyring
    verifier: Verifier
    providers: Mapping[str, Provider]
    known_models: frozenset[str]
    metrics: Metrics
    plugins: Registry  # what this replica can run; an Assembly selects from it
    tool_servers: ToolServers  # MCP servers of the settings, connected on first use
    # Settlements and journal writes still running after their request ended.
    tasks: set[asyncio.Future[Any]]
    request_log: RequestLog
    tracer: Tracer
    # In-flight counts per deployment, for the least-in-flight choice.
    balancer: Balancer = field(default_factory=Balancer)
