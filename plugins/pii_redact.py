"""`pii_redact`: e-mail addresses, IBANs, Luhn-checked card numbers, IP addresses and phone
numbers are masked in prompts before they leave for the provider and, with
`answers: true`, in answers, streamed ones included. The counts of what was masked are
journaled with the answer.

Streams: a match can straddle two chunks, so each choice's text is held back up to the
last *safe boundary*, a position no pattern can match across (see `safe_cut`). The
held tail is sent with the next chunk, the choice's last chunk or the end of the stream.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any, ClassVar

from gateway.assembly.model import Assembly
from gateway.plugins import PluginOptions, Scratch

MASKS = {"email": "[email]", "iban": "[iban]", "card": "[card]", "ip": "[ip]", "phone": "[phone]"}
# Past this much text held back with no safe boundary in it, the stream is cut anyway at
# a point no match crosses; every pattern's matches are shorter than `_LONGEST`.
MAX_HOLD = 1024
_LONGEST = 400

# Digit-based patterns only match whole runs of digits joined by single separators, so one
# never takes a part of a number another would have taken whole.
_NOT_AFTER_DIGITS = r"(?<![\w+])(?<!\d[ .\-])"
_NOT_BEFORE_DIGITS = r"(?![ .\-]?\d)(?!\w)"
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@(?:[A-Za-z0-9\-]{1,63}\.){1,4}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
# A card is a whole run of 13-19 digits, single spaces or hyphens between them.
_CARD = re.compile(r"(?<!\d)(?<!\d[ \-])\d(?:[ \-]?\d){12,18}(?![ \-]?\d)")
_IPV4 = re.compile(_NOT_AFTER_DIGITS + r"(?:\d{1,3}\.){3}\d{1,3}" + _NOT_BEFORE_DIGITS)
_IPV6 = re.compile(r"(?<![:\w])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![:\w])")
# A leading "+" or "(" starts a number wherever it stands ("...0958+44 20..." is two).
_PHONE = re.compile(
    r"(?:" + _NOT_AFTER_DIGITS + r"|(?=[+(]))(?:\+\d{1,3}[ .\-]?)?(?:\(\d{1,4}\)[ .\-]?)?\d{1,4}(?:[ .\-]?\d{1,4}){1,6}" + _NOT_BEFORE_DIGITS
)
_DIGITS = re.compile(r"\d")


def luhn_valid(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_valid(compact: str) -> bool:
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def _card(match: re.Match[str]) -> str | None:
    digits = "".join(_DIGITS.findall(match.group()))
    return MASKS["card"] if luhn_valid(digits) else None


def _iban(match: re.Match[str]) -> str | None:
    """The longest valid IBAN the match starts with (a trailing word can be swept in)."""
    text = match.group()
    for end in range(len(text), 14, -1):
        if text[end - 1] != " " and iban_valid(text[:end].replace(" ", "")):
            return MASKS["iban"] + text[end:]
    return None


def _ip(match: re.Match[str]) -> str | None:
    if sum(ch != ":" for ch in match.group()) < 2:
        return None  # "::" is an address, but in prose it is punctuation
    try:
        ipaddress.ip_address(match.group())
    except ValueError:
        return None
    return MASKS["ip"]


def _phone(match: re.Match[str]) -> str | None:
    text = match.group()
    digits = len(_DIGITS.findall(text))
    prefixed = text.startswith(("+", "("))
    # Seven digits with a "+" or "(" prefix, else nine: dates and amounts are left alone.
    return MASKS["phone"] if (7 if prefixed else 9) <= digits <= 15 else None


# In this order: an e-mail or an IBAN may hold digits that are not a number of their own.
_RULES: tuple[tuple[str, re.Pattern[str], Callable[[re.Match[str]], str | None]], ...] = (
    ("email", _EMAIL, lambda m: MASKS["email"]),
    ("iban", _IBAN, _iban),
    ("card", _CARD, _card),
    ("ip", _IPV4, _ip),
    ("ip", _IPV6, _ip),
    ("phone", _PHONE, _phone),
)


def redact(text: str, counts: dict[str, int] | None = None) -> str:
    """`text` with every match masked; `counts` (if given) gains the number of each kind.

    The rules run again until nothing changes, so the result is a fixed point and redaction
    is idempotent by construction: a mask can end a number that blocked a match before it.
    Each change removes a digit, "@" or ":" and masks hold none, so the loop ends.
    """
    while True:
        before = text
        for kind, pattern, mask in _RULES:
            text = _apply(kind, pattern, mask, text, counts)
        if text == before:
            return text


def _apply(
    kind: str, pattern: re.Pattern[str], mask: Callable[[re.Match[str]], str | None],
    text: str, counts: dict[str, int] | None,
) -> str:
    hits = 0

    def replace(match: re.Match[str]) -> str:
        nonlocal hits
        out = mask(match)
        if out is None:
            return match.group()
        hits += 1
        return out

    text = pattern.sub(replace, text)
    if hits and counts is not None:
        counts[kind] = counts.get(kind, 0) + hits
    return text


# A safe boundary follows a character no pattern contains, or a space that no spaced
# pattern (IBAN, card, phone) could continue through: one after a lower-case letter, say.
_JOINABLE = frozenset("._%+-@():")
_SPACED_BEFORE = frozenset("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ()+.-")


def safe_cut(text: str) -> int:
    """The largest p such that redact(text[:p]) + redact(text[p:]) == redact(text), as far as
    any later text is concerned; 0 when there is none."""
    for p in range(len(text), 0, -1):
        ch = text[p - 1]
        if ch == " ":
            if p >= 2 and text[p - 2] not in _SPACED_BEFORE and text[p - 2] != " ":
                return p
        elif not ch.isalnum() and ch not in _JOINABLE:
            return p
    return 0


def _forced_cut(text: str) -> int:
    cut = len(text) - _LONGEST
    moved = True
    while moved and cut > 0:
        moved = False
        for _, pattern, _ in _RULES:
            for match in pattern.finditer(text):
                if match.start() < cut < match.end():
                    cut, moved = match.start(), True
    return max(cut, 0)


class StreamRedactor:
    """Redacts one choice's streamed text: feed pieces, get what is safe to send."""

    def __init__(self) -> None:
        self.pending = ""

    def feed(self, piece: str, counts: dict[str, int]) -> str:
        text = self.pending + piece
        cut = safe_cut(text)
        if cut == 0 and len(text) > MAX_HOLD:
            cut = _forced_cut(text)
        self.pending = text[cut:]
        return redact(text[:cut], counts) if cut else ""

    def flush(self, counts: dict[str, int]) -> str:
        text, self.pending = self.pending, ""
        return redact(text, counts) if text else ""


