"""Authentication on every route, found by enumerating the router of a running gateway, so
a route added later is covered too: /admin needs the admin token and nothing else opens
it, but for the one named exception (the dashboard's HTML shell, which holds no data);
every other route but the public few needs a VCS token."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from gateway.capability import Keyring
from gateway.http.middlewares import PUBLIC_PATHS, TOKENLESS_ADMIN_PAGES
from tests.conftest import ADMIN_TOKEN, OPEN_PLAN, Gateway, make_settings, start_gateway
from tests.openai_support import bearer, openai_error, sdk

_PARAM = re.compile(r"\{[^}]+\}")



def _routes(gw: Gateway) -> list[tuple[str, str]]:
    """(method, path) of every route, path parameters filled with a dummy value."""
    found = set()
    for route in gw.server.app.router.routes():
        canonical = route.resource.canonical if route.resource is not None else None
        assert canonical, f"a route without a canonical path: {route!r}"
        method = "GET" if route.method == "*" else route.method
        found.add((method, _PARAM.sub("dummy", canonical)))
    return sorted(found)


class Caller:
    """Calls one gateway over a keep-alive client: the route sweeps make hundreds of calls."""

    def __init__(self, base_url: str) -> None:
        self.client = httpx.Client(base_url=base_url, timeout=30)

    def __call__(self, method: str, path: str, token: str | None) -> httpx.Response:
        if token is None:
            headers = {}
        else:  # an empty token is sent as a bare "Bearer": a trailing space is not a legal header
            headers = bearer(token) if token else {"Authorization": "Bearer"}
        return self.client.request(method, path, headers=headers)


@pytest.fixture
def call(gw: Gateway) -> Iterator[Caller]:
    caller = Caller(gw.base_url)
    yield caller
    caller.client.close()


def test_the_router_has_admin_and_openai_routes(gw: Gateway) -> None:
    paths = {path for _, path in _routes(gw)}
    assert "/admin/v1/sessions" in paths and "/v1/chat/completions" in paths
    assert PUBLIC_PATHS <= paths


def test_every_admin_route_needs_the_admin_token(gw: Gateway, call: Caller) -> None:
    vcs_token = gw.token(OPEN_PLAN)
    admin_routes = [(m, p) for m, p in _routes(gw) if p.startswith("/admin") and p not in TOKENLESS_ADMIN_PAGES]
    assert len(admin_routes) >= 5
    assert all(p.startswith("/admin/v1/") for _, p in admin_routes)
    for method, path in admin_routes:
        for label, token in (
            ("no token", None),
            ("a VCS token", vcs_token),
            ("a wrong admin token", ADMIN_TOKEN + "x"),
            ("a prefix of the admin token", ADMIN_TOKEN[:-1]),
            ("an empty bearer", ""),
        ):
            response = call(method, path, token)
            assert response.status_code == 401, (
                f"{method} {path} with {label}: {response.status_code}"
            )
            if method != "HEAD":
                openai_error(response, 401)
        allowed = call(method, path, ADMIN_TOKEN)
        assert allowed.status_code not in (401, 403), f"{method} {path} refused the admin token"
        assert allowed.status_code < 500, f"{method} {path}: {allowed.status_code} {allowed.text}"


def test_every_non_public_route_needs_a_token(gw: Gateway, call: Caller) -> None:
    protected = [(m, p) for m, p in _routes(gw) if p not in PUBLIC_PATHS | TOKENLESS_ADMIN_PAGES]
    assert any(p.startswith("/v1/") for _, p in protected)
    for method, path in protected:
        for token in (None, "garbage"):
            response = call(method, path, token)
            assert response.status_code == 401, (
                f"{method} {path} with {token!r}: {response.status_code}"
            )


def test_the_admin_token_is_not_a_vcs_token(gw: Gateway, call: Caller) -> None:
    for method, path in _routes(gw):
        if path.startswith("/v1/"):
            response = call(method, path, ADMIN_TOKEN)
            assert response.status_code == 401, f"{method} {path}: {response.status_code}"


def test_public_routes_answer_without_a_token(gw: Gateway, call: Caller) -> None:
    for path in sorted(PUBLIC_PATHS):
        assert call("GET", path, None).status_code == 200, path


def test_the_dashboard_shells_are_the_only_admin_pages_open_without_a_token_and_hold_no_data(
    gw: Gateway, call: Caller
) -> None:
    assert TOKENLESS_ADMIN_PAGES == {"/admin/dashboard", "/admin/dashboard/plans"}
    opened = gw.open_session(OPEN_PLAN)
    assert sdk(gw, opened["token"]).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    ).choices
    shown = gw.session(opened["session_id"])
    assert shown["spent_nanos"] > 0
    for page in sorted(TOKENLESS_ADMIN_PAGES):
        shells = {label: call("GET", page, token) for label, token in (("none", None), ("admin", ADMIN_TOKEN))}
        for label, shell in shells.items():
            assert shell.status_code == 200, (page, label)
            assert shell.headers["content-type"] == "text/html; charset=utf-8"
            assert shell.text.startswith("<!doctype html>")
        assert shells["none"].content == shells["admin"].content  # the same bytes for everyone
        for data in (opened["session_id"], shown["assembly_id"], "acme", "gpt-4o-mini", str(shown["spent_nanos"])):
            assert data not in shells["none"].text, page
    for method in ("POST", "PUT", "DELETE"):
        assert call(method, "/admin/dashboard", None).status_code == 401, method
    for path in ("/admin/dashboard/", "/admin/dashboard/x", "/admin/Dashboard", "/admin/v1/costs/series"):
        assert call("GET", path, None).status_code == 401, path


@pytest.mark.parametrize(
    "path",
    [
        "/admin",
        "/admin/",
        "/admin/v1/no-such-route",
        "/admin/v1/sessions/",
        "/admin/v2/sessions",
        "/v1/no-such-route",
        "/",
    ],
)
def test_unrouted_paths_need_a_token_too(call: Caller, path: str) -> None:
    assert call("GET", path, None).status_code == 401
    assert call("POST", path, None).status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "//admin/v1/assemblies",
        "/Admin/v1/assemblies",
        "/ADMIN/v1/assemblies",
        "/admin%2Fv1/assemblies",
        "/v1/%2e%2e/admin/v1/assemblies",
    ],
)
def test_odd_spellings_of_admin_paths_never_open_them_to_a_vcs_token(
    gw: Gateway, call: Caller, path: str
) -> None:
    gw.compile(OPEN_PLAN)
    response = call("GET", path, gw.token(OPEN_PLAN))
    assert response.status_code in (401, 404), f"{path}: {response.status_code} {response.text}"
    assert "assembly_id" not in response.text


def test_admin_routes_are_closed_when_no_admin_token_is_configured(
    redis_url: str, keyring: Keyring
) -> None:
    gw = start_gateway(make_settings(admin_token=None), redis_url, keyring)
    call = Caller(gw.base_url)
    try:
        for method, path in _routes(gw):
            if path.startswith("/admin"):
                response = call(method, path, ADMIN_TOKEN)
                assert response.status_code == 401, f"{method} {path}: {response.status_code}"
        assert call("GET", "/admin/v1/assemblies", "").status_code == 401
    finally:
        call.client.close()
        gw.close()
