"""litellm's bundled price map, read as JSON from its package directory without importing
litellm (importing it costs seconds and a lot of memory), once per process, on first use:
the prices Assemblies freeze (gateway.assembly.prices) and the kinds of models settings
leave unwritten.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

__all__ = ["PRICE_MAP_FILE", "candidates", "litellm_kind", "price_map"]

PRICE_MAP_FILE = "model_prices_and_context_window_backup.json"

@functools.cache
def price_map() -> tuple[str, Mapping[str, Any]] | None:
    """(source, entries) from the installed litellm's bundled map, or None without litellm."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / PRICE_MAP_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        version = importlib.metadata.version("litellm")
    except (OSError, ValueError, importlib.metadata.PackageNotFoundError):
        return None
    if not isinstance(entries, dict):
        return None
    return f"litellm:{version}", entries


def candidates(names: tuple[str, ...]) -> list[str]:
    found: list[str] = []
    for name in names:
        bare = name.split("/", 1)[1] if "/" in name else name
        for candidate in (name, name.lower(), bare, bare.lower()):
            if candidate and candidate not in found:
                found.append(candidate)
    return found


# litellm's "mode" of a model -> the kind of model settings; other modes are not served.
_KINDS: dict[str, Literal["chat", "embedding", "completion"]] = {
    "chat": "chat", "responses": "chat", "embedding": "embedding", "completion": "completion",
}


def litellm_kind(*names: str) -> Literal["chat", "embedding", "completion"] | None:
    """The kind litellm's map gives the first of `names` it knows, or None."""
    loaded = price_map()
    if loaded is None:
        return None
    _, entries = loaded
    for candidate in candidates(names):
        entry = entries.get(candidate)
        if isinstance(entry, dict) and isinstance(entry.get("mode"), str):
            return _KINDS.get(entry["mode"])
    return None
