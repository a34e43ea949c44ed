"""Process settings: the YAML file named by --config/ABC_CONFIG plus ABC_* environment.

Read once at start into a frozen `Settings`; unknown keys are errors, and a bad file
fails with a message naming the field. Plans and Assemblies are not settings.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import ConfigError
from gateway.mcp import origins
from gateway.price_map import litellm_kind

DEFAULT_CONFIG_PATH = "config/gateway.yaml"


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Frozen):
    """USD per million tokens, as operators write it; frozen into integers at compile time."""

    input_per_mtok: Annotated[float, Field(ge=0)]
    output_per_mtok: Annotated[float, Field(ge=0)]


class TimeoutSettings(_Frozen):
    connect_s: Annotated[float, Field(gt=0)] = 10.0
    # Until the upstream's response headers (and a stream's first event) arrive.
    first_byte_s: Annotated[float, Field(gt=0)] = 600.0
    # Between two reads of the body: a stream that stalls mid-answer.
    idle_s: Annotated[float, Field(gt=0)] = 600.0
    total_s: Annotated[float, Field(gt=0)] | None = None


class RetrySettings(_Frozen):
    # Further attempts after the first; 0: no retry. Only before any byte reached the client.
    max: Annotated[int, Field(ge=0, le=10)] = 0
    backoff_s: Annotated[float, Field(ge=0)] = 0.25
    # The longest single wait, an upstream's Retry-After included.
    max_backoff_s: Annotated[float, Field(ge=0)] = 5.0


class BreakerSettings(_Frozen):
    # Consecutive failed attempts that open the breaker; 0: no breaker.
    failures: Annotated[int, Field(ge=0)] = 0
    cooldown_s: Annotated[float, Field(gt=0)] = 30.0


class ProviderSettings(_Frozen):
    name: Annotated[str, Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["openai", "anthropic", "litellm", "mock"]
    # Only this base URL is ever contacted for the provider; requests cannot change it.
    api_base: str | None = None
    # Name of the environment variable holding the upstream key (never the key itself).
    api_key_env: str | None = None
    timeouts: TimeoutSettings = TimeoutSettings()
    retries: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    # litellm only: the provider prefix litellm routes on ("anthropic", "bedrock", ...).
    litellm_provider: str | None = None
    # litellm only: the API version some providers want in the URL (Azure OpenAI).
    api_version: str | None = None
    # mock only: how long its "slow" models wait before answering.
    slow_delay_s: Annotated[float, Field(ge=0)] = 2.0
    # openai only: "native" when the upstream serves /v1/responses itself (OpenAI does; vLLM
    # and Ollama don't), so Responses calls pass through instead of becoming chat calls.
    responses: Literal["native", "translate"] = "translate"

    @model_validator(mode="after")
    def _api_base_for_openai(self) -> ProviderSettings:
        if self.responses == "native" and self.kind != "openai":
            raise ValueError("responses: native is only for providers of kind 'openai'")
        if self.kind in ("openai", "anthropic"):
            if not self.api_base:
                raise ValueError(f"providers of kind '{self.kind}' need api_base")
            if not self.api_base.startswith(("http://", "https://")):
                raise ValueError("api_base must be an http:// or https:// URL")
        return self

    def api_key(self) -> str | None:
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None


class DeploymentSettings(_Frozen):
    """One more upstream serving a model, at the model's price or at its own."""

    provider: str
    upstream_model: str | None = None  # absent: the model's
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    # Absent: the model's price. Frozen into the Assembly like it; a call is charged the
    # price of the deployment that served it, and reserves the dearest.
    price: Price | None = None


