"""Policy plugins: the Protocol, the registry of what this replica has, and one call's run.

Operators make plugins *available* by registering a class under a name (Python entry
points, group `abc_gateway.plugins`); a plan *selects and configures* them, and the
compiler freezes each one's name, version and validated options into the Assembly.
No import path ever comes from a plan or a request.

At run time a call's plugins are the plan-level ones, then those of each step the call
could be (its candidate steps, in plan order). They are built once per (Assembly, steps)
and cached; a replica that lacks one the Assembly names, or has another version of it,
refuses every call of that Assembly with 503 `plugin_unavailable`.

Each hook passes (returns None), rewrites (returns a new dict) or denies (raises
`PluginDenied`). A hook gets its call's `Scratch`: private state kept for the whole
call, and `counts`, which the journal entry of the answer carries.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, ValidationError

from gateway import redis_keys
from gateway.assembly.model import Assembly, PluginGrant
from gateway.errors import CapabilityDenied, ServiceUnavailable
from gateway.state.ledger import REDIS_ERRORS

__all__ = [
    "ENTRY_POINT_GROUP",
    "Plugin",
    "PluginClass",
    "PluginDenied",
    "PluginOptions",
    "Registry",
    "Run",
    "Scratch",
    "for_call",
]

ENTRY_POINT_GROUP = "abc_gateway.plugins"
log = logging.getLogger("gateway.plugins")


class PluginDenied(CapabilityDenied):
    code = "plugin_denied"


class PluginOptions(BaseModel):
    """Base of every plugin's options: strict, frozen, validated at compile time."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(slots=True)
class Scratch:
    """One plugin's state for one call: `data` is private, `counts` is journaled.

    `session` holds the plugin's per-session counters (those its `session_counters`
    names) as they stood before this call; `session_add` what this call adds to them once
    its answer is settled.
    """

    data: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    session: dict[str, int] = field(default_factory=dict)
    session_add: dict[str, int] = field(default_factory=dict)

    def count(self, what: str, n: int = 1) -> None:
        if n:
            self.counts[what] = self.counts.get(what, 0) + n


