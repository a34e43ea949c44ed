"""The benchmark's results: comparisons, the issue's targets, JSON and a markdown report.

Works on the JSON-shaped dict alone, so `python -m bench.report results.json` can
render a saved run again.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson

# Reference figure from the issue for LiteLLM 1.80.0 on this kind of machine, used
# only to put a number next to the 15x target when LiteLLM was not run.
LITELLM_REFERENCE_RPS = 88.0
LEAK_NOISE = 1.05
MIB = 1024 * 1024

Results = dict[str, Any]


def _ok(result: Any) -> bool:
    return isinstance(result, dict) and result.get("status") in ("ok", "errors")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def comparisons(results: Results) -> dict[str, dict[str, Any]]:
    """Overhead and ratios per scenario: each target vs direct, LiteLLM vs ABC."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in results["scenarios"]:
        by_target = scenario["results"]
        direct = by_target.get("direct")
        entry: dict[str, Any] = {}
        for name, result in by_target.items():
            if name == "direct" or not _ok(result) or not _ok(direct):
                continue
            assert direct is not None
            lat, dlat = result["latency_ms"], direct["latency_ms"]
            entry[f"{name}_vs_direct"] = {
                "overhead_p50_ms": round(lat["p50"] - dlat["p50"], 3),
                "overhead_p99_ms": round(lat["p99"] - dlat["p99"], 3),
                "latency_ratio_p50": _ratio(lat["p50"], dlat["p50"]),
                "latency_ratio_p99": _ratio(lat["p99"], dlat["p99"]),
                "rps_ratio": _ratio(result["rps"], direct["rps"]),
            }
        abc, litellm = by_target.get("abc"), by_target.get("litellm")
        if _ok(abc) and _ok(litellm):
            assert abc is not None and litellm is not None
            entry["litellm_vs_abc"] = {
                "latency_ratio_p50": _ratio(litellm["latency_ms"]["p50"], abc["latency_ms"]["p50"]),
                "latency_ratio_p99": _ratio(litellm["latency_ms"]["p99"], abc["latency_ms"]["p99"]),
                "abc_over_litellm_rps": _ratio(abc["rps"], litellm["rps"]),
            }
        out[scenario["key"]] = entry
    return out


def _scenario(results: Results, key: str, target: str) -> dict[str, Any] | None:
    for scenario in results["scenarios"]:
        if scenario["key"] == key:
            result = scenario["results"].get(target)
            return result if _ok(result) else None
    return None


def _check(goal: str, value: float | None, met: bool | None, shown: str, *, valid: bool = True) -> dict[str, Any]:
    if value is None or met is None:
        status = "n/a"
    elif not valid:
        status = "invalid (errors)"
    else:
        status = "met" if met else "not met"
    return {"goal": goal, "value": value, "shown": shown, "status": status}


