"""The PEP for MCP tool calls: pure checks of a tools/call against the session's Assembly.

The name is looked up exactly as sent (no trimming, case folding or Unicode
normalisation: a variant of a granted name is a different, ungranted name); then the
step machine's candidates; then the arguments against the frozen input schema, so
arguments that break it never reach the server. Results are checked against the frozen
output schema and the size limit.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.assembly.model import Assembly, McpTool
from gateway.errors import InvalidRequest, StateConflict, UpstreamError
from gateway.pipeline.request_fields import denied, show

__all__ = ["ToolGrant", "authorize_tool", "check_result"]


@dataclass(frozen=True, slots=True)
class ToolGrant:
    name: str  # "<server>__<tool>", as granted
    tool: McpTool
    arguments: dict[str, Any]
    candidate_steps: tuple[str, ...]  # () without steps


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


def check_result(tool: McpTool, result: dict[str, Any], max_bytes: int) -> bytes:
    """The result's JSON bytes, once checked: size, and structured content against the frozen
    output schema (a tool's own failure, isError, carries none to check)."""
    body = orjson.dumps(result)
    if len(body) > max_bytes:
        raise UpstreamError(f"the result of '{tool.server}__{tool.name}' is larger than {max_bytes} bytes")
    if tool.output_schema is not None and not result.get("isError"):
        structured = result.get("structuredContent")
        problem = "it has none" if structured is None else _first_error(tool.output_schema, structured)
        if problem is not None:
            raise UpstreamError(
                f"the structured result of '{tool.server}__{tool.name}' breaks its frozen output schema: {problem}"
            )
    return body


def _first_error(schema: dict[str, Any], value: Any) -> str | None:
    error = next(iter(_validator(orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)).iter_errors(value)), None)
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path)
    return f"{where or '(arguments)'}: {show(error.message, 200)}"


@functools.lru_cache(maxsize=1024)
def _validator(schema_json: bytes) -> Any:
    # Compiling a validator costs far more than using one: once per frozen schema.
    # jsonschema is imported on first use, like the MCP SDK: only plans with MCP tools need it.
    from jsonschema.validators import validator_for  # type: ignore[import-untyped]
    from referencing import Registry

    schema = orjson.loads(schema_json)
    cls: Any = validator_for(schema)
    # An empty registry: a $ref resolves inside the schema, never over the network.
    return cls(schema, registry=Registry())
