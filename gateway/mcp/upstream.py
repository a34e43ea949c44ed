"""Upstream MCP servers, reached with the official SDK's client and the gateway's credentials.

One `ToolServer` per `tool_servers:` entry holds one SDK `Client` open (streamable HTTP
or a stdio child process) in a task of its own, because the SDK's anyio scopes must be
left by the task that entered them; calls from any request share that session. Over
streamable HTTP, tools/call is POSTed on that session directly (gateway.mcp.wire). A broken
connection (server restarted, child process died) is dropped and reopened on next use.

Freshness of the rug-pull check: a tools/list answer is reused for `definitions_ttl_s`
(default 1 s; 0 lists before every call), and a `notifications/tools/list_changed` from
the server drops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gateway.assembly.mcp_tools import Listing, definition_hash
from gateway.errors import GatewayError, UpstreamError, UpstreamTimeout
from gateway.mcp.wire import SessionLost, ToolPost
from gateway.providers.base import Reply
from gateway.settings import Settings, ToolServerSettings

if TYPE_CHECKING:
    from mcp import Client

__all__ = ["ToolServer", "ToolServers", "discover_once"]

_LIST_CHANGED = "notifications/tools/list_changed"
_DEFAULT_RESULT_LIMIT: int = ToolServerSettings.model_fields["max_result_bytes"].default


class ToolServer:
    def __init__(self, settings: ToolServerSettings) -> None:
        self.settings = settings
        self.name = settings.name
        self._client: Client | None = None
        self._holder: asyncio.Task[None] | None = None
        self._closing: asyncio.Event | None = None
        self._lock = asyncio.Lock()
        self._listed: dict[str, dict[str, Any]] | None = None
        self._hashes: dict[str, str] = {}
        self._listed_at = 0.0
        self._session_id: str | None = None  # the SDK's streamable HTTP session, as the server named it
        self._post = None if settings.url is None else ToolPost(
            settings.name, settings.url, settings.max_result_bytes, settings.timeout_s,
        )
        # The last tools/list pages read, by cursor: with a short definitions_ttl_s the same
        # answer comes back on most calls, and reading it (the SDK's model, hashes) costs more
        # than the request.
        self._pages: dict[str | None, _Page] = {}

    async def list_tools(self) -> dict[str, dict[str, Any]]:
        """Every tool the server defines now, by name, as the JSON it sent (camelCase keys)."""
        client = await self._connected()
        tools: dict[str, dict[str, Any]] = {}
        hashes: dict[str, str] = {}
        cursor: str | None = None
        async with self._guard("tools/list"):
            while True:
                params = None if cursor is None else {"cursor": cursor}
                if self._post is not None:
                    page = self._read_page(cursor, await self._post.request("tools/list", params))
                else:
                    page = _Page.of(await client.session.list_tools(params=params))  # type: ignore[arg-type]
                tools.update(page.tools)
                hashes.update(page.hashes)
                cursor = page.next_cursor
                if not cursor or len(tools) > 10_000:
                    break
        self._listed, self._listed_at, self._hashes = tools, time.monotonic(), hashes
        return tools

    def _read_page(self, cursor: str | None, result: dict[str, Any]) -> _Page:
        """A tools/list page as the SDK's client reads it (its model: the same definitions, the
        same hashes); a page that came back byte for byte as last time is not read again."""
        import mcp_types as types

        raw = orjson.dumps(result)
        seen = self._pages.get(cursor)
        if seen is not None and seen.raw == raw:
            return seen
        if len(self._pages) > 1000:
            self._pages.clear()
        page = self._pages[cursor] = _Page.of(types.ListToolsResult.model_validate(result), raw)
        return page

    async def current_hash(self, tool: str) -> str | None:
        """The hash of the server's current definition of `tool` (None: it has none)."""
        ttl = self.settings.definitions_ttl_s
        if self._listed is None or ttl == 0 or time.monotonic() - self._listed_at >= ttl:
            await self.list_tools()
        return self._hashes.get(tool)

    async def call(self, tool: str, arguments: Mapping[str, Any]) -> Reply:
        """tools/call with the bare name; the CallToolResult. A tool's own failure (isError)
        is a result; the server refusing or failing to answer is an UpstreamError."""
        client = await self._connected()
        try:  # the hot path: _guard's work without its generator
            if self._post is not None:
                return await self._post.call(tool, arguments)  # bounded by timeout_s itself
            async with asyncio.timeout(self.settings.timeout_s):
                return await self._sdk_call(client, tool, arguments)
        except Exception as exc:
            raise await self._failure(exc, "tools/call") from None

    @staticmethod
    async def _sdk_call(client: Client, tool: str, arguments: Mapping[str, Any]) -> Reply:
        import mcp_types as types

        # Not ClientSession.call_tool: it re-lists tools to check structured content,
        # which the gateway does itself against the frozen output schema.
        request = types.CallToolRequest(params=types.CallToolRequestParams(name=tool, arguments=dict(arguments)))
        result = await client.session.send_request(request, types.CallToolResult)
        out: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        return Reply(body=orjson.dumps(out), data=out)

    @contextlib.asynccontextmanager
    async def _guard(self, what: str) -> Any:
        """Upstream trouble as the gateway's typed errors (see _failure), within the timeout."""
        try:
            async with asyncio.timeout(self.settings.timeout_s):
                yield
        except Exception as exc:
            raise await self._failure(exc, what) from None

    async def _failure(self, exc: Exception, what: str) -> GatewayError:
        """The typed error for upstream trouble; never the server's URL or headers. Any but
        the gateway's own errors drop the session: the next call starts from a fresh one."""
        from mcp.shared.exceptions import MCPError

        if isinstance(exc, GatewayError):
            return exc
        await self._drop()
        if isinstance(exc, SessionLost):
            return UpstreamError(f"tool server {self.name!r} lost its session; the next call opens a new one")
        if isinstance(exc, MCPError):
            # A JSON-RPC error, or the SDK's word for a lost session (server restarted, child
            # process gone).
            return UpstreamError(f"tool server {self.name!r} refused {what} (JSON-RPC error {exc.error.code})")
        if isinstance(exc, TimeoutError):
            return UpstreamTimeout(f"tool server {self.name!r} did not answer {what} in {self.settings.timeout_s:g} s")
        return UpstreamError(f"tool server {self.name!r} is unreachable ({type(exc).__name__})")

    async def _connected(self) -> Client:
        client = self._client
        if client is not None and self._holder is not None and not self._holder.done():
            return client
        async with self._lock:
            if self._client is not None and self._holder is not None and not self._holder.done():
                return self._client
            ready: asyncio.Future[Client] = asyncio.get_running_loop().create_future()
            self._closing = asyncio.Event()
            self._holder = asyncio.create_task(self._hold(ready, self._closing), name=f"mcp-upstream-{self.name}")
            try:
                async with asyncio.timeout(self.settings.timeout_s):
                    self._client = await asyncio.shield(ready)
                if self._post is not None:
                    self._post.on_session(self.settings.headers(), self._session_id, self._client.session.protocol_version)
            except TimeoutError:
                await self._drop()
                raise UpstreamTimeout(f"tool server {self.name!r} did not answer the handshake in time") from None
            except Exception as exc:
                await self._drop()
                raise UpstreamError(f"tool server {self.name!r} is unreachable ({type(exc).__name__})") from None
            return self._client

    async def _hold(self, ready: asyncio.Future[Client], closing: asyncio.Event) -> None:
        """Open the SDK client, hand it over, and keep it open until asked to close."""
        try:
            async with self._new_client() as client:
                ready.set_result(client)
                await closing.wait()
        except BaseException as exc:  # noqa: BLE001  # handed to whoever waits for the connection
            if not ready.done():
                ready.set_exception(exc if isinstance(exc, Exception) else ConnectionError("closed"))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._client = None
            self._listed = None

    def _new_client(self) -> Client:
        # The SDK is imported here, on first use: it costs more than the rest of start-up.
        import httpx2
        from mcp import Client
        from mcp.client.stdio import StdioServerParameters
        from mcp.client.streamable_http import streamable_http_client

        s = self.settings
        if s.command is not None:
            server: Any = StdioServerParameters(command=s.command[0], args=s.command[1:])
        else:
            assert s.url is not None
            http = httpx2.AsyncClient(
                headers=s.headers(), timeout=httpx2.Timeout(s.timeout_s), event_hooks={"response": [self._on_response]},
            )
            server = streamable_http_client(s.url, http_client=http)
        return Client(server, mode="legacy", cache=None, message_handler=self._on_message)

    async def _on_response(self, response: Any) -> None:
        session_id = response.headers.get("mcp-session-id")
        if session_id:
            self._session_id = session_id

    async def _on_message(self, message: Any) -> None:
        root = getattr(message, "root", message)
        if getattr(root, "method", None) == _LIST_CHANGED:
            self._listed = None  # the next call lists again before it is checked

    async def _drop(self) -> None:
        holder, closing = self._holder, self._closing
        self._client, self._holder, self._listed, self._session_id = None, None, None, None
        if holder is None:
            return
        if closing is not None:
            closing.set()
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(holder), timeout=2)
        if not holder.done():
            holder.cancel()

    async def close(self) -> None:
        async with self._lock:
            await self._drop()
            if self._post is not None:
                await self._post.close()


