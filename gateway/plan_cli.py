"""`abc-gateway plan versions|diff|suggest|evaluate`: the decision plane from a terminal.

Talks to a running gateway's admin API (--url, $ABC_ADMIN_TOKEN) like `admin`. Suggestions
and evaluations are reports for a person: they can be written to files (-o), and nothing
is compiled or changed until someone runs `abc-gateway admin compile` on the result.
`evaluate --live` is the one command here that calls providers, within its stated cap.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

import yaml

from gateway.admin_cli import client_from, print_json, print_table
from gateway.errors import ConfigError

LIVE_TIMEOUT_S = 600  # a live evaluation runs its calls one after another
SHOWN = 100  # characters of each answer on a terminal; the JSON report has more


def _quoted(name: str) -> str:
    return urllib.parse.quote(name, safe="")


def _versions(args: argparse.Namespace) -> int:
    found = client_from(args).call("GET", f"/admin/v1/plans/{_quoted(args.name)}/versions")
    if args.json:
        print_json(found)
        return 0
    print(f"plan {found['plan']}: {len(found['data'])} version(s)")
    rows = [{**v, "parent": v["parent"] or "-", "actor": v["actor"] or "-"} for v in found["data"]]
    print_table(rows, ["version", "assembly_id", "parent", "compiled_at", "compiled_by", "actor", "sessions"])
    return 0


def _diff(args: argparse.Namespace) -> int:
    found = client_from(args).call("GET", f"/admin/v1/assemblies/{_quoted(args.a)}/diff/{_quoted(args.b)}")
    if args.json:
        print_json(found)
        return 0
    print(f"{found['from']} -> {found['to']}: {len(found['changes'])} change(s)")
    for change in found["changes"]:
        print(f"  {change['kind']:<22} {change['summary']}")
    return 0


def _suggest(args: argparse.Namespace) -> int:
    query = "?" + urllib.parse.urlencode({"since": args.since}) if args.since else ""
    found = client_from(args).call("GET", f"/admin/v1/plans/{_quoted(args.name)}/suggestions{query}")
    if args.output:
        Path(args.output).write_text(found["yaml"], encoding="utf-8")
    if args.json:
        print_json(found)
        return 0
    print(found["yaml"], end="")
    print(f"\n# evidence ({found['sessions']} session(s), {found['calls']} call(s)):")
    for change in found["changes"]:
        print(f"#  [{change['action']}] {change['summary']}")
        print(f"#      {json.dumps(change['evidence'], sort_keys=True)}")
    for note in found.get("notes", []):
        print(f"#  (too little data: {note})")
    if args.output:
        print(f"# revised plan written to {args.output}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    plan = yaml.safe_load(Path(args.candidate).read_text(encoding="utf-8"))
    body: dict[str, Any] = {"plan": plan}
    if bool(args.sessions) == bool(args.plan):
        raise ConfigError("give either --sessions ID,... or --plan NAME")
    if args.live_budget_usd is not None and not args.live:
        raise ConfigError("--live-budget-usd applies with --live only")
    body["model_map"] = dict(_model_pair(item) for item in args.model or [])
    if args.live:
        body["live"] = {} if args.live_budget_usd is None else {"budget_usd": args.live_budget_usd}
    if args.sessions:
        body["sessions"] = [s.strip() for s in args.sessions.split(",") if s.strip()]
    else:
        body["sessions_of"] = args.plan
        if args.since:
            body["since"] = args.since
    report = client_from(args).call("POST", "/admin/v1/plans/evaluate", body, timeout_s=LIVE_TIMEOUT_S if args.live else 60)
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if args.json:
        print_json(report)
        return 0
    _print_evaluation(report)
    if report.get("live"):
        _print_live(report["live"])
    return 0


def _model_pair(item: str) -> tuple[str, str]:
    old, sep, new = item.partition("=")
    if not (sep and old.strip() and new.strip()):
        raise ConfigError(f"--model takes RECORDED=CANDIDATE, not {item!r}")
    return old.strip(), new.strip()


def _print_evaluation(report: dict[str, Any]) -> None:
    totals = report["totals"]
    how = ("stored for its evaluation sessions, not a version" if report.get("live")
           else "not stored; no provider called")
    print(f"candidate {report['plan']} -> {report['candidate_assembly_id']} ({how})")
    if report.get("model_map"):
        print("models asked instead: " + ", ".join(f"{a} -> {b}" for a, b in sorted(report["model_map"].items())))
    print(f"{totals['sessions']} session(s), {totals['calls']} call(s): {totals['allowed']} allowed, "
          f"{totals['denied']} denied ({totals['newly_denied']} newly), {totals['newly_allowed']} newly allowed")
    print(f"spend: {totals['spend_usd']} USD under the candidate, {totals['spend_actual_usd']} USD actual")
    rows = [{**s, "ran_out": "yes" if s["ran_out_of_budget"] else "-"} for s in report["sessions"]]
    print_table(rows, ["session_id", "calls", "allowed", "denied", "spend_actual_usd", "spend_usd", "ran_out"])
    changed = [c for c in report["calls"] if c["verdict"] == "denied" or c["truncated_from"] is not None
               or (c["recorded"] == "denied" and c["verdict"] == "allowed")]
    for call in changed:
        what = call["verdict"] if call["truncated_from"] is None else f"truncated from {call['truncated_from']}"
        print(f"  {call['session_id']} #{call['index']} ({call['recorded']}) -> {what}: {call['reason'] or call['code'] or ''}")


def _print_live(live: dict[str, Any]) -> None:
    totals = live["totals"]
    cap = f"cap {live['cap_usd']} USD" + (" (the default; set it with --live-budget-usd)" if live["cap_default"] else "")
    print(f"\nlive: the candidate's answers beside the recorded ones, {cap}")
    for s in live["sessions"]:
        print(f"  evaluation session {s['session_id']} (of {s['evaluation_of']}, budget {s['budget_usd']} USD), journaled")
    print(f"{totals['run']} run ({totals['answered']} answered), {totals['skipped_denied']} skipped as denied, "
          f"{totals['not_replayable']} not replayable, {totals['not_run']} not run")
    print(f"spend: {totals['live_spend_usd']} USD live, {totals['recorded_spend_usd']} USD recorded for the same calls")
    stop = live["stopped_at"]
    if stop is not None:
        print(f"stopped by the cap at {stop['session_id']} #{stop['index']}: the calls after it were not run")
    else:
        print("the cap did not stop the run")
    for call in live["calls"]:
        print(f"  {call['session_id']} #{call['index']} {call['status']}" + (f": {call['reason']}" if call["reason"] else ""))
        for side in ("recorded", "live"):
            if call[side] is not None:
                print(f"    {side:<8} {_side(call[side])}")


def _side(answer: dict[str, Any]) -> str:
    head = f"{answer['kind']:<8} {answer['model'] or '-':<14} {answer['tok_in']:>6}+{answer['tok_out']:<6} {answer['cost_usd']} USD"
    error = answer["error"]
    text = f"{error.get('code')}: {error.get('message') or ''}" if error else answer["text"].replace("\n", " ")
    return f"{head}  {text[:SHOWN]}{'...' if len(text) > SHOWN else ''}"


def add_plan_commands(sub: Any) -> None:
    url = os.environ.get("ABC_GATEWAY_URL", "http://127.0.0.1:8080")
    plan = sub.add_parser("plan", help="plan versions, diffs, suggestions and evaluations (the decision plane)")
    plan.add_argument("--url", default=url)
    psub = plan.add_subparsers(dest="plan_command", required=True)

    versions = psub.add_parser("versions", help="a plan's lineage: each version's Assembly, date and sessions")
    versions.add_argument("name")
    versions.set_defaults(run=_versions)

    diff = psub.add_parser("diff", help="the semantic diff of two Assemblies")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.set_defaults(run=_diff)

    suggest = psub.add_parser("suggest", help="a revised plan from the journals, with the evidence")
    suggest.add_argument("name")
    suggest.add_argument("--since", help="only sessions opened since (ISO date or datetime, or epoch seconds)")
    suggest.add_argument("-o", "--output", help="write the revised plan (YAML) to this file")
    suggest.set_defaults(run=_suggest)

    evaluate = psub.add_parser("evaluate", help="run recorded sessions through a candidate plan (no provider called, but with --live)")
    evaluate.add_argument("candidate", help="the candidate plan (YAML)")
    evaluate.add_argument("--sessions", help="comma-separated session ids")
    evaluate.add_argument("--plan", help="evaluate against the sessions of this plan")
    evaluate.add_argument("--since", help="with --plan: only sessions opened since")
    evaluate.add_argument("--model", action="append", metavar="RECORDED=CANDIDATE",
                          help="ask the candidate's model where the journal asked another (repeatable)")
    evaluate.add_argument("--live", action="store_true",
                          help="also run the requests the candidate allows against its models, answers side by side")
    evaluate.add_argument("--live-budget-usd", type=float, metavar="USD",
                          help="with --live: the cap on what the live run may spend (default 1)")
    evaluate.add_argument("-o", "--output", help="write the full report (JSON) to this file")
    evaluate.set_defaults(run=_evaluate)

    for parser in (versions, diff, suggest, evaluate):
        parser.add_argument("--json", action="store_true", help="print the API's JSON")
