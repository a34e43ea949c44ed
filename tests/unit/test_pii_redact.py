"""pii_redact: what it masks and what it leaves, in prompts, answers and streams whose
chunks cut a match in two; redaction is idempotent and never leaves a Luhn-valid card."""

from __future__ import annotations

import re
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.assembly.compile import compile_plan
from gateway.assembly.plan import parse_plan
from gateway.plugins import Scratch
from plugins.pii_redact import PiiRedact, PiiRedactOptions, StreamRedactor, luhn_valid, redact
from tests.conftest import make_settings

ASSEMBLY = compile_plan(parse_plan({"name": "p", "models": [{"name": "gpt-4o-mini", "max_tokens": 8}]}), make_settings()).assembly
CARD = "4111 1111 1111 1111"  # Luhn-valid
NOT_A_CARD = "4111 1111 1111 1112"
IBAN = "DE89 3704 0044 0532 0130 00"
TEXT = (f"Hi, I am bob.smith+shop@example.co.uk; card {CARD}, IBAN {IBAN}, "
        "server 192.168.10.20 and fe80::1ff:fe23:4567:890a, call +1 (415) 555-0100 today.")


def plugin(answers: bool = True) -> PiiRedact:
    return PiiRedact(PiiRedactOptions(answers=answers), ASSEMBLY)


def test_each_kind_is_masked_and_counted() -> None:
    counts: dict[str, int] = {}
    out = redact(TEXT, counts)
    assert out == ("Hi, I am [email]; card [card], IBAN [iban], server [ip] and [ip], call [phone] today.")
    assert counts == {"email": 1, "card": 1, "iban": 1, "ip": 2, "phone": 1}


def test_numbers_that_are_not_pii_are_left_alone() -> None:
    text = f"Order {NOT_A_CARD} on 2024-01-15 cost 1234.56, version 1.2.3, IBAN DE00 3704 0044 0532 0130 00, at 12:30:45"
    assert redact(text) == text


def test_a_trailing_upper_case_word_does_not_hide_an_iban() -> None:
    assert redact(f"{IBAN} IS MINE") == "[iban] IS MINE"


def test_prompts_are_redacted_and_counted_but_never_mutated() -> None:
    body: dict[str, Any] = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"card {CARD}"}]},
        {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"to": "a@b.io"}'}}]},
        {"role": "user", "content": "hello"},
    ]}
    scratch = Scratch()
    out = plugin().on_request(body, scratch)
    assert out is not None
    assert out["messages"][0]["content"][0]["text"] == "card [card]"
    assert out["messages"][1]["tool_calls"][0]["function"]["arguments"] == '{"to": "[email]"}'
    assert scratch.counts == {"prompt_card": 1, "prompt_email": 1}
    assert body["messages"][0]["content"][0]["text"] == f"card {CARD}"
    assert plugin().on_request({"messages": [{"role": "user", "content": "hello"}]}, Scratch()) is None
    completion = plugin().on_request({"prompt": ["a@b.io", "x"]}, Scratch())
    assert completion is not None and completion["prompt"] == ["[email]", "x"]


def test_answers_are_redacted_only_when_the_plan_says_so() -> None:
    data = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "write to a@b.io"}}]}
    assert plugin(answers=False).on_response(data, Scratch()) is None
    scratch = Scratch()
    out = plugin().on_response(data, scratch)
    assert out is not None and out["choices"][0]["message"]["content"] == "write to [email]"
    assert scratch.counts == {"answer_email": 1}


def chunk(text: str | None, finish: str | None = None, index: int = 0) -> dict[str, Any]:
    delta = {} if text is None else {"content": text}
    return {"id": "c1", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": index, "delta": delta, "finish_reason": finish}]}


def streamed(pieces: list[str], *, finish: bool = True) -> tuple[str, Scratch]:
    pii, scratch, out = plugin(), Scratch(), []
    chunks = [chunk(p) for p in pieces] + ([chunk(None, "stop")] if finish else [])
    for c in chunks:
        rewritten = pii.on_chunk(c, scratch) or c
        out.append(rewritten["choices"][0]["delta"].get("content") or "")
    owed = pii.on_stream_end(chunks[-1], scratch)
    if owed is not None:
        out.append(owed["choices"][0]["delta"]["content"])
    return "".join(out), scratch


def test_a_match_cut_across_two_chunks_is_still_masked_wherever_the_cut_falls() -> None:
    for cut in range(1, len(TEXT)):
        text, scratch = streamed([TEXT[:cut], TEXT[cut:]])
        assert text == redact(TEXT), cut
        assert scratch.counts == {"answer_email": 1, "answer_card": 1, "answer_iban": 1, "answer_ip": 2, "answer_phone": 1}


def test_text_held_back_is_sent_at_the_end_even_without_a_finish_reason() -> None:
    text, _ = streamed(["call +1 415 555 ", "0100"], finish=False)
    assert text == "call [phone]"


def test_plain_words_are_not_held_back() -> None:
    redactor = StreamRedactor()
    assert redactor.feed("Hello there, how ", {}) == "Hello there, how "
    assert redactor.feed("are you 41", {}) == "are you "
    assert redactor.pending == "41"


def test_held_back_text_stays_bounded_without_a_safe_boundary() -> None:
    redactor = StreamRedactor()
    sent = "".join(redactor.feed("A" * 100, {}) for _ in range(50))
    assert len(redactor.pending) <= 1024 and sent + redactor.pending == "A" * 5000


# Text made of what PII is made of, so the patterns and their boundaries get exercised.
PIECES = st.sampled_from([CARD, NOT_A_CARD, "4111111111111111", IBAN, "a@b.io", "x.y@ex-ample.com", "10.0.0.1",
                          "::1", "+44 20 7946 0958", "(415) 555-0100", "555 0100", " ", "  ", "-", ".", "@", ":", ", ",
                          "\n", "word", "AB", "12", "7", "0", "9", "[card]", "[email]"])
TEXTS = st.lists(PIECES, max_size=14).map("".join) | st.text(alphabet="0123456789 -.@:+()aAZz,", max_size=60)
_RUN = re.compile(r"\d(?:[ \-]?\d)*")


def card_numbers(text: str) -> list[str]:
    """Whole runs of 13-19 digits (single spaces or hyphens between them) that pass Luhn."""
    runs = ("".join(ch for ch in m.group() if ch.isdigit()) for m in _RUN.finditer(text))
    return [r for r in runs if 13 <= len(r) <= 19 and luhn_valid(r)]


@settings(max_examples=400, deadline=None)
@given(TEXTS)
def test_redaction_is_idempotent_and_leaves_no_luhn_valid_card(text: str) -> None:
    once = redact(text)
    assert redact(once) == once
    assert card_numbers(once) == []


@settings(max_examples=300, deadline=None)
@given(TEXTS, st.lists(st.integers(min_value=0, max_value=80), max_size=6))
def test_a_stream_cut_anywhere_is_redacted_like_the_whole_text(text: str, cuts: list[int]) -> None:
    points = sorted({c for c in cuts if 0 < c < len(text)})
    pieces = [text[a:b] for a, b in zip([0, *points], [*points, len(text)], strict=True)]
    out, _ = streamed(pieces)
    assert out == redact(text)
    assert card_numbers(out) == []
