"""The package reads one way: http -> exchange -> {policy, usage, plugins, providers} ->
state (ledger, idempotency, journal entries) -> keys, errors, money. Walks gateway/ with
`ast` (imports under TYPE_CHECKING and inside functions count too) and fails on any cycle
and on any import that points up a layer."""

from __future__ import annotations

import ast
from pathlib import Path

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"

# Lowest first. A module takes the rank of its longest matching prefix; a module may
# import its own rank or lower. Modules matching no prefix are only checked for cycles.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("gateway.errors", "gateway.money", "gateway.redis_keys", "gateway.settings", "gateway.tokenizer",
         "gateway.providers.base", "gateway.providers.transport", "gateway.assembly.model", "gateway.capability")),
    (1, ("gateway.state",)),
    (2, ("gateway.pipeline.policy", "gateway.pipeline.usage", "gateway.pipeline.request_fields", "gateway.plugins",
         "gateway.pipeline.fallbacks", "gateway.pipeline.deployments",
         "gateway.pipeline.request_body", "gateway.pipeline.request_schema",
         "gateway.providers", "gateway.assembly", "gateway.sessions", "gateway.metrics", "gateway.reports",
         "gateway.embedded_redis", "gateway.deps", "gateway.mcp.upstream", "gateway.mcp.policy", "gateway.mcp.provider", "gateway.mcp.wire",
         "gateway.mcp.demo_server", "gateway.translate",
         "gateway.pipeline.dialects", "gateway.journal.stored_responses")),
    (3, ("gateway.pipeline.exchange", "gateway.journal.recorded")),
    (4, ("gateway.journal.live", "gateway.decision")),
    (5, ("gateway.http", "gateway.mcp.endpoint", "gateway.mcp.demo", "gateway.app", "gateway.server", "gateway.cli",
         "gateway.demo", "gateway.admin_cli", "gateway.journal_cli", "gateway.plan_cli", "gateway.__main__")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in GATEWAY.rglob("*.py"):
        parts = path.relative_to(GATEWAY.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module if node.level == 0 else _resolve_relative(name, node.module, node.level)
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _resolve_relative(module: str, target: str, level: int) -> str:
    return ".".join(module.split(".")[:-level] + [target])


def rank(module: str) -> int | None:
    best: tuple[int, int] | None = None  # (prefix length, rank)
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), layer)
    return None if best is None else best[1]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = GREY
        path.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return path[path.index(nxt):] + [nxt]
            if colour[nxt] == WHITE and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        colour[node] = BLACK
        return None

    for start in sorted(graph):
        if colour[start] == WHITE and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_imports_a_layer_above_its_own() -> None:
    upward = []
    for module, targets in import_graph().items():
        own = rank(module)
        for target in targets:
            theirs = rank(target)
            if own is not None and theirs is not None and theirs > own:
                upward.append(f"{module} (layer {own}) imports {target} (layer {theirs})")
    assert not upward, "\n".join(sorted(upward))


def test_the_checker_sees_a_cycle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert rank("gateway.state.ledger") == 1 and rank("gateway.http.sse") == 5
    assert rank("gateway.pipeline.exchange") == 3 and rank("gateway.pipeline.policy") == 2


def lifecycle_calls() -> dict[str, set[str]]:
    """Modules outside the ledger that reserve or settle, and what they call: `.reserve(` and
    `.settle(` on anything named like the ledger."""
    found: dict[str, set[str]] = {}
    for name, path in _modules().items():
        if name.startswith("gateway.state."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("reserve", "settle") and "ledger" in ast.unparse(node.func.value)
            ):
                found.setdefault(name, set()).add(node.func.attr)
    return found


def test_only_the_exchange_reserves_and_settles_model_and_tool_calls_alike() -> None:
    # One lifecycle: a route or a tool-call path with a reserve/settle of its own is a second one.
    assert lifecycle_calls() == {"gateway.pipeline.exchange": {"reserve", "settle"}}