class ModelSettings(_Frozen):
    name: Annotated[str, Field(min_length=1)]
    provider: str
    upstream_model: str | None = None
    price: Price | None = None
    # tiktoken encoding used for estimates; absent: guessed from the name, else a conservative bound.
    encoding: str | None = None
    # Absent: litellm's price map says (its "mode"), else chat.
    kind: Literal["chat", "embedding", "completion"] = "chat"
    # More upstreams for this model, at its price unless they declare their own; the first
    # deployment is the model's own provider, upstream_model and price, with `weight`.
    deployments: list[DeploymentSettings] = Field(default_factory=list)
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    balance: Literal["weighted", "least_in_flight"] = "weighted"

    @model_validator(mode="before")
    @classmethod
    def _first_deployment_is_the_model(cls, data: Any) -> Any:
        """`deployments: [...]` without a `provider`: the first deployment is the model's own."""
        if isinstance(data, dict) and "provider" not in data and isinstance(data.get("deployments"), list) and data["deployments"]:
            first, *rest = data["deployments"]
            if isinstance(first, dict):
                data = {**data, "provider": first.get("provider"), "deployments": rest, "weight": first.get("weight", 1)}
                if first.get("upstream_model"):
                    data["upstream_model"] = first["upstream_model"]
                if first.get("price") is not None:
                    if data.get("price") is not None:
                        raise ValueError("deployments.0.price: the first deployment is the model's own; give its price once")
                    data["price"] = first["price"]
        return data

    @model_validator(mode="before")
    @classmethod
    def _infer_kind(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("kind") is None and isinstance(data.get("name"), str):
            names = [n for n in (data.get("upstream_model"), data["name"]) if isinstance(n, str)]
            return {**data, "kind": litellm_kind(*names) or "chat"}
        return data

    @property
    def target(self) -> str:
        return self.upstream_model or self.name


class ServerSettings(_Frozen):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8080
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_body_bytes: Annotated[int, Field(gt=0)] = 4 * 1024 * 1024
    # Requests handled at once; past it a 503 with Retry-After, so memory and queues stay
    # bounded (see docs/threat-model.md). Health, readiness and metrics are not counted.
    max_in_flight: Annotated[int, Field(gt=0)] = 512
    # Open client connections; one past it is answered 503 and closed at once.
    max_connections: Annotated[int, Field(gt=0)] = 2048
    # A streamed answer whose client stops reading for this long is cut (and charged).
    stream_write_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    retry_after_s: Annotated[int, Field(ge=1, le=3600)] = 1
    # Metrics are unauthenticated unless a token is configured (ABC_METRICS_TOKEN).
    metrics_enabled: bool = True
    # Browser origins ("https://app.example.com", "null") whose pages may call /mcp besides
    # loopback ones; a request from any other Origin is refused (DNS rebinding, see
    # gateway.mcp.origins). Requests without an Origin (SDKs, agents) are not affected.
    mcp_allowed_origins: list[str] = Field(default_factory=list)

    @field_validator("mcp_allowed_origins")
    @classmethod
    def _origins(cls, listed: list[str]) -> list[str]:
        normalized = []
        for origin in listed:
            shown = origins.normalize(origin)
            if shown is None:
                raise ValueError(f"not an origin (scheme://host[:port], or null): {origin!r}")
            normalized.append(shown)
        return normalized


class RedisSettings(_Frozen):
    # ABC_REDIS_URL overrides; absent both: an embedded redis-server under data_dir.
    url: str | None = None
    data_dir: str = "./var"
    # Past this, a Redis call counts as down and the request fails closed with 503.
    timeout_ms: Annotated[int, Field(gt=0)] = 1000
    max_connections: Annotated[int, Field(gt=0)] = 64  # per Redis node in cluster mode
    # Redis Cluster (or ABC_REDIS_CLUSTER=1): `url` names any node; the client finds the rest.
    cluster: bool = False
    # The global indexes (journal index, cost rollups, due reservations) are split over this
    # many keys, each in its own hash slot, so no single key takes every request's writes.
    # Changing it hides what older shards hold from reports: pick it once.
    shards: Annotated[int, Field(ge=1, le=1024)] = 16
    # Replicas that must have a settlement (WAIT) before its answer goes out; 0: don't wait.
    # With 1, an answer the client got survives the failover of its Redis master.
    wait_replicas: Annotated[int, Field(ge=0, le=16)] = 0
    wait_timeout_ms: Annotated[int, Field(gt=0)] = 500

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> RedisSettings:
        if self.cluster and not self.url:
            raise ValueError("cluster mode needs ABC_REDIS_URL (or redis.url) naming a node of the cluster")
        return self


class BudgetSettings(_Frozen):
    # The backstop: a reservation still open after this long is charged in full.
    reservation_ttl_s: Annotated[int, Field(gt=0)] = 900
    reaper_interval_s: Annotated[float, Field(gt=0)] = 1.0
    # A process renews the lease of each request it works on every third of this; once a
    # lease runs out its process is taken for dead: the reaper closes the reservation and a
    # retry with the same Idempotency-Key takes the request over.
    lease_s: Annotated[float, Field(gt=0)] = 3.0
    # How long a duplicate of a keyed request in progress waits for its answer before 409.
    idempotency_wait_s: Annotated[float, Field(ge=0)] = 5.0
    # Settlements that Redis could not take, kept and retried until it does; while this
    # many wait, new requests get 503 rather than run with nowhere to settle.
    settle_backlog: Annotated[int, Field(gt=0)] = 1000


class JournalSettings(_Frozen):
    compress_over_bytes: Annotated[int, Field(gt=0)] = 16384
    # Per-session streams expire this long after the session does (see README: Retention).
    retention_s: Annotated[int, Field(gt=0)] = 30 * 24 * 3600


class ToolServerSettings(_Frozen):
    """An MCP server whose tools plans may grant: streamable HTTP at `url`, or a local
    `command` the gateway starts and talks to over stdio. Clients never see either."""

    # "__" separates server and tool in the names clients see, so it can't be in here.
    name: Annotated[str, Field(pattern=r"^[a-z0-9]+(?:[-_][a-z0-9]+)*$", max_length=64)]
    kind: Literal["mcp"] = "mcp"
    url: str | None = None
    # Header name -> the environment variable holding its value (never the value itself).
    headers_env: dict[str, str] = Field(default_factory=dict)
    command: Annotated[list[str], Field(min_length=1)] | None = None
    timeout_s: Annotated[float, Field(gt=0)] = 30.0
    # How long a tools/list answer counts as the server's current definitions when a call
    # is checked against its frozen hash (the rug-pull check); 0 asks before every call.
    definitions_ttl_s: Annotated[float, Field(ge=0)] = 1.0
    max_result_bytes: Annotated[int, Field(gt=0)] = 1024 * 1024

    @model_validator(mode="after")
    def _one_transport(self) -> ToolServerSettings:
        if (self.url is None) == (self.command is None):
            raise ValueError("a tool server needs exactly one of url or command")
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError("url must be an http:// or https:// URL")
        return self

    def headers(self) -> dict[str, str]:
        return {header: os.environ[env] for header, env in self.headers_env.items() if os.environ.get(env)}

class LogSettings(_Frozen):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "text"] = "json"