@runtime_checkable
class Plugin(Protocol):
    name: str
    version: str
    # Per-session counters this instance reads and adds to; optional, () for most. Counts are
    # read before the call and added after it settles, so concurrent calls of one session
    # can overshoot a limit by what they make together (the budget is the hard limit).
    session_counters: tuple[str, ...]

    def on_request(self, body: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        """The upstream body, after the PEP; return a rewritten body, None to pass."""
        ...

    def on_chunk(self, chunk: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        """One streamed chunk; return a rewritten chunk, None to pass."""
        ...

    def on_stream_end(self, last: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        """The upstream stream ended (`last` is its last chunk): a chunk still owed, or None."""
        ...

    def on_response(self, data: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        """A complete non-streamed answer; return a rewritten answer, None to pass."""
        ...


class PluginClass(Protocol):
    """What an entry point names: a class with its name, version and options model, built
    with its validated options and the (immutable) Assembly it serves."""

    name: ClassVar[str]
    version: ClassVar[str]
    Options: ClassVar[type[PluginOptions]]

    def __call__(self, options: Any, assembly: Assembly) -> Plugin: ...


class Registry:
    """The plugins this replica has, by name, and the built chains cached per (Assembly, steps)."""

    def __init__(self, classes: Iterable[Any] = (), *, cache_size: int = 1024) -> None:
        self._classes: dict[str, Any] = {}
        for cls in classes:
            self._classes[cls.name] = cls
        self._chains: OrderedDict[tuple[str, tuple[str, ...]], tuple[Plugin, ...]] = OrderedDict()
        self._cache_size = cache_size

    @classmethod
    def from_entry_points(cls, group: str = ENTRY_POINT_GROUP) -> Registry:
        """Every class registered under `group`; one that fails to load is logged and left out,
        so the Assemblies naming it get 503 `plugin_unavailable` and the others are served."""
        classes = []
        for ep in entry_points(group=group):
            try:
                loaded = ep.load()
                _check_class(loaded, ep.name)
            except Exception as exc:  # an operator's broken package must not stop the replica
                log.error("plugin %r (%s) not loaded: %s", ep.name, ep.value, exc)
                continue
            classes.append(loaded)
        return cls(classes)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._classes))

    def get(self, name: str) -> Any | None:
        return self._classes.get(name)

    def adding(self, *classes: Any) -> Registry:
        """The same registry plus more plugin classes (a replica with more installed)."""
        return Registry([*self._classes.values(), *classes])

    def without(self, *names: str) -> Registry:
        """The same registry less some plugins: a replica that lacks them."""
        return Registry(c for n, c in self._classes.items() if n not in names)

    def freeze(self, name: str, options: dict[str, Any]) -> PluginGrant:
        """Validate `options` with the plugin's own model; raises KeyError or ValidationError."""
        cls = self._classes[name]
        validated = cls.Options.model_validate(options)
        return PluginGrant(name=name, version=cls.version, options=validated.model_dump(mode="json"))

    def chain(self, assembly: Assembly, steps: tuple[str, ...]) -> tuple[Plugin, ...]:
        key = (assembly.id, steps)
        built = self._chains.get(key)
        if built is None:
            self._require_all(assembly)
            built = tuple(self._build(grant, assembly) for grant in _selected(assembly, steps))
            self._chains[key] = built
            while len(self._chains) > self._cache_size:
                self._chains.popitem(last=False)
        else:
            self._chains.move_to_end(key)
        return built

    def _require_all(self, assembly: Assembly) -> None:
        for grant in _all_grants(assembly):
            cls = self._classes.get(grant.name)
            if cls is None:
                reason = f"plugin {grant.name!r} is not installed on this replica"
            elif cls.version != grant.version:
                reason = f"plugin {grant.name!r} is version {cls.version} here; the Assembly froze {grant.version}"
            else:
                continue
            raise ServiceUnavailable(
                f"{reason}; this Assembly's calls are refused here", code="plugin_unavailable",
                extra={"plugin": grant.name},
            )

    def _build(self, grant: PluginGrant, assembly: Assembly) -> Plugin:
        cls = self._classes[grant.name]
        try:
            options = cls.Options.model_validate(grant.options)
        except ValidationError:
            # Valid when frozen, so the plugin's options model changed without a new version.
            raise ServiceUnavailable(
                f"plugin {grant.name!r} no longer accepts the options frozen in this Assembly",
                code="plugin_unavailable", extra={"plugin": grant.name},
            ) from None
        plugin: Plugin = cls(options, assembly)
        return plugin


def for_call(registry: Registry, assembly: Assembly, steps: tuple[str, ...]) -> tuple[Plugin, ...]:
    """The plugins that run on a call that could be any of `steps` (() without steps), in order;
    raises ServiceUnavailable `plugin_unavailable` when this replica can't run the Assembly's."""
    if not assembly.plugins and not any(s.plugins for s in assembly.steps):
        return ()
    return registry.chain(assembly, steps)


def _selected(assembly: Assembly, steps: Sequence[str]) -> list[PluginGrant]:
    """Plan-level plugins, then each candidate step's, an identical grant only once."""
    wanted = set(steps)
    grants = list(assembly.plugins)
    for step in assembly.steps:
        if step.id in wanted:
            grants.extend(g for g in step.plugins if g not in grants)
    return grants


def _all_grants(assembly: Assembly) -> list[PluginGrant]:
    return [*assembly.plugins, *(g for s in assembly.steps for g in s.plugins)]


def _check_class(cls: Any, registered_as: str) -> None:
    if not isinstance(cls, type):
        raise TypeError("an entry point must name a class")
    if getattr(cls, "name", None) != registered_as:
        raise TypeError(f"its class says name={getattr(cls, 'name', None)!r}")
    if not isinstance(getattr(cls, "version", None), str):
        raise TypeError("it has no version string")
    options = getattr(cls, "Options", None)
    if not (isinstance(options, type) and issubclass(options, BaseModel)):
        raise TypeError("its Options is not a pydantic model")
    for hook in ("on_request", "on_chunk", "on_stream_end", "on_response"):
        if not callable(getattr(cls, hook, None)):
            raise TypeError(f"it has no {hook} hook")


class Run:
    """One call's plugins, their scratch, and the time each hook takes (a metric)."""

    __slots__ = ("plugins", "scratch", "_observe")

    def __init__(self, plugins: tuple[Plugin, ...], observe: Any = None) -> None:
        self.plugins = plugins
        self.scratch = [Scratch() for _ in plugins]
        self._observe = observe  # (plugin, hook, seconds) -> None

    def __bool__(self) -> bool:
        return bool(self.plugins)

    def _timed(self, i: int, hook: str, *args: Any) -> dict[str, Any] | None:
        plugin = self.plugins[i]
        started = time.perf_counter()
        try:
            out: dict[str, Any] | None = getattr(plugin, hook)(*args, self.scratch[i])
            return out
        finally:
            if self._observe is not None:
                self._observe(plugin.name, hook, time.perf_counter() - started)

    def request(self, body: dict[str, Any]) -> dict[str, Any]:
        for i in range(len(self.plugins)):
            body = self._timed(i, "on_request", body) or body
        return body

    def chunk(self, chunk: dict[str, Any], start: int = 0) -> dict[str, Any] | None:
        """The rewritten chunk, or None when no plugin changed it (the raw bytes can be sent)."""
        changed = None
        for i in range(start, len(self.plugins)):
            out = self._timed(i, "on_chunk", changed or chunk)
            if out is not None:
                changed = out
        return changed

    def stream_end(self, last: dict[str, Any]) -> list[dict[str, Any]]:
        """Chunks still owed when the upstream stream ends (text a plugin held back), each
        passed through the chunk hooks of the plugins after the one that owed it."""
        owed = []
        for i in range(len(self.plugins)):
            out = self._timed(i, "on_stream_end", last)
            if out is not None:
                owed.append(self.chunk(out, i + 1) or out)
        return owed

    def response(self, data: dict[str, Any]) -> dict[str, Any] | None:
        changed = None
        for i in range(len(self.plugins)):
            out = self._timed(i, "on_response", changed or data)
            if out is not None:
                changed = out
        return changed

    def session_fields(self) -> list[tuple[int, str, str]]:
        """(plugin index, counter, Redis hash field) for every per-session counter wanted."""
        return [
            (i, c, f"{p.name}.{c}") for i, p in enumerate(self.plugins) for c in getattr(p, "session_counters", ())
        ]

    async def load_session(self, redis: Any, session_id: str) -> None:
        fields = self.session_fields()
        if not fields:
            return
        try:
            values = await redis.hmget(redis_keys.plugin_counters(session_id), [f for _, _, f in fields])
        except REDIS_ERRORS as exc:
            raise ServiceUnavailable("plugin counters unavailable") from exc
        for (i, counter, _), value in zip(fields, values, strict=True):
            self.scratch[i].session[counter] = int(value or 0)

    async def save_session(self, redis: Any, session_id: str, expires_at_s: int) -> None:
        adds = [(f, self.scratch[i].session_add.get(c, 0)) for i, c, f in self.session_fields()]
        adds = [(f, n) for f, n in adds if n]
        if not adds:
            return
        key = redis_keys.plugin_counters(session_id)
        pipe = redis.pipeline(transaction=True)
        for fieldname, n in adds:
            pipe.hincrby(key, fieldname, n)
        pipe.expireat(key, expires_at_s + 3600)  # gone with the session (its token's expiry)
        try:
            await pipe.execute()
        except REDIS_ERRORS:
            # The answer is settled and journaled; only the count is lost, so say so loudly.
            log.warning("plugin counters of session %s not saved", session_id)

    def counts(self) -> dict[str, dict[str, int]] | None:
        """What the plugins report for the journal, by plugin name; None when nothing."""
        report = {p.name: s.counts for p, s in zip(self.plugins, self.scratch, strict=True) if s.counts}
        return report or None