def target_checks(results: Results) -> list[dict[str, Any]]:
    """Where ABC stands against each target of the issue."""
    loaded = f"chat-c{results['meta']['options']['connections']}"
    comps = results["comparisons"]
    checks: list[dict[str, Any]] = []

    def valid(key: str, *targets: str) -> bool:
        return all((_scenario(results, key, t) or {}).get("status") == "ok" for t in targets)

    c1 = comps.get("chat-c1", {}).get("abc_vs_direct", {})
    v = c1.get("overhead_p50_ms")
    checks.append(_check("overhead p50 < 1 ms (chat, c1)", v, v is not None and v < 1.0,
                         _ms(v), valid=valid("chat-c1", "abc", "direct")))
    cl = comps.get(loaded, {}).get("abc_vs_direct", {})
    v = cl.get("overhead_p99_ms")
    checks.append(_check(f"overhead p99 < 5 ms ({loaded})", v, v is not None and v < 5.0,
                         _ms(v), valid=valid(loaded, "abc", "direct")))

    abc_loaded = _scenario(results, loaded, "abc")
    v = abc_loaded["cpu_ms_per_req"].get("gateway") if abc_loaded else None
    checks.append(_check(f"gateway CPU < 0.5 ms/request ({loaded})", v,
                         v is not None and v < 0.5, _ms(v), valid=valid(loaded, "abc")))

    lite = comps.get(loaded, {}).get("litellm_vs_abc", {})
    v = lite.get("abc_over_litellm_rps")
    if v is None and abc_loaded:
        ref = abc_loaded["rps"] / LITELLM_REFERENCE_RPS
        checks.append({"goal": f"throughput >= 15x LiteLLM ({loaded})", "value": None,
                       "shown": f"not run (--with-litellm); vs the issue's {LITELLM_REFERENCE_RPS:.0f} "
                                f"req/s: {ref:.1f}x", "status": "n/a"})
    else:
        checks.append(_check(f"throughput >= 15x LiteLLM ({loaded})", v,
                             v is not None and v >= 15, _x(v),
                             valid=valid(loaded, "abc", "litellm")))
    v = cl.get("rps_ratio")
    checks.append(_check(f"throughput >= 25% of direct ({loaded})", v,
                         v is not None and v >= 0.25, _pct(v), valid=valid(loaded, "abc", "direct")))

    ttft = results.get("ttft", {})
    v = None
    if _ok(ttft.get("abc")) and _ok(ttft.get("direct")) and ttft["abc"].get("ttft_ms") and ttft["direct"].get("ttft_ms"):
        v = round(ttft["abc"]["ttft_ms"]["p50"] - ttft["direct"]["ttft_ms"]["p50"], 3)
    ttft_valid = all((ttft.get(t) or {}).get("status") == "ok" for t in ("abc", "direct"))
    checks.append(_check("time to first token within 1 ms of direct (p50)", v,
                         v is not None and v <= 1.0, _ms(v), valid=ttft_valid))

    abc_c1 = _scenario(results, "chat-c1", "abc")
    redis = (abc_c1 or {}).get("redis") or {}
    v = redis.get("reads_per_req")
    shown = "n/a" if v is None else (
        f"{v:.2f} round trips/request ({redis.get('commands_per_req', 0):.2f} commands)")
    # A small allowance for the gateway's background work (reaper) during the run.
    checks.append(_check("Redis <= 2 round trips per chat request (c1)", v,
                         v is not None and v <= 2.05, shown, valid=valid("chat-c1", "abc")))

    abc_target = results["targets"].get("abc", {})
    v = abc_target.get("startup_s")
    checks.append(_check("start-up < 1 s", v, v is not None and v < 1.0,
                         "n/a" if v is None else f"{v:.2f} s"))
    v = abc_target.get("idle_rss_mib")
    checks.append(_check("idle RSS < 80 MiB", v, v is not None and v < 80,
                         "n/a" if v is None else f"{v:.1f} MiB"))
    leak = results.get("leak") or {}
    v = leak.get("ratio")
    checks.append(_check(f"no growth 10k -> 100k requests (RSS ratio <= {LEAK_NOISE})", v,
                         v is not None and v <= LEAK_NOISE, "n/a" if v is None else f"{v:.3f}",
                         valid=leak.get("status") == "ok"))
    abc_runs = [s["results"].get("abc") for s in results["scenarios"]]
    measured = [r for r in abc_runs if _ok(r)]
    failing = sum(r["non_2xx"] + r["body_errors"] for r in measured)
    checks.append(_check("every ABC response a 2xx (a fast 4xx is no result)",
                         float(failing) if measured else None, failing == 0,
                         f"{failing} bad responses" if measured else "n/a"))
    return checks


def problems(results: Results) -> list[str]:
    """Everything that makes a figure invalid, to be shown before any figure."""
    found: list[str] = []
    for name, target in results["targets"].items():
        if target.get("status") == "failed":
            found.append(f"target {name} failed: {target.get('error', '').splitlines()[0]}")
    for scenario in results["scenarios"]:
        for name, result in scenario["results"].items():
            if result.get("status") == "failed":
                found.append(f"{scenario['key']} {name}: {result.get('reason')}")
            elif result.get("status") == "errors":
                found.append(f"{scenario['key']} {name}: {_errors(result)}")
    for name, result in (results.get("ttft") or {}).items():
        if result.get("status") in ("failed", "errors"):
            found.append(f"ttft {name}: {result.get('reason') or result.get('statuses')}")
    for run in results.get("scale_out") or []:
        if run.get("status") in ("failed", "errors"):
            found.append(f"scale-out workers={run['workers']}: {run.get('reason') or run.get('errors')}")
    leak = results.get("leak") or {}
    if leak.get("status") in ("failed", "errors"):
        found.append(f"leak check: {leak.get('reason') or leak.get('errors')}")
    return found


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f} ms" if abs(v) < 10 else f"{v:.1f} ms"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}x"


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 100:.0f}%"


