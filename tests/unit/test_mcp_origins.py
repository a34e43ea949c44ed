"""Which browser origins may call /mcp (DNS rebinding): loopback pages and the listed ones."""

from __future__ import annotations

import pytest

from gateway.mcp.origins import allowed, normalize
from gateway.settings import ServerSettings

LISTED = {"https://app.example.com", "http://intranet:8000"}


@pytest.mark.parametrize("origin", [
    "http://localhost", "http://localhost:5173", "https://LOCALHOST:8443", "http://127.0.0.1:3000", "http://127.9.9.9",
    "http://[::1]:6274", "https://app.example.com", "https://App.Example.COM:443", "http://intranet:8000",
])
def test_loopback_and_listed_origins_are_allowed(origin: str) -> None:
    assert allowed(origin, LISTED)


@pytest.mark.parametrize("origin", [
    "http://evil.example", "http://localhost.evil.example", "http://127.0.0.1.nip.io", "https://app.example.com:8443",
    "http://app.example.com", "http://intranet", "null", "file://", "http://localhost/path", "ftp://localhost",
    "http://user@localhost", "http://localhost:99999", "", "http://10.0.0.1", "http://0.0.0.0",
])
def test_any_other_origin_is_refused(origin: str) -> None:
    assert not allowed(origin, LISTED)


def test_null_is_allowed_only_when_listed() -> None:
    assert allowed("null", {"null"}) and not allowed("null", set())


def test_settings_normalize_the_listed_origins_and_refuse_what_is_not_one() -> None:
    assert ServerSettings(mcp_allowed_origins=["HTTPS://App.example.com:443", "http://[::1]:80", "null"]).mcp_allowed_origins == [
        "https://app.example.com", "http://[::1]", "null",
    ]
    for bad in ("app.example.com", "https://app.example.com/", "https://app.example.com/x", "ws://app.example.com"):
        assert normalize(bad) is None
        with pytest.raises(ValueError, match="not an origin"):
            ServerSettings(mcp_allowed_origins=[bad])
