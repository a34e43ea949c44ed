"""The estimates' encodings load before the first request needs them."""

from __future__ import annotations

from gateway import server, tokenizer
from tests.conftest import make_settings


def test_the_server_warms_the_encodings_the_configured_models_use() -> None:
    settings = make_settings()
    wanted = server._encodings(settings)
    assert wanted  # the test settings have OpenAI models
    assert wanted == {
        m.encoding or tokenizer.encoding_name_for(m.target) or tokenizer.encoding_name_for(m.name)
        for m in settings.models
    } - {None}


def test_warming_loads_each_encoding_once_and_counting_then_uses_it() -> None:
    tokenizer.get_encoding.cache_clear()
    tokenizer.warm(["cl100k_base"])
    assert tokenizer.get_encoding.cache_info().currsize == 1
    misses = tokenizer.get_encoding.cache_info().misses
    assert tokenizer.count_text("hello world", "cl100k_base") == 2
    assert tokenizer.get_encoding.cache_info().misses == misses  # no second load on the request path
