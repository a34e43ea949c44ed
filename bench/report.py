"""The benchmark's report: results JSON and the markdown printed at the end of a run.

`python -m bench.report bench/results/latest.json` renders a saved run again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

from bench import checks
from bench.checks import Results, error_text, measured

MIB = 1024 * 1024


def finish(results: Results, out: Path) -> str:
    """Add the derived sections, write JSON and markdown side by side, return the markdown."""
    results["comparisons"] = checks.comparisons(results)
    results["checks"] = checks.target_checks(results)
    results["problems"] = checks.problems(results)
    results["warnings"] = checks.warnings(results)
    text = markdown(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    out.with_suffix(".md").write_text(text)
    return text


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _label(results: Results, name: str) -> str:
    label: str = results["targets"].get(name, {}).get("label", name)
    return label


def _first_line(text: str | None, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[0] if (text or "").strip() else ""
    return line if len(line) <= limit else line[:limit] + "..."


def _table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    return out + ["| " + " | ".join(row) + " |" for row in rows]


def markdown(results: Results) -> str:
    lines = _header(results)
    lines += _main_table(results)
    lines += _ratios(results)
    lines += _ttft(results)
    lines += _startup(results)
    lines += _redis(results)
    lines += _leak(results)
    lines += _scale_out(results)
    lines += _profile(results)
    lines += ["", "## Targets (issue 6)", ""]
    rows = [
        [
            c["goal"],
            c["shown"],
            c["status"] if c["status"] in ("met", "n/a") else f"**{c['status']}**",
        ]
        for c in results["checks"]
    ]
    lines += _table(["target", "measured", "status"], ["---"] * 3, rows)
    return "\n".join(lines) + "\n"


def _header(results: Results) -> list[str]:
    meta, machine, opts = results["meta"], results["meta"]["machine"], results["meta"]["options"]
    redis = machine["redis_server"].split(" sha=")[0]
    lines = [
        f"# ABC Gateway benchmark, {machine['date']}",
        "",
        f"- Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['wrk']}, {redis}",
        f"- Before start: loadavg {' '.join(machine['loadavg'])}; busy per CPU "
        f"{', '.join(f'{b:.0f}%' for b in machine['background_busy_pct'])}",
        f"- Pinning: {meta['pinning']}",
        f"- Command: `{meta['command']}`",
        f"- {opts['duration']} s per scenario after a {opts['warmup_s']} s warm-up, "
        f"{opts['connections']} connections when loaded, wrk -t1, mock delay "
        f"{opts['mock_delay_ms']:g} ms; redis-server without persistence "
        "(--save '' --appendonly no)",
    ]
    lines += [f"- {note}" for note in meta.get("notes", [])]
    if results.get("problems"):
        lines += ["", "> **ERRORS: figures marked ERR or failed are not valid results.**"]
        lines += [f"> - {_first_line(p, 300)}" for p in results["problems"]]
    if results.get("warnings"):
        lines += [
            "",
            "> Busy machine: CPU time used outside the benchmark's processes during a run, in "
            "% of one core (other programs, and the kernel's loopback work). The figures are "
            "valid but slower than on an idle machine; CPU ms/req is the steadiest of them:",
        ]
        lines += [f"> - {w}" for w in results["warnings"]]
    return lines


def _main_table(results: Results) -> list[str]:
    cpus = results["meta"]["machine"]["nproc"]
    header = [
        "scenario",
        "target",
        "p50 ms",
        "p99 ms",
        "req/s",
        "Δp50 ms",
        "Δp99 ms",
        "gateway CPU ms/req",
        "redis ms/req",
        "mock ms/req",
        "wrk ms/req",
        f"busy % CPU {'/'.join(str(i) for i in range(cpus))}",
        "errors",
    ]
    rows = []
    for scenario in results["scenarios"]:
        for name, r in scenario["results"].items():
            label = _label(results, name)
            if not measured(r):
                rows.append(
                    [scenario["label"], label, r.get("status", "n/a")]
                    + [""] * 9
                    + [_first_line(r.get("reason"), 120)]
                )
                continue
            vs = results["comparisons"].get(scenario["key"], {}).get(f"{name}_vs_direct", {})
            lat, cpu = r["latency_ms"], r["cpu_ms_per_req"]
            err = error_text(r) if r["status"] == "ok" else f"**ERR: {error_text(r)}**"
            rows.append(
                [
                    scenario["label"],
                    label,
                    _num(lat["p50"]),
                    _num(lat["p99"]),
                    _num(r["rps"]),
                    _num(vs.get("overhead_p50_ms")),
                    _num(vs.get("overhead_p99_ms")),
                    _num(cpu.get("gateway")),
                    _num(cpu.get("redis")),
                    _num(cpu.get("mock")),
                    _num(cpu.get("wrk")),
                    "/".join(f"{b:.0f}" for b in r["machine"]["busy_pct_per_cpu"]),
                    err,
                ]
            )
    align = ["---", "---"] + ["--:"] * 9 + ["---", "---"]
    return ["", "## Latency, throughput and CPU per request", ""] + _table(header, align, rows)


def _ratios(results: Results) -> list[str]:
    rows = []
    for scenario in results["scenarios"]:
        comp = results["comparisons"].get(scenario["key"], {})
        a, lt = comp.get("abc_vs_direct", {}), comp.get("litellm_vs_abc", {})
        rows.append(
            [scenario["label"]]
            + [
                _num(v, 2)
                for v in (
                    a.get("latency_ratio_p50"),
                    a.get("latency_ratio_p99"),
                    a.get("rps_ratio"),
                    lt.get("latency_ratio_p50"),
                    lt.get("latency_ratio_p99"),
                    lt.get("abc_over_litellm_rps"),
                )
            ]
        )
    header = [
        "scenario",
        "ABC÷direct p50",
        "ABC÷direct p99",
        "ABC/direct req/s",
        "LiteLLM÷ABC p50",
        "LiteLLM÷ABC p99",
        "ABC/LiteLLM req/s",
    ]
    return ["", "## Ratios", ""] + _table(header, ["---"] + ["--:"] * 6, rows)


def _ttft(results: Results) -> list[str]:
    ttft = results.get("ttft") or {}
    base = ((ttft.get("direct") or {}).get("ttft_ms") or {}).get("p50")
    rows = []
    for name, r in ttft.items():
        t, total = r.get("ttft_ms") or {}, r.get("total_ms") or {}
        delta = t["p50"] - base if name != "direct" and base is not None and t else None
        err = (
            "0"
            if r.get("status") == "ok"
            else (f"**ERR: {_first_line(r.get('reason')) or r.get('statuses')}**")
        )
        rows.append(
            [
                _label(results, name),
                _num(t.get("p50")),
                _num(t.get("p90")),
                _num(t.get("p99")),
                _num(delta),
                _num(total.get("p50")),
                err,
            ]
        )
    n = results["meta"]["options"]["ttft_requests"]
    header = [
        "target",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "Δp50 vs direct ms",
        "whole stream p50 ms",
        "errors",
    ]
    return ["", f"## Time to first streamed token ({n} sequential requests)", ""] + _table(
        header, ["---"] + ["--:"] * 5 + ["---"], rows
    )


def _startup(results: Results) -> list[str]:
    rows = []
    for target in results["targets"].values():
        notes = target.get("notes", []) + [
            f"{k} n/a: {v}" for k, v in target.get("unsupported", {}).items()
        ]
        if target.get("status") == "failed":
            notes = [f"**FAILED: {_first_line(target.get('error'))}**"]
        rows.append(
            [
                target["label"],
                _num(target.get("startup_s"), 2),
                _num(target.get("idle_rss_mib"), 1),
                _num(target.get("rss_after_first_requests_mib"), 1),
                _num(target.get("rss_after_load_mib"), 1),
                target.get("gateway_cpus") or "any",
                "; ".join(notes),
            ]
        )
    header = [
        "target",
        "start-up s",
        "idle RSS MiB",
        "RSS after first requests MiB",
        "RSS after load MiB",
        "CPUs",
        "notes",
    ]
    return ["", "## Start-up and memory", ""] + _table(
        header, ["---"] + ["--:"] * 4 + ["---", "---"], rows
    )


def _redis(results: Results) -> list[str]:
    rows = []
    for scenario in results["scenarios"]:
        r = scenario["results"].get("abc")
        if measured(r) and r.get("redis"):
            red = r["redis"]
            top = ", ".join(f"{k} {v:g}" for k, v in list(red["by_command_per_req"].items())[:6])
            rows.append(
                [
                    scenario["label"],
                    _num(red["commands_per_req"], 2),
                    _num(red["reads_per_req"], 2),
                    top,
                ]
            )
    if not rows:
        return []
    header = ["scenario", "commands/req", "reads/req (≈ round trips)", "most frequent commands"]
    return [
        "",
        "## Redis per ABC request (commands include those run inside Lua scripts)",
        "",
    ] + _table(header, ["---", "--:", "--:", "---"], rows)


def _leak(results: Results) -> list[str]:
    leak = results.get("leak")
    if not leak:
        return []
    lines = ["", "## Leak check (ABC, loaded chat, gateway RSS)", ""]
    if leak.get("points"):
        lines.append(
            " · ".join(
                f"after {p['requests']:,} requests: {p['rss_mib']:.1f} MiB" for p in leak["points"]
            )
            + f" · ratio **{_num(leak.get('ratio'))}**"
        )
    if leak.get("status") != "ok":
        lines.append(f"\n**ERR: {leak.get('reason') or str(leak.get('errors')) + ' errors'}**")
    return lines


def _scale_out(results: Results) -> list[str]:
    runs = results.get("scale_out") or []
    if not runs:
        return []
    rows = []
    for run in runs:
        if run.get("status") == "failed":
            rows.append(
                [str(run["workers"]), "", "**FAILED**"]
                + [""] * 5
                + [_first_line(run.get("reason"))]
            )
            continue
        err = "0" if run["status"] == "ok" else f"**ERR: {run.get('errors')}**"
        rows.append(
            [
                str(run["workers"]),
                run.get("pinned") or "not pinned",
                _num(run["rps"]),
                _num(run["p50_ms"]),
                _num(run["p99_ms"]),
                _num(run["cpu_ms_per_req"]),
                _num(run.get("rss_mib"), 1),
                str(run.get("gateway_processes", "")),
                err,
            ]
        )
    loaded = f"chat c{results['meta']['options']['connections']}"
    header = [
        "workers",
        "gateway CPUs",
        "req/s",
        "p50 ms",
        "p99 ms",
        "gateway CPU ms/req (tree)",
        "RSS MiB (tree)",
        "processes",
        "errors",
    ]
    return (
        ["", f"## Scale-out ({loaded})", ""]
        + _table(header, ["--:", "---"] + ["--:"] * 6 + ["---"], rows)
        + [
            "",
            "With more than one worker the gateway is not pinned: on a 2-CPU machine it "
            "shares CPU 0 with wrk and the mock, so the gain is bounded by them. RSS of a "
            "tree counts shared pages once per process.",
        ]
    )


def _profile(results: Results) -> list[str]:
    profile = results.get("profile")
    if not profile or profile.get("error"):
        return []
    own, total = profile.get("top_self", [])[:15], profile.get("top_project", [])[:15]
    rows = []
    for i in range(max(len(own), len(total))):
        row: list[str] = []
        for column in (own, total):
            entry = column[i] if i < len(column) else None
            row += [f"`{entry['function']}`", _num(entry["pct"], 1)] if entry else ["", ""]
        rows.append(row)
    lines = ["", f"## Profile of ABC ({profile['tool']}, {profile['file']})", ""]
    header = ["self time", "%", "the gateway's functions, inclusive", "%"]
    return lines + _table(header, ["---", "--:", "---", "--:"], rows)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "bench/results/latest.json")
    results: dict[str, Any] = orjson.loads(path.read_bytes())
    print(finish(results, path))


if __name__ == "__main__":
    main()