@dataclass(frozen=True, slots=True)
class _Page:
    tools: dict[str, dict[str, Any]]  # by name, as the JSON the server sent (camelCase keys)
    hashes: dict[str, str]
    next_cursor: str | None
    raw: bytes = b""  # the result as received, re-serialised: what an unchanged page is known by

    @classmethod
    def of(cls, page: Any, raw: bytes = b"") -> _Page:
        tools = {tool.name: tool.model_dump(mode="json", by_alias=True, exclude_none=True) for tool in page.tools}
        return cls(tools, {name: definition_hash(tool) for name, tool in tools.items()}, page.next_cursor, raw)


class ToolServers:
    """The tool servers of the settings, by name; each connects on first use."""

    def __init__(self, settings: Settings) -> None:
        self._servers = {s.name: ToolServer(s) for s in settings.tool_servers}

    def get(self, name: str) -> ToolServer:
        return self._servers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._servers

    def result_limit(self, name: str) -> int:
        """The largest result taken from server `name`: its setting, else the default (a
        recorded replay of a server the settings no longer name)."""
        server = self._servers.get(name)
        return server.settings.max_result_bytes if server is not None else _DEFAULT_RESULT_LIMIT

    async def discover(self, names: Iterable[str]) -> dict[str, Listing]:
        """tools/list of each named server, for the compiler; a failure is that server's error."""
        wanted = sorted({n for n in names if n in self._servers})
        results = await asyncio.gather(*(self._servers[n].list_tools() for n in wanted), return_exceptions=True)
        listings: dict[str, Listing] = {}
        for name, result in zip(wanted, results, strict=True):
            if isinstance(result, GatewayError):
                listings[name] = Listing(error=result.message)
            elif isinstance(result, BaseException):
                listings[name] = Listing(error=type(result).__name__)
            else:
                listings[name] = Listing(tools=result)
        return listings

    async def close(self) -> None:
        await asyncio.gather(*(s.close() for s in self._servers.values()), return_exceptions=True)


async def discover_once(settings: Settings, names: Iterable[str]) -> dict[str, Listing]:
    """`ToolServers.discover` for a one-off compile (the CLI): connect, list, close."""
    servers = ToolServers(settings)
    try:
        return await servers.discover(names)
    finally:
        await servers.close()
