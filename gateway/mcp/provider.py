"""A tool server as the Exchange's provider of one tools/call: the rug-pull check, then the
call with the bare tool name and the gateway's credentials (gateway.mcp.upstream)."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequest, UpstreamError
from gateway.providers.base import Endpoint, Reply

if TYPE_CHECKING:
    from gateway.mcp.policy import ToolGrant
    from gateway.mcp.upstream import ToolServers

__all__ = ["ToolProvider"]


class ToolProvider:
    def __init__(self, servers: ToolServers, grant: ToolGrant) -> None:
        self.name = grant.tool.server
        self._servers = servers
        self._grant = grant

    async def send(self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None) -> Reply:
        """The CallToolResult; `body` (the client's params) was read into the grant already."""
        grant, tool = self._grant, self._grant.tool
        if tool.server not in self._servers:
            raise UpstreamError(f"tool server {tool.server!r} of '{grant.name}' is no longer in the gateway settings")
        server = self._servers.get(tool.server)
        if await server.current_hash(tool.name) != tool.definition_hash:
            raise UpstreamError(
                f"tool '{grant.name}' changed on its server since the Assembly was compiled; recompile to approve it",
                code="tool_changed",
            )
        return await server.call(tool.name, grant.arguments)

    async def stream(
        self, endpoint: Endpoint, body: dict[str, Any], *, request_id: str | None = None,
        headers_out: dict[str, str] | None = None,
    ) -> AsyncGenerator[bytes, None]:
        raise InvalidRequest("a tool call is answered whole, not streamed")
        yield b""  # pragma: no cover  # makes this an async generator, as the Protocol wants

    async def close(self) -> None:
        return None
