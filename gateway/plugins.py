"""Policy plugins: the Protocol, loading by import path, and running them in order.

A plugin sees the request before the budget is reserved, every streamed chunk and the
final answer. Each hook passes (returns None), rewrites (returns a new dict) or
denies (raises `PluginDenied`). Plugins run in the order the settings list them.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from gateway.errors import CapabilityDenied, ConfigError
from gateway.settings import PluginSettings


class PluginDenied(CapabilityDenied):
    code = "plugin_denied"


@runtime_checkable
class Plugin(Protocol):
    name: str

    def on_request(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The upstream body, after the PEP; return a rewritten body, None to pass."""
        ...

    def on_chunk(self, chunk: dict[str, Any], state: dict[str, Any]) -> dict[str, Any] | None:
        """One streamed chunk; `state` is this stream's scratch space, dropped with it."""
        ...

    def on_response(self, data: dict[str, Any]) -> dict[str, Any] | None:
        """A complete non-streamed answer; return a rewritten answer, None to pass."""
        ...


def load_plugins(specs: Sequence[PluginSettings]) -> tuple[Plugin, ...]:
    plugins: list[Plugin] = []
    for i, spec in enumerate(specs):
        module_name, _, class_name = spec.path.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
            plugin = cls(**spec.options)
        except (ImportError, AttributeError, TypeError, ValueError) as exc:
            raise ConfigError(f"plugins.{i}.path: cannot load {spec.path!r}: {exc}") from None
        if not isinstance(plugin, Plugin):
            raise ConfigError(f"plugins.{i}.path: {spec.path!r} does not implement the Plugin protocol")
        plugins.append(plugin)
    return tuple(plugins)


def run_request(plugins: Sequence[Plugin], body: dict[str, Any]) -> dict[str, Any]:
    for plugin in plugins:
        body = plugin.on_request(body) or body
    return body


def run_chunk(plugins: Sequence[Plugin], chunk: dict[str, Any], states: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """The rewritten chunk, or None when no plugin changed it (the raw bytes can be sent)."""
    changed = None
    for plugin in plugins:
        out = plugin.on_chunk(changed or chunk, states.setdefault(plugin.name, {}))
        if out is not None:
            changed = out
    return changed


def run_response(plugins: Sequence[Plugin], data: dict[str, Any]) -> dict[str, Any] | None:
    changed = None
    for plugin in plugins:
        out = plugin.on_response(changed or data)
        if out is not None:
            changed = out
    return changed