def _num(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _errors(result: dict[str, Any]) -> str:
    parts = []
    if result.get("non_2xx"):
        codes = ", ".join(f"{c}x{n}" for c, n in result["statuses"].items() if not c.startswith("2"))
        parts.append(f"{result['non_2xx']} non-2xx ({codes})")
    if result.get("body_errors"):
        parts.append(f"{result['body_errors']} 200s carrying an error")
    for kind, n in (result.get("socket_errors") or {}).items():
        parts.append(f"{n} {kind} errors")
    if not result.get("requests"):
        parts.append("no requests completed")
    return "; ".join(parts) or "0"


def _label(results: Results, name: str) -> str:
    return results["targets"].get(name, {}).get("label", name)


def markdown(results: Results) -> str:
    meta, machine = results["meta"], results["meta"]["machine"]
    opts = meta["options"]
    lines = [
        f"# ABC Gateway benchmark, {machine['date']}",
        "",
        f"- Machine: {machine['nproc']} CPUs, {machine['cpu_model']}, kernel {machine['kernel']}, "
        f"Python {machine['python']}, {machine['wrk']}, {machine['redis_server'].split(' sha=')[0]}",
        f"- Load before start: loadavg {' '.join(machine['loadavg'])}, busy per CPU "
        f"{machine['background_busy_pct']} %",
        f"- Pinning: {meta['pinning']}",
        f"- Command: `{meta['command']}`",
        f"- {opts['duration']} s per scenario, {opts['connections']} connections when loaded, "
        f"wrk -t1, mock delay {opts['mock_delay_ms']} ms; redis-server without persistence "
        "(--save '' --appendonly no)",
    ]
    for note in meta.get("notes", []):
        lines.append(f"- {note}")
    found = results.get("problems") or []
    if found:
        lines += ["", "> **ERRORS: the figures below marked ERR are not valid results.**"]
        lines += [f"> - {p}" for p in found]

    lines += ["", "## Latency, throughput and CPU per request", "",
              "| scenario | target | p50 ms | p99 ms | req/s | Δp50 ms | Δp99 ms | gateway CPU ms/req "
              "| redis ms/req | mock ms/req | wrk ms/req | CPU busy % | errors |",
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    comps = results["comparisons"]
    for scenario in results["scenarios"]:
        for name, result in scenario["results"].items():
            label = _label(results, name)
            if not _ok(result):
                status = result.get("status", "n/a")
                reason = (result.get("reason") or "").splitlines()[0][:120] if result.get("reason") else ""
                lines.append(f"| {scenario['label']} | {label} | {status} | | | | | | | | | | {reason} |")
                continue
            lat, cpu = result["latency_ms"], result["cpu_ms_per_req"]
            vs = comps.get(scenario["key"], {}).get(f"{name}_vs_direct", {})
            err = _errors(result)
            err = f"**ERR: {err}**" if result["status"] != "ok" else err
            lines.append(
                f"| {scenario['label']} | {label} | {_num(lat['p50'])} | {_num(lat['p99'])} "
                f"| {_num(result['rps'])} | {_num(vs.get('overhead_p50_ms'))} "
                f"| {_num(vs.get('overhead_p99_ms'))} | {_num(cpu.get('gateway'))} "
                f"| {_num(cpu.get('redis'))} | {_num(cpu.get('mock'))} | {_num(cpu.get('wrk'))} "
                f"| {'/'.join(str(round(b)) for b in result['machine']['busy_pct_per_cpu'])} | {err} |"
            )

    lines += ["", "## Ratios", "",
              "| scenario | ABC÷direct p50 | ABC÷direct p99 | ABC/direct req/s "
              "| LiteLLM÷ABC p50 | LiteLLM÷ABC p99 | ABC/LiteLLM req/s |",
              "|---|--:|--:|--:|--:|--:|--:|"]
    for scenario in results["scenarios"]:
        c = comps.get(scenario["key"], {})
        a, lt = c.get("abc_vs_direct", {}), c.get("litellm_vs_abc", {})
        lines.append(
            f"| {scenario['label']} | {_num(a.get('latency_ratio_p50'), 2)} "
            f"| {_num(a.get('latency_ratio_p99'), 2)} | {_num(a.get('rps_ratio'), 2)} "
            f"| {_num(lt.get('latency_ratio_p50'), 2)} | {_num(lt.get('latency_ratio_p99'), 2)} "
            f"| {_num(lt.get('abc_over_litellm_rps'), 2)} |"
        )

    lines += ["", "## Time to first streamed token (sequential, "
              f"{opts['ttft_requests']} requests)", "",
              "| target | p50 ms | p90 ms | p99 ms | Δp50 vs direct ms | full stream p50 ms | errors |",
              "|---|--:|--:|--:|--:|--:|---|"]
    ttft = results.get("ttft") or {}
    direct_p50 = ((ttft.get("direct") or {}).get("ttft_ms") or {}).get("p50")
    for name, result in ttft.items():
        t = result.get("ttft_ms") or {}
        total = result.get("total_ms") or {}
        delta = None if t.get("p50") is None or direct_p50 is None or name == "direct" else t["p50"] - direct_p50
        err = "0" if result.get("status") == "ok" else f"**ERR: {result.get('reason') or result.get('statuses')}**"
        lines.append(f"| {_label(results, name)} | {_num(t.get('p50'))} | {_num(t.get('p90'))} "
                     f"| {_num(t.get('p99'))} | {_num(delta)} | {_num(total.get('p50'))} | {err} |")

    lines += ["", "## Start-up and memory", "",
              "| target | start-up s | idle RSS MiB | RSS after load MiB | CPUs | notes |",
              "|---|--:|--:|--:|---|---|"]
    for name, target in results["targets"].items():
        note = "; ".join(target.get("notes", []) + [f"{k}: {v}" for k, v in target.get("unsupported", {}).items()])
        if target.get("status") == "failed":
            note = f"**FAILED: {target.get('error', '').splitlines()[0]}**"
        lines.append(f"| {target['label']} | {_num(target.get('startup_s'), 2)} "
                     f"| {_num(target.get('idle_rss_mib'), 1)} | {_num(target.get('rss_after_load_mib'), 1)} "
                     f"| {target.get('gateway_cpus') or 'any'} | {note[:300]} |")

    redis_rows = [(s, s["results"].get("abc")) for s in results["scenarios"]]
    redis_rows = [(s, r) for s, r in redis_rows if _ok(r) and r.get("redis")]
    if redis_rows:
        lines += ["", "## Redis per ABC request", "",
                  "| scenario | commands/req | reads/req (≈ round trips) | by command |",
                  "|---|--:|--:|---|"]
        for s, r in redis_rows:
            red = r["redis"]
            top = ", ".join(f"{k} {v:g}" for k, v in list(red["by_command_per_req"].items())[:6])
            lines.append(f"| {s['label']} | {_num(red['commands_per_req'], 2)} "
                         f"| {_num(red['reads_per_req'], 2)} | {top} |")

    leak = results.get("leak")
    if leak:
        lines += ["", "## Leak check (ABC, chat, loaded)", ""]
        if leak.get("points"):
            lines.append(" · ".join(f"after {p['requests']:,} requests: {p['rss_mib']:.1f} MiB"
                                    for p in leak["points"]) +
                         f" · ratio **{_num(leak.get('ratio'))}**")
        if leak.get("status") != "ok":
            lines.append(f"\n**ERR: {leak.get('reason') or leak.get('errors')}**")

    scale = results.get("scale_out") or []
    if scale:
        lines += ["", f"## Scale-out ({loaded_label(results)})", "",
                  "| workers | pinned to | req/s | p50 ms | p99 ms | gateway CPU ms/req (tree) | RSS MiB (tree) | errors |",
                  "|--:|---|--:|--:|--:|--:|--:|---|"]
        for run in scale:
            if run.get("status") == "failed":
                lines.append(f"| {run['workers']} | | **FAILED** | | | | | {run.get('reason', '')[:200]} |")
                continue
            err = "0" if run["status"] == "ok" else f"**ERR: {run.get('errors')}**"
            lines.append(f"| {run['workers']} | {run.get('pinned') or 'not pinned'} | {_num(run['rps'])} "
                         f"| {_num(run['p50_ms'])} | {_num(run['p99_ms'])} | {_num(run['cpu_ms_per_req'])} "
                         f"| {_num(run.get('rss_mib'), 1)} | {err} |")
        lines.append("\nWith 2 workers the gateway is not pinned: on 2 cores it shares CPU 0 with wrk "
                     "and the mock, so the gain is bounded by them.")

    lines += ["", "## Targets (issue 6)", "", "| target | measured | status |", "|---|---|---|"]
    for check in results["checks"]:
        status = check["status"]
        shown = f"**{status}**" if status != "met" else status
        lines.append(f"| {check['goal']} | {check['shown']} | {shown} |")
    return "\n".join(lines) + "\n"


def loaded_label(results: Results) -> str:
    return f"chat c{results['meta']['options']['connections']}"


def finish(results: Results, out: Path) -> str:
    """Add the derived sections, write JSON and markdown next to each other, return markdown."""
    results["comparisons"] = comparisons(results)
    results["checks"] = target_checks(results)
    results["problems"] = problems(results)
    text = markdown(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    out.with_suffix(".md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> None:
    args = argv if argv is not None else sys.argv[1:]
    path = Path(args[0] if args else "bench/results/latest.json")
    results = orjson.loads(path.read_bytes())
    print(finish(results, path))


if __name__ == "__main__":
    main()
