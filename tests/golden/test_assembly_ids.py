"""The shipped example plans compile to these exact ids: a change means canonicalisation changed.

If one fails after an intended change (a new Assembly field, a schema bump, a litellm
upgrade that reprices gpt-4o), recompute the ids and say why in the commit.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
import yaml

from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import load_plan_file, parse_plan
from gateway.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]

GOLDEN_IDS = {
    "support-bot": "asm_33387b12578f05741d0909a32438fb8b",
    "pipeline": "asm_25fd49e6a97065aa2f106c349523b89c",
    "open-chat": "asm_0319ee6392b5490aab9a290016297595",
}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return load_settings(ROOT / "config" / "gateway.yaml")


@pytest.mark.parametrize("name", sorted(GOLDEN_IDS))
def test_example_plan_compiles_to_its_golden_id(name: str, settings: Settings) -> None:
    compiled = compile_plan(load_plan_file(ROOT / "config" / "plans" / f"{name}.yaml"), settings)
    assert compiled.warnings == []
    assert compiled.assembly_id == GOLDEN_IDS[name]


@pytest.mark.parametrize("name", sorted(GOLDEN_IDS))
def test_the_same_plan_sent_as_json_gets_the_same_id(name: str, settings: Settings) -> None:
    # The admin API receives plans as JSON bodies; the id must not depend on the format.
    text = (ROOT / "config" / "plans" / f"{name}.yaml").read_text(encoding="utf-8")
    body = orjson.loads(orjson.dumps(yaml.safe_load(text)))
    assert compile_plan(parse_plan(body), settings).assembly_id == GOLDEN_IDS[name]


def test_every_example_plan_is_pinned() -> None:
    shipped = {path.stem for path in (ROOT / "config" / "plans").glob("*.yaml")}
    assert shipped == set(GOLDEN_IDS)
