"""Token counting with tiktoken, offline.

tiktoken normally downloads its encodings; litellm's wheel ships cl100k_base,
o200k_base and p50k_base in tiktoken's cache layout, so we point TIKTOKEN_CACHE_DIR
there, found with importlib's finder so litellm itself is never imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tiktoken

_O200K_PREFIXES = ("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "o1", "o3", "o4", "chatgpt-4o")
_CL100K_PREFIXES = ("gpt-4", "gpt-3.5", "text-embedding-3", "text-embedding-ada")
# OpenAI's documented chat framing: every message costs 3 tokens, every reply is primed with 3.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


def _litellm_tokenizers_dir() -> Path | None:
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    candidate = Path(next(iter(spec.submodule_search_locations))) / "litellm_core_utils" / "tokenizers"
    return candidate if candidate.is_dir() else None


def configure_offline_cache() -> None:
    if os.environ.get("TIKTOKEN_CACHE_DIR"):
        return
    found = _litellm_tokenizers_dir()
    if found is not None:
        os.environ["TIKTOKEN_CACHE_DIR"] = str(found)


configure_offline_cache()


def encoding_name_for(model: str) -> str | None:
    """The tiktoken encoding of an OpenAI model name, or None when unknown."""
    name = model.strip().lower().rsplit("/", 1)[-1]
    if name.startswith(_O200K_PREFIXES):
        return "o200k_base"
    if name.startswith(_CL100K_PREFIXES):
        return "cl100k_base"
    return None


@functools.lru_cache(maxsize=8)
def get_encoding(name: str) -> tiktoken.Encoding:
    return tiktoken.get_encoding(name)


def warm(names: Iterable[str]) -> None:
    """Load encodings ahead of the first request that needs one (each takes a second or
    two to build); blocking, so the server runs it on a thread."""
    for name in names:
        get_encoding(name)


def count_text(text: str, encoding: str | None) -> int:
    """Exact count with a known encoding; else the UTF-8 byte length, which bounds any BPE count."""
    if not text:
        return 0
    if encoding is None:
        return len(text.encode("utf-8"))
    # Special-token text counts as the ordinary text it is (what encode(..., disallowed_special=())
    # does too), without the special-token scan.
    return len(get_encoding(encoding).encode_ordinary(text))


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts; only text parts carry tokens we can count
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def count_chat_prompt(messages: list[Any], encoding: str | None) -> int:
    """Prompt tokens of a chat request, framed the way OpenAI counts them."""
    total = TOKENS_PER_REPLY
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if key == "content":
                total += count_text(_content_text(value), encoding)
            elif isinstance(value, str):
                total += count_text(value, encoding)
            elif key == "tool_calls" and isinstance(value, list):
                for call in value:
                    fn = call.get("function", {}) if isinstance(call, dict) else {}
                    total += count_text(str(fn.get("name", "")), encoding)
                    total += count_text(str(fn.get("arguments", "")), encoding)
    return total