class PiiRedactOptions(PluginOptions):
    answers: bool = False  # also mask answers (streamed ones held back to a safe boundary)


class PiiRedact:
    name: ClassVar[str] = "pii_redact"
    version: ClassVar[str] = "1.0.0"
    session_counters: tuple[str, ...] = ()
    Options: ClassVar[type[PluginOptions]] = PiiRedactOptions

    def __init__(self, options: PiiRedactOptions, assembly: Assembly) -> None:
        self.answers = options.answers

    def on_request(self, body: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        counts: dict[str, int] = {}
        out = dict(body)
        if isinstance(body.get("messages"), list):
            out["messages"] = [_message(m, counts) for m in body["messages"]]
        for key in ("prompt", "input"):
            if key in body:
                out[key] = _texts(body[key], counts)
        if not counts:
            return None
        for kind, n in counts.items():
            scratch.count(f"prompt_{kind}", n)
        return out

    def on_chunk(self, chunk: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        choices = chunk.get("choices")
        if not self.answers or not isinstance(choices, list) or not choices:
            return None
        streams: dict[int, StreamRedactor] = scratch.data.setdefault("streams", {})
        counts: dict[str, int] = {}
        out = []
        for choice in choices:
            if not isinstance(choice, dict):
                out.append(choice)
                continue
            redactor = streams.setdefault(_index(choice), StreamRedactor())
            done = choice.get("finish_reason") is not None
            delta = choice.get("delta")
            if isinstance(delta, dict):
                text = delta.get("content")
                sent = _feed(redactor, text if isinstance(text, str) else "", done, counts)
                if isinstance(text, str) or sent:
                    choice = {**choice, "delta": {**delta, "content": sent}}
            elif isinstance(choice.get("text"), str) or done:
                text = choice.get("text")
                choice = {**choice, "text": _feed(redactor, text if isinstance(text, str) else "", done, counts)}
            out.append(choice)
        for kind, n in counts.items():
            scratch.count(f"answer_{kind}", n)
        return {**chunk, "choices": out}

    def on_stream_end(self, last: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        """Text still held back when the upstream ended without a finish_reason."""
        streams: dict[int, StreamRedactor] = scratch.data.get("streams", {})
        counts: dict[str, int] = {}
        owed = [(i, r.flush(counts)) for i, r in sorted(streams.items()) if r.pending]
        for kind, n in counts.items():
            scratch.count(f"answer_{kind}", n)
        if not owed:
            return None
        chat = last.get("object") != "text_completion"
        choices = [
            {"index": i, "delta": {"content": text}, "finish_reason": None} if chat else {"index": i, "text": text, "finish_reason": None}
            for i, text in owed
        ]
        keep = {k: last[k] for k in ("id", "object", "created", "model") if k in last}
        return {**keep, "choices": choices}

    def on_response(self, data: dict[str, Any], scratch: Scratch) -> dict[str, Any] | None:
        if not self.answers or not isinstance(data.get("choices"), list):
            return None
        counts: dict[str, int] = {}
        choices = []
        for choice in data["choices"]:
            if isinstance(choice, dict):
                message = choice.get("message")
                if isinstance(message, dict) and isinstance(message.get("content"), str):
                    choice = {**choice, "message": {**message, "content": redact(message["content"], counts)}}
                elif isinstance(choice.get("text"), str):
                    choice = {**choice, "text": redact(choice["text"], counts)}
            choices.append(choice)
        if not counts:
            return None
        for kind, n in counts.items():
            scratch.count(f"answer_{kind}", n)
        return {**data, "choices": choices}


def _feed(redactor: StreamRedactor, text: str, done: bool, counts: dict[str, int]) -> str:
    sent = redactor.feed(text, counts) if text else ""
    return sent + redactor.flush(counts) if done else sent


def _index(choice: dict[str, Any]) -> int:
    index = choice.get("index")
    return index if isinstance(index, int) else 0


def _message(message: Any, counts: dict[str, int]) -> Any:
    if not isinstance(message, dict):
        return message
    out = dict(message)
    if "content" in message:
        out["content"] = _texts(message["content"], counts)
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        out["tool_calls"] = [_tool_call(c, counts) for c in calls]
    return out


def _tool_call(call: Any, counts: dict[str, int]) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    # Masks hold no quote or backslash, and no match spans one: the JSON stays valid.
    return {**call, "function": {**function, "arguments": redact(function["arguments"], counts)}}


def _texts(value: Any, counts: dict[str, int]) -> Any:
    """A string, a list of strings, or a list of content parts with `text`."""
    if isinstance(value, str):
        return redact(value, counts)
    if isinstance(value, list):
        return [
            redact(v, counts) if isinstance(v, str)
            else {**v, "text": redact(v["text"], counts)} if isinstance(v, dict) and isinstance(v.get("text"), str)
            else v
            for v in value
        ]
    return value
