"""`abc-gateway admin ...`: drive a running gateway's admin API from a terminal.

Talks HTTP to --url (default $ABC_GATEWAY_URL or http://127.0.0.1:8080) with
$ABC_ADMIN_TOKEN. Prints JSON, or a table where one reads better.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import yaml

from gateway.errors import ConfigError


class AdminClient:
    def __init__(self, url: str, token: str) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None, *, timeout_s: float = 60) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (operator-given URL)
                return json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise ConfigError(f"{method} {path}: HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise ConfigError(f"cannot reach the gateway at {self.url}: {exc.reason}") from None


def client_from(args: argparse.Namespace) -> AdminClient:
    token = os.environ.get("ABC_ADMIN_TOKEN")
    if not token:
        raise ConfigError("ABC_ADMIN_TOKEN is not set")
    return AdminClient(args.url, token)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))


def _compile(args: argparse.Namespace) -> int:
    with open(args.plan, encoding="utf-8") as f:
        plan = yaml.safe_load(f)
    print_json(client_from(args).call("POST", "/admin/v1/plans/compile", plan))
    return 0


def _sessions_create(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"assembly_id": args.assembly_id}
    if args.tenant:
        body["tenant"] = args.tenant
    if args.budget_usd is not None:
        body["budget_usd"] = args.budget_usd
    if args.ttl_s is not None:
        body["ttl_s"] = args.ttl_s
    if args.label:
        body["labels"] = dict(item.split("=", 1) for item in args.label)
    print_json(client_from(args).call("POST", "/admin/v1/sessions", body))
    return 0


def _sessions_show(args: argparse.Namespace) -> int:
    print_json(client_from(args).call("GET", f"/admin/v1/sessions/{args.session_id}"))
    return 0


def _sessions_revoke(args: argparse.Namespace) -> int:
    print_json(client_from(args).call("POST", f"/admin/v1/sessions/{args.session_id}/revoke", {}))
    return 0


def _costs(args: argparse.Namespace) -> int:
    query = {"group_by": args.group_by}
    query.update({k: v for k, v in (("since", args.since), ("until", args.until)) if v})
    report = client_from(args).call("GET", "/admin/v1/costs?" + urllib.parse.urlencode(query))
    if args.json:
        print_json(report)
        return 0
    print(f"cost by {report['group_by']}, {report['since']} .. {report['until']}")
    rows = [{**row, "share": _share(row["cost_nanos"], report["total_nanos"])} for row in report["rows"]]
    rows.append({"key": "TOTAL", "cost_usd": report["total_usd"], "cost_nanos": report["total_nanos"], "share": ""})
    print_table(rows, ["key", "cost_usd", "cost_nanos", "share"])
    return 0


def _share(part: int, total: int) -> str:
    return f"{100 * part / total:.1f}%" if total else ""


def add_admin_commands(sub: Any) -> None:
    url = os.environ.get("ABC_GATEWAY_URL", "http://127.0.0.1:8080")
    admin = sub.add_parser("admin", help="talk to a running gateway's admin API")
    admin.add_argument("--url", default=url)
    asub = admin.add_subparsers(dest="admin_command", required=True)

    comp = asub.add_parser("compile", help="compile a plan (YAML) on the gateway")
    comp.add_argument("plan")
    comp.set_defaults(run=_compile)

    sessions = asub.add_parser("sessions", help="open, show and revoke sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True)
    create = ssub.add_parser("create")
    create.add_argument("--assembly-id", required=True)
    create.add_argument("--tenant")
    create.add_argument("--budget-usd", type=float)
    create.add_argument("--ttl-s", type=int)
    create.add_argument("--label", action="append", help="key=value, repeatable")
    create.set_defaults(run=_sessions_create)
    show = ssub.add_parser("show")
    show.add_argument("session_id")
    show.set_defaults(run=_sessions_show)
    revoke = ssub.add_parser("revoke")
    revoke.add_argument("session_id")
    revoke.set_defaults(run=_sessions_revoke)

    costs = asub.add_parser("costs", help="spend grouped by tenant, session, model or assembly")
    costs.add_argument("--group-by", default="tenant", choices=["tenant", "session", "model", "assembly"])
    costs.add_argument("--since", help="ISO date or datetime, or epoch seconds (default: 24 h before --until)")
    costs.add_argument("--until", help="ISO date or datetime, or epoch seconds (default: now)")
    costs.add_argument("--json", action="store_true", help="print the report as JSON")
    costs.set_defaults(run=_costs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: abc-gateway admin ...")
