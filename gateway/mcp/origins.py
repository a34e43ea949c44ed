"""Which browser pages may call /mcp: the MCP transport's defence against DNS rebinding.

A page on `http://evil.example` whose name the attacker re-points at 127.0.0.1 can script
requests at a gateway on loopback; the browser still names the page's origin in the
`Origin` header, so that is what is checked (never `Host`, which the attacker sets to
agree). No `Origin`: not a browser (SDK clients, agents), allowed. An `Origin` is allowed
when its host is loopback (`localhost`, 127.0.0.0/8, ::1: a page served from this machine,
such as a local MCP inspector) or when the settings name it (`server.mcp_allowed_origins`);
any other is refused with 403, as the MCP specification requires.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from urllib.parse import urlsplit

__all__ = ["allowed", "normalize"]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize(origin: str) -> str | None:
    """`scheme://host[:port]` in lower case with the scheme's default port left out; "null"
    as it is; None for anything that is not an origin (a path, user info, another scheme)."""
    parsed = _parse(origin)
    return None if parsed is None else parsed[0]


def allowed(origin: str, listed: Collection[str]) -> bool:
    """Whether a request carrying `Origin: origin` may use /mcp; `listed` holds normalized origins."""
    parsed = _parse(origin)
    if parsed is None:
        return False
    shown, host = parsed
    if shown in listed:
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name, or "null" (an opaque origin, allowed only when listed)


def _parse(origin: str) -> tuple[str, str] | None:
    """(the origin normalized, its host); ("null", "") for an opaque origin; None for what is not one."""
    if origin == "null":
        return origin, ""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "")
    if scheme not in _DEFAULT_PORTS or not host or parts.path or parts.query or parts.fragment or parts.username:
        return None
    shown = f"[{host}]" if ":" in host else host  # IPv6, as an origin writes it
    return f"{scheme}://{shown}" + ("" if port in (None, _DEFAULT_PORTS[scheme]) else f":{port}"), host
