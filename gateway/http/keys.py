"""Typed keys for what hangs off the app and each request."""

from __future__ import annotations

from aiohttp import web

from gateway.capability import Claims
from gateway.deps import Deps
from gateway.request_log import CallReport

DEPS = web.AppKey("deps", Deps)
REQUEST_ID = "abc_request_id"  # request-scoped values are plain string keys in aiohttp
CLAIMS = "abc_claims"
ADMIN_LABEL = "abc_admin_label"  # the label of the admin token a request carried
REPORT = "abc_report"  # the request's CallReport, filled as it goes, logged at its end
# The response whose status line and headers are already sent (a stream): nothing after
# it may start another response on the connection.
STARTED = "abc_started"


def report_of(request: web.Request) -> CallReport:
    report: CallReport = request[REPORT]
    return report


def deps_of(request: web.Request) -> Deps:
    return request.app[DEPS]


def claims_of(request: web.Request) -> Claims:
    claims: Claims = request[CLAIMS]
    return claims


def started_of(request: web.Request) -> web.StreamResponse | None:
    started: web.StreamResponse | None = request.get(STARTED)
    return started
