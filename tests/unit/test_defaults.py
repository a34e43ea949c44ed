"""Settings shipped in the package, which file wins, and model kinds from litellm's map."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import Plan
from gateway.settings import (
    DEFAULT_CONFIG_PATH,
    config_path,
    load_settings,
    packaged,
    settings_from_dict,
)
from tests.conftest import ROOT


def test_the_shipped_example_plans_are_the_repository_s() -> None:
    shipped = {p.name: p.read_bytes() for p in packaged("plans").glob("*.yaml")}
    assert shipped == {p.name: p.read_bytes() for p in (ROOT / "config" / "plans").glob("*.yaml")}


def test_the_shipped_settings_price_their_models_as_the_repository_s() -> None:
    shipped, local = load_settings(packaged("gateway.yaml")), load_settings(ROOT / "config" / "gateway.yaml")
    assert [p.kind for p in shipped.providers] == ["mock"]
    for model in shipped.models:
        assert model == local.model(model.name)


def test_config_flag_then_env_then_local_file_then_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ABC_CONFIG", raising=False)
    assert config_path() == packaged("gateway.yaml")
    assert load_settings().model("gpt-4o-mini") is not None
    (tmp_path / "config").mkdir()
    (tmp_path / DEFAULT_CONFIG_PATH).write_text("providers: [{name: m, kind: mock}]\n")
    assert config_path() == Path(DEFAULT_CONFIG_PATH) and load_settings().models == []
    monkeypatch.setenv("ABC_CONFIG", "/elsewhere/env.yaml")
    assert config_path() == Path("/elsewhere/env.yaml")
    assert config_path("flag.yaml") == Path("flag.yaml")


def test_a_model_s_kind_comes_from_litellm_s_map_unless_written() -> None:
    settings = settings_from_dict({
        "providers": [{"name": "m", "kind": "mock"}],
        "models": [
            {"name": "text-embedding-3-small", "provider": "m"},
            {"name": "my-embedder", "provider": "m", "upstream_model": "openai/text-embedding-3-large"},
            {"name": "gpt-3.5-turbo-instruct", "provider": "m"},
            {"name": "gpt-4o", "provider": "m"},
            {"name": "in-house", "provider": "m"},
            {"name": "text-embedding-ada-002", "provider": "m", "kind": "chat"},
        ],
    })
    kinds = {m.name: m.kind for m in settings.models}
    assert kinds == {
        "text-embedding-3-small": "embedding", "my-embedder": "embedding", "gpt-3.5-turbo-instruct": "completion",
        "gpt-4o": "chat", "in-house": "chat", "text-embedding-ada-002": "chat",
    }
    plan = Plan.model_validate({"name": "e", "models": [{"name": "text-embedding-3-small"}], "budget": {"usd": 1}})
    compiled = compile_plan(plan, settings)  # an embedding model needs no max_tokens
    assert compiled.assembly.models["text-embedding-3-small"].kind == "embedding"
