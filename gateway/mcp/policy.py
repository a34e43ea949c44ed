"""The PEP for MCP tool calls: pure checks of a tools/call against the session's Assembly.

The name is looked up exactly as sent (no trimming, case folding or Unicode
normalisation: a variant of a granted name is a different, ungranted name); then the
step machine's candidates; then the arguments against the frozen input schema, so
arguments that break it never reach the server. A result is checked for its size, passed
through the plan's plugins (they read its text as they read a model's answer), then its
structured content is checked against the frozen output schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from gateway import plugins
from gateway.assembly.model import Assembly, McpTool
from gateway.errors import InvalidRequest, StateConflict, UpstreamError
from gateway.mcp import schemas
from gateway.pipeline.request_fields import denied, show

__all__ = ["ToolGrant", "authorize_tool", "check_result"]

_Path = tuple[str | int, ...]


@dataclass(frozen=True, slots=True)
class ToolGrant:
    name: str  # "<server>__<tool>", as granted
    tool: McpTool
    arguments: dict[str, Any]
    candidate_steps: tuple[str, ...]  # () without steps

    @property
    def cost_tag(self) -> str:
        """The cost rollups' `model` dimension for a tool: reports tell tools from models by it."""
        return "mcp:" + self.name


def authorize_tool(assembly: Assembly, params: object) -> ToolGrant:
    """Check one tools/call's params, or raise the GatewayError that says why not."""
    if not isinstance(params, dict):
        raise InvalidRequest("tools/call params must be an object", code="invalid_params")
    name = params.get("name")
    if not isinstance(name, str) or not name:
        raise InvalidRequest("tools/call needs the tool's name", param="name", code="invalid_params")
    tool = assembly.mcp.get(name)
    if tool is None or name not in assembly.vcs.mcp_tools:
        raise denied("tool_not_allowed", f"tool '{show(name)}' is not in this session's VCS", param="name")
    arguments = params.get("arguments")
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, dict):
        raise InvalidRequest("tool arguments must be an object", param="arguments", code="invalid_arguments")
    candidates = _candidate_steps(assembly, name)
    problem = _first_error(tool.input_schema, arguments)
    if problem is not None:
        raise InvalidRequest(
            f"arguments of '{name}' break its frozen input schema: {problem}", param="arguments",
            code="invalid_arguments", extra={"rule": "tool_arguments"},
        )
    return ToolGrant(name, tool, arguments, candidates)


def _candidate_steps(assembly: Assembly, name: str) -> tuple[str, ...]:
    if not assembly.steps:
        return ()
    fits = tuple(s.id for s in assembly.steps if name in s.tools)
    if not fits:
        raise StateConflict(
            f"no step of this session's plan uses tool '{name}'",
            extra={"rule": "no_step_fits", "steps": [s.id for s in assembly.steps]},
        )
    return fits


def check_result(tool: McpTool, result: dict[str, Any], body: bytes, run: plugins.Run, max_bytes: int) -> bytes:
    """The result's JSON bytes as the client gets them, once checked: its size, the plugins
    (which may rewrite or deny it), then structured content against the frozen output schema
    (a tool's own failure, isError, carries none to check)."""
    if len(body) > max_bytes:
        raise UpstreamError(f"the result of '{tool.server}__{tool.name}' is larger than {max_bytes} bytes")
    if run:
        rewritten = _through_plugins(run, result)
        if rewritten is not None:
            result, body = rewritten, orjson.dumps(rewritten)
    if tool.output_schema is not None and not result.get("isError"):
        structured = result.get("structuredContent")
        problem = "it has none" if structured is None else _first_error(tool.output_schema, structured)
        if problem is not None:
            raise UpstreamError(
                f"the structured result of '{tool.server}__{tool.name}' breaks its frozen output schema: {problem}"
            )
    return body


def _through_plugins(run: plugins.Run, result: dict[str, Any]) -> dict[str, Any] | None:
    """The result as the plugins leave it; None when none changed it. They see it as a model's
    answer: one choice per text content block and per string in the structured content."""
    texts = _texts(result)
    if not texts:
        return None
    choices = [
        {"index": i, "message": {"role": "tool", "content": text}, "finish_reason": "stop"}
        for i, (_, text) in enumerate(texts)
    ]
    rewritten = run.response({"object": "mcp.tool_result", "choices": choices})
    if rewritten is None:
        return None
    out: dict[str, Any] = orjson.loads(orjson.dumps(result))  # a deep copy: the reply stays as it came
    for (path, text), choice in zip(texts, rewritten.get("choices") or (), strict=False):
        message = choice.get("message") if isinstance(choice, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str) and content != text:
            _put(out, path, content)
    return out


def _texts(result: dict[str, Any]) -> list[tuple[_Path, str]]:
    found: list[tuple[_Path, str]] = []
    content = result.get("content")
    for i, block in enumerate(content if isinstance(content, list) else ()):
        if isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str):
            found.append((("content", i, "text"), block["text"]))
    if "structuredContent" in result:
        _strings(result["structuredContent"], ("structuredContent",), found)
    return found


def _strings(value: Any, path: _Path, found: list[tuple[_Path, str]]) -> None:
    if isinstance(value, str):
        found.append((path, value))
    elif isinstance(value, dict):
        for key, item in value.items():
            _strings(item, (*path, key), found)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _strings(item, (*path, i), found)


def _put(target: Any, path: _Path, text: str) -> None:
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = text


def _first_error(schema: dict[str, Any], value: Any) -> str | None:
    error = schemas.first_error(schema, value)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where or '(arguments)'}: {show(error.message, 200)}"
