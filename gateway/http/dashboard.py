"""GET /admin/dashboard: the built-in cost page, one static HTML shell (dashboard.html),
and GET /admin/dashboard/plans: a plan's page (plan_dashboard.html).

Auth design. A browser can't attach a bearer header to a page load, so the shell is the one
/admin path served without the admin token (`TOKENLESS_ADMIN_PAGES` in middlewares.py). It
holds no data: the same bytes for everyone, only markup and the script. The page asks the
operator for the admin token (a password field, kept in the tab's sessionStorage only, never
in a cookie, so no CSRF) and calls GET /admin/v1/costs/series with `Authorization: Bearer`,
which checks the token like every other admin route. While the admin API is disabled (no
ABC_ADMIN_TOKEN) the shell is refused too: there would be nothing it could load.

The inline script and style run under a strict Content-Security-Policy that allows them by
their SHA-256, computed once when the app is built, so nothing else can run, load or frame
the page, and nothing leaves it but fetches to this origin.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib import resources

from aiohttp import web

from gateway.errors import Unauthenticated
from gateway.http.keys import deps_of

PATH = "/admin/dashboard"
# The plan page (plan_dashboard.html): lineage, latest suggestions and last evaluation of one
# plan, read with the same token from GET /admin/v1/plans/{name}. Same rules as the cost page.
PLANS_PATH = "/admin/dashboard/plans"
_INLINE = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


def _csp(html: str) -> str:
    allowed: dict[str, list[str]] = {"script": [], "style": []}
    for tag, content in _INLINE.findall(html):
        digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
        allowed[tag].append(f"'sha256-{digest}'")
    return "; ".join(
        (
            "default-src 'none'",
            "script-src " + (" ".join(allowed["script"]) or "'none'"),
            "style-src " + (" ".join(allowed["style"]) or "'none'"),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        )
    )


def shell_response_headers(html: str) -> dict[str, str]:
    return {
        "Content-Security-Policy": _csp(html),
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Frame-Options": "DENY",  # frame-ancestors for browsers that predate it
    }


def add_routes(app: web.Application) -> None:
    _add_shell(app, PATH, "dashboard.html")
    _add_shell(app, PLANS_PATH, "plan_dashboard.html")


def _add_shell(app: web.Application, path: str, filename: str) -> None:
    # The HTML parser turns CRLF into LF before the browser hashes a script: serve what it hashes.
    html = resources.files("gateway.http").joinpath(filename).read_text("utf-8")
    html = html.replace("\r\n", "\n")
    body, headers = html.encode(), shell_response_headers(html)

    async def dashboard(request: web.Request) -> web.Response:
        if deps_of(request).settings.admin_token is None:
            raise Unauthenticated("admin API disabled: set ABC_ADMIN_TOKEN", code="admin_disabled")
        return web.Response(body=body, content_type="text/html", charset="utf-8", headers=headers)

    app.router.add_get(path, dashboard)
