"""The official openai SDK against a real gateway: the basic paths work."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import OPEN_PLAN, Gateway


def test_chat_completion_through_the_gateway(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=gateway.token(OPEN_PLAN))
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.total_tokens > 0
    assert raw.headers["x-abc-cost-usd"] != "0.000000000"
    assert raw.headers["x-request-id"].startswith("req_")


def test_streaming_with_usage(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key=gateway.token(OPEN_PLAN))
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text


def test_bad_token_is_401(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=gateway.openai_base, api_key="not-a-token", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
