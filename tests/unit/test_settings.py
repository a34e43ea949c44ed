"""Settings: the YAML file plus ABC_* environment, strictly validated.

Unknown keys and wrong types fail with the dotted path of the field, secrets never come
from the file, and ABC_REDIS_URL wins over the file.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.errors import ConfigError
from gateway.settings import load_settings, settings_from_dict

BASE: dict[str, Any] = {
    "providers": [
        {"name": "mock", "kind": "mock"},
        {"name": "local", "kind": "openai", "api_base": "http://127.0.0.1:9000/v1", "api_key_env": "LOCAL_API_KEY"},
    ],
    "models": [
        {"name": "gpt-4o-mini", "provider": "mock", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}},
        {"name": "local-llama", "provider": "local"},
    ],
    "server": {"host": "127.0.0.1", "port": 8080},
    "redis": {"data_dir": "./var"},
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("ABC_CONFIG", "ABC_REDIS_URL", "ABC_ADMIN_TOKEN", "ABC_SIGNING_KEY", "ABC_METRICS_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def _with(path: str, value: Any) -> dict[str, Any]:
    """BASE with `value` set at a dotted path (list indexes as numbers)."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node: Any = data
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        settings_from_dict(data, source="gw.yaml")
    message = str(info.value)
    assert message.startswith("gw.yaml: "), message
    assert "\n" not in message, message
    return message


def test_the_base_settings_and_the_shipped_file_are_valid() -> None:
    settings = settings_from_dict(BASE)
    assert [m.name for m in settings.models] == ["gpt-4o-mini", "local-llama"]
    shipped = load_settings(Path(__file__).resolve().parents[2] / "config" / "gateway.yaml")
    assert shipped.model("GPT-4o-mini ") is not None
    assert shipped.redis.url is None and shipped.admin_token is None


@pytest.mark.parametrize(
    "path",
    ["surprise", "server.surprise", "redis.surprise", "budget.surprise", "journal.surprise",
     "providers.0.surprise", "models.0.surprise", "models.0.price.surprise"],
)
def test_an_unknown_key_at_any_level_is_rejected_with_its_dotted_path(path: str) -> None:
    message = _error(_with(path, 1))
    assert f"{path}: Extra inputs are not permitted" in message


def test_an_upstream_key_in_the_file_is_just_an_unknown_key() -> None:
    assert "providers.1.api_key: Extra inputs are not permitted" in _error(_with("providers.1.api_key", "sk-secret"))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("models.0.price.input_per_mtok", "cheap"),
        ("models.0.price.output_per_mtok", -1),
        ("server.port", "eighty"),
        ("server.port", 70000),
        ("server.workers", 0),
        ("providers.0.kind", "azure"),
        ("redis.timeout_ms", [1]),
    ],
)
def test_a_wrong_value_names_the_field(path: str, value: Any) -> None:
    assert f"{path}: " in _error(_with(path, value))


def test_every_problem_is_reported_at_once() -> None:
    data = _with("models.0.price.input_per_mtok", "x")
    data["server"]["port"] = "y"
    message = _error(data)
    assert "models.0.price.input_per_mtok" in message and "server.port" in message


def test_a_model_naming_an_unknown_provider_is_rejected() -> None:
    message = _error(_with("models.1.provider", "nowhere"))
    assert "models.1.provider" in message and "'nowhere'" in message


def test_model_names_must_be_unique_ignoring_case_and_spaces() -> None:
    data = copy.deepcopy(BASE)
    data["models"].append({"name": " GPT-4o-Mini", "provider": "local"})
    message = _error(data)
    duplicate = len(data["models"]) - 1
    assert f"models.{duplicate}.name" in message and "declared twice" in message


def test_provider_names_must_be_unique() -> None:
    data = copy.deepcopy(BASE)
    data["providers"].append({"name": "mock", "kind": "mock"})
    assert "provider names must be unique" in _error(data)


def test_an_openai_provider_needs_an_http_api_base() -> None:
    data = copy.deepcopy(BASE)
    del data["providers"][1]["api_base"]
    message = _error(data)
    assert "providers.1" in message and "need api_base" in message
    message = _error(_with("providers.1.api_base", "file:///etc/passwd"))
    assert "providers.1" in message and "http://" in message


def test_an_anthropic_provider_needs_an_api_base_and_only_openai_serves_responses_natively() -> None:
    data = copy.deepcopy(BASE)
    data["providers"].append({"name": "claude", "kind": "anthropic"})
    assert "kind 'anthropic' need api_base" in _error(data)
    data["providers"][-1]["api_base"] = "https://api.anthropic.com/v1"
    assert settings_from_dict(data).provider("claude").kind == "anthropic"
    data["providers"][-1]["responses"] = "native"
    assert "responses: native is only for providers of kind 'openai'" in _error(data)
    data["providers"][-1] = {"name": "oai", "kind": "openai", "api_base": "https://api.openai.com/v1", "responses": "native"}
    assert settings_from_dict(data).provider("oai").responses == "native"