class OtelSettings(_Frozen):
    # OTLP/HTTP traces endpoint (e.g. http://collector:4318/v1/traces); absent: no tracing,
    # and opentelemetry is never imported.
    endpoint: str | None = None
    service_name: str = "abc-gateway"

    @model_validator(mode="after")
    def _http_endpoint(self) -> OtelSettings:
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise ValueError("otel.endpoint must be an http:// or https:// URL")
        return self


class Settings(_Frozen):
    providers: list[ProviderSettings] = Field(default_factory=list)
    models: list[ModelSettings] = Field(default_factory=list)
    server: ServerSettings = ServerSettings()
    redis: RedisSettings = RedisSettings()
    budget: BudgetSettings = BudgetSettings()
    journal: JournalSettings = JournalSettings()
    tool_servers: list[ToolServerSettings] = Field(default_factory=list)
    log: LogSettings = LogSettings()
    otel: OtelSettings = OtelSettings()
    # Secrets come from the environment only, never from the file.
    admin_token: SecretStr | None = Field(default=None, exclude=True)
    signing_key: SecretStr | None = Field(default=None, exclude=True)
    metrics_token: SecretStr | None = Field(default=None, exclude=True)
    # Who holds the admin token, recorded with every plan version it compiles (not a secret).
    admin_token_label: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[\x21-\x7e]+$")] = "admin"

    @model_validator(mode="after")
    def _references(self) -> Settings:
        providers = [p.name for p in self.providers]
        if len(set(providers)) != len(providers):
            raise ValueError("provider names must be unique")
        seen: set[str] = set()
        for i, m in enumerate(self.models):
            name = m.name.strip().lower()
            if name in seen:
                raise ValueError(f"models.{i}.name: {m.name!r} is declared twice (names are case-insensitive)")
            seen.add(name)
        servers = [t.name for t in self.tool_servers]
        if len(set(servers)) != len(servers):
            raise ValueError("tool server names must be unique")
        for i, m in enumerate(self.models):
            if m.provider not in providers:
                raise ValueError(f"models.{i}.provider: unknown provider {m.provider!r}")
            for j, d in enumerate(m.deployments):
                if d.provider not in providers:
                    raise ValueError(f"models.{i}.deployments.{j}.provider: unknown provider {d.provider!r}")
        return self

    def provider(self, name: str) -> ProviderSettings:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(name)

    def tool_server(self, name: str) -> ToolServerSettings | None:
        return next((t for t in self.tool_servers if t.name == name), None)

    def unset_credentials(self) -> list[str]:
        """Where a credential's environment variable is named but unset or empty, e.g.
        "providers.openai.api_key_env=OPENAI_API_KEY": those calls would go out without it.
        Names only, never values."""
        unset = [
            f"providers.{p.name}.api_key_env={p.api_key_env}" for p in self.providers
            if p.api_key_env and not os.environ.get(p.api_key_env)
        ]
        unset += [
            f"tool_servers.{t.name}.headers_env.{header}={env}" for t in self.tool_servers
            for header, env in t.headers_env.items() if not os.environ.get(env)
        ]
        return unset

    def model(self, name: str) -> ModelSettings | None:
        wanted = name.strip().lower()
        for m in self.models:
            if m.name.strip().lower() == wanted:
                return m
        return None


def _format_validation_error(source: str, exc: ValidationError) -> str:
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        problems.append(f"{where}: {err['msg']}")
    return f"{source}: invalid settings: " + "; ".join(problems)


_FLAGS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def settings_from_dict(data: dict[str, Any], *, source: str = "settings") -> Settings:
    env = {
        "admin_token": os.environ.get("ABC_ADMIN_TOKEN") or None,
        "signing_key": os.environ.get("ABC_SIGNING_KEY") or None,
        "metrics_token": os.environ.get("ABC_METRICS_TOKEN") or None,
        "admin_token_label": os.environ.get("ABC_ADMIN_TOKEN_LABEL") or None,
    }
    for key in env:
        if key in data:
            raise ConfigError(f"{source}: {key}: secrets are read from the environment only")
    data = dict(data)
    data.update({k: v for k, v in env.items() if v is not None})
    redis_url = os.environ.get("ABC_REDIS_URL")
    if redis_url:
        data["redis"] = {**(data.get("redis") or {}), "url": redis_url}
    cluster = os.environ.get("ABC_REDIS_CLUSTER", "").strip().lower()
    if cluster:
        if cluster not in _FLAGS:
            raise ConfigError(f"ABC_REDIS_CLUSTER: expected one of {', '.join(sorted(_FLAGS))}, got {cluster!r}")
        data["redis"] = {**(data.get("redis") or {}), "cluster": _FLAGS[cluster]}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(source, exc)) from None


def packaged(name: str) -> Path:
    """A file shipped inside the package (gateway/defaults/): first-run settings and example plans."""
    return Path(str(resources.files("gateway").joinpath("defaults", name)))


def config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """--config, else ABC_CONFIG, else ./config/gateway.yaml, else the settings shipped in the package."""
    chosen = path or os.environ.get("ABC_CONFIG")
    if chosen:
        return Path(chosen)
    local = Path(DEFAULT_CONFIG_PATH)
    return local if local.exists() else packaged("gateway.yaml")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    source = config_path(path)
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"{source}: not valid YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping")
    return settings_from_dict(raw, source=str(source))