@pytest.mark.parametrize("key", ["admin_token", "signing_key", "metrics_token"])
def test_secrets_in_the_file_are_refused(key: str) -> None:
    data = {**BASE, key: "x" * 40}
    message = _error(data)
    assert f"{key}: secrets are read from the environment only" in message
    assert "x" * 40 not in message


def test_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ABC_ADMIN_TOKEN", "admin-from-env")
    monkeypatch.setenv("ABC_SIGNING_KEY", "s" * 32)
    settings = settings_from_dict(BASE)
    assert settings.admin_token is not None and settings.admin_token.get_secret_value() == "admin-from-env"
    assert settings.signing_key is not None and settings.signing_key.get_secret_value() == "s" * 32
    assert "admin-from-env" not in repr(settings) and "admin_token" not in settings.model_dump()


def test_abc_redis_url_overrides_the_file(monkeypatch: pytest.MonkeyPatch) -> None:
    data = _with("redis.url", "redis://from-file:6379/0")
    assert settings_from_dict(data).redis.url == "redis://from-file:6379/0"
    monkeypatch.setenv("ABC_REDIS_URL", "redis://from-env:6380/1")
    settings = settings_from_dict(data)
    assert settings.redis.url == "redis://from-env:6380/1"
    assert settings.redis.data_dir == "./var"  # the rest of the section is kept
    assert settings_from_dict(BASE).redis.url == "redis://from-env:6380/1"  # even with no url in the file


def test_without_any_redis_url_the_embedded_server_is_used() -> None:
    assert settings_from_dict(BASE).redis.url is None


def test_load_settings_reads_the_file_named_by_abc_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(_with("server.port", 9123)), encoding="utf-8")
    monkeypatch.setenv("ABC_CONFIG", str(path))
    assert load_settings().server.port == 9123
    assert load_settings(path).server.port == 9123


def test_a_missing_file_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.yaml"
    with pytest.raises(ConfigError, match="config file not found") as info:
        load_settings(path)
    assert str(path) in str(info.value)


def test_invalid_yaml_names_its_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("providers: [\n  {name: mock\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: ")


def test_a_top_level_that_is_not_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- providers\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_settings(path)


def test_an_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n", encoding="utf-8")
    settings = load_settings(path)
    assert settings.providers == [] and settings.server.port == 8080 and settings.redis.data_dir == "./var"


def test_a_file_error_names_the_file_and_field(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(_with("models.0.price.input_per_mtok", "x")), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: invalid settings: models.0.price.input_per_mtok: ")


def test_settings_are_frozen() -> None:
    settings = settings_from_dict(BASE)
    with pytest.raises(Exception, match="frozen"):
        settings.server.port = 1


def test_cluster_mode_comes_from_the_file_or_abc_redis_cluster_and_needs_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    assert settings_from_dict(BASE).redis.cluster is False  # a single node is the default
    with pytest.raises(ConfigError, match="redis: Value error, cluster mode needs ABC_REDIS_URL"):
        settings_from_dict(_with("redis.cluster", True))  # the embedded server is one node
    monkeypatch.setenv("ABC_REDIS_URL", "redis://node-3:7002/0")
    assert settings_from_dict(_with("redis.cluster", True)).redis.cluster is True
    for value, expected in (("1", True), ("true", True), ("0", False), ("no", False)):
        monkeypatch.setenv("ABC_REDIS_CLUSTER", value)
        assert settings_from_dict(BASE).redis.cluster is expected
    monkeypatch.setenv("ABC_REDIS_CLUSTER", "maybe")
    with pytest.raises(ConfigError, match="ABC_REDIS_CLUSTER"):
        settings_from_dict(BASE)


@pytest.mark.parametrize(("path", "value"), [("redis.shards", 0), ("redis.shards", 2000), ("redis.wait_replicas", -1)])
def test_index_shards_and_replica_acks_are_bounded(path: str, value: int) -> None:
    with pytest.raises(ConfigError, match=path):
        settings_from_dict(_with(path, value))


def test_credentials_named_but_unset_are_listed_by_where_they_are_named(monkeypatch: pytest.MonkeyPatch) -> None:
    data = copy.deepcopy(BASE)
    data["tool_servers"] = [{"name": "shop", "url": "http://127.0.0.1:7000/mcp", "headers_env": {"Authorization": "SHOP_AUTH", "X-Team": "SHOP_TEAM"}}]
    monkeypatch.delenv("LOCAL_API_KEY", raising=False)
    monkeypatch.setenv("SHOP_AUTH", "Bearer s3cret")
    monkeypatch.setenv("SHOP_TEAM", "")  # empty is unset: the header would be dropped
    unset = settings_from_dict(data, source="gw.yaml").unset_credentials()
    assert unset == ["providers.local.api_key_env=LOCAL_API_KEY", "tool_servers.shop.headers_env.X-Team=SHOP_TEAM"]
    assert "s3cret" not in repr(unset)
    monkeypatch.setenv("LOCAL_API_KEY", "sk-x")
    monkeypatch.setenv("SHOP_TEAM", "blue")
    assert settings_from_dict(data, source="gw.yaml").unset_credentials() == []
