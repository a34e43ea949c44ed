"""What the raw figures mean: overheads and ratios, the issue's targets, errors and warnings.

Everything here reads the JSON-shaped results only, so a saved run can be judged again.
"""

from __future__ import annotations

from typing import Any

Results = dict[str, Any]

# The figure for LiteLLM 1.80.0 on this kind of machine, shown next to the
# 15x target only when LiteLLM was not run.
LITELLM_REFERENCE_RPS = 88.0
LEAK_NOISE = 1.05
# Above this share of one core used outside the benchmark, a row is flagged.
BUSY_MACHINE_PCT = 15.0


def measured(result: Any) -> bool:
    """A wrk run happened (with or without errors)."""
    return isinstance(result, dict) and result.get("status") in ("ok", "errors")


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def comparisons(results: Results) -> dict[str, dict[str, Any]]:
    """Per scenario: each target against direct, and LiteLLM against ABC."""
    out: dict[str, dict[str, Any]] = {}
    for scenario in results["scenarios"]:
        by_target = scenario["results"]
        direct = by_target.get("direct")
        entry: dict[str, Any] = {}
        for name, result in by_target.items():
            if name != "direct" and measured(result) and measured(direct):
                entry[f"{name}_vs_direct"] = _versus(result, direct)
        abc, litellm = by_target.get("abc"), by_target.get("litellm")
        if measured(abc) and measured(litellm):
            entry["litellm_vs_abc"] = {
                "latency_ratio_p50": _ratio(litellm["latency_ms"]["p50"], abc["latency_ms"]["p50"]),
                "latency_ratio_p99": _ratio(litellm["latency_ms"]["p99"], abc["latency_ms"]["p99"]),
                "abc_over_litellm_rps": _ratio(abc["rps"], litellm["rps"]),
            }
        out[scenario["key"]] = entry
    return out


def _versus(result: dict[str, Any], direct: dict[str, Any]) -> dict[str, Any]:
    lat, base = result["latency_ms"], direct["latency_ms"]
    return {
        "overhead_p50_ms": round(lat["p50"] - base["p50"], 3),
        "overhead_p99_ms": round(lat["p99"] - base["p99"], 3),
        "latency_ratio_p50": _ratio(lat["p50"], base["p50"]),
        "latency_ratio_p99": _ratio(lat["p99"], base["p99"]),
        "rps_ratio": _ratio(result["rps"], direct["rps"]),
    }


def scenario_result(results: Results, key: str, target: str) -> dict[str, Any] | None:
    for scenario in results["scenarios"]:
        if scenario["key"] == key:
            result = scenario["results"].get(target)
            return result if measured(result) else None
    return None


def _clean(results: Results, key: str, *targets: str) -> bool:
    return all((scenario_result(results, key, t) or {}).get("status") == "ok" for t in targets)


def _check(goal: str, value: float | None, met: bool, shown: str, *, valid: bool) -> dict[str, Any]:
    if value is None:
        status = "n/a"
    elif not valid:
        status = "invalid (errors)"
    else:
        status = "met" if met else "not met"
    return {"goal": goal, "value": value, "shown": shown, "status": status}


def _ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f} ms"


def target_checks(results: Results) -> list[dict[str, Any]]:
    """Where ABC stands against each target of the issue."""
    loaded = f"chat-c{results['meta']['options']['connections']}"
    comps = results["comparisons"]
    c1 = comps.get("chat-c1", {}).get("abc_vs_direct", {})
    cl = comps.get(loaded, {}).get("abc_vs_direct", {})
    abc_loaded = scenario_result(results, loaded, "abc")
    checks = []

    v = c1.get("overhead_p50_ms")
    checks.append(
        _check(
            "overhead p50 < 1 ms (chat, c1)",
            v,
            v is not None and v < 1.0,
            _ms(v),
            valid=_clean(results, "chat-c1", "abc", "direct"),
        )
    )
    v = cl.get("overhead_p99_ms")
    checks.append(
        _check(
            f"overhead p99 < 5 ms ({loaded})",
            v,
            v is not None and v < 5.0,
            _ms(v),
            valid=_clean(results, loaded, "abc", "direct"),
        )
    )
    v = abc_loaded["cpu_ms_per_req"].get("gateway") if abc_loaded else None
    checks.append(
        _check(
            f"gateway CPU < 0.5 ms per request ({loaded})",
            v,
            v is not None and v < 0.5,
            _ms(v),
            valid=_clean(results, loaded, "abc"),
        )
    )
    checks.append(_litellm_check(results, loaded, abc_loaded))
    v = cl.get("rps_ratio")
    checks.append(
        _check(
            f"throughput >= 25% of direct ({loaded})",
            v,
            v is not None and v >= 0.25,
            "n/a" if v is None else f"{v * 100:.1f}%",
            valid=_clean(results, loaded, "abc", "direct"),
        )
    )
    checks.append(_ttft_check(results))
    checks.append(_redis_check(results))

    abc = results["targets"].get("abc", {})
    v = abc.get("startup_s")
    checks.append(
        _check(
            "start-up < 1 s (to a 200 from /readyz)",
            v,
            v is not None and v < 1.0,
            "n/a" if v is None else f"{v:.2f} s",
            valid=True,
        )
    )
    v = abc.get("idle_rss_mib")
    checks.append(
        _check(
            "idle RSS < 80 MiB",
            v,
            v is not None and v < 80,
            "n/a" if v is None else f"{v:.1f} MiB",
            valid=True,
        )
    )
    leak = results.get("leak") or {}
    v = leak.get("ratio")
    low, high = results["meta"]["options"].get("leak_requests") or (10_000, 100_000)
    checks.append(
        _check(
            f"no RSS growth {low:,} -> {high:,} requests (ratio <= {LEAK_NOISE})",
            v,
            v is not None and v <= LEAK_NOISE,
            "n/a" if v is None else f"{v:.3f}",
            valid=leak.get("status") == "ok",
        )
    )
    runs = [r for s in results["scenarios"] if measured(r := s["results"].get("abc"))]
    bad = sum(r["non_2xx"] + r["body_errors"] for r in runs)
    checks.append(
        _check(
            "every ABC response a 2xx (a fast 4xx is no result)",
            float(bad) if runs else None,
            bad == 0,
            f"{bad} bad responses",
            valid=True,
        )
    )
    return checks


def _litellm_check(results: Results, loaded: str, abc: dict[str, Any] | None) -> dict[str, Any]:
    goal = f"throughput >= 15x LiteLLM ({loaded})"
    v = results["comparisons"].get(loaded, {}).get("litellm_vs_abc", {}).get("abc_over_litellm_rps")
    if v is None and abc:
        shown = (
            f"LiteLLM not run (--with-litellm); against the issue's "
            f"{LITELLM_REFERENCE_RPS:.0f} req/s: {abc['rps'] / LITELLM_REFERENCE_RPS:.1f}x"
        )
        return {"goal": goal, "value": None, "shown": shown, "status": "n/a"}
    return _check(
        goal,
        v,
        v is not None and v >= 15,
        "n/a" if v is None else f"{v:.1f}x",
        valid=_clean(results, loaded, "abc", "litellm"),
    )


def _ttft_check(results: Results) -> dict[str, Any]:
    ttft = results.get("ttft") or {}
    abc, direct = ttft.get("abc") or {}, ttft.get("direct") or {}
    v = None
    if abc.get("ttft_ms") and direct.get("ttft_ms"):
        v = round(abc["ttft_ms"]["p50"] - direct["ttft_ms"]["p50"], 3)
    valid = abc.get("status") == "ok" and direct.get("status") == "ok"
    return _check(
        "time to first token within 1 ms of direct (p50)",
        v,
        v is not None and v <= 1.0,
        _ms(v),
        valid=valid,
    )


def _redis_check(results: Results) -> dict[str, Any]:
    redis = (scenario_result(results, "chat-c1", "abc") or {}).get("redis") or {}
    v = redis.get("reads_per_req")
    shown = (
        "n/a"
        if v is None
        else (f"{v:.2f} round trips, {redis.get('commands_per_req', 0):.1f} commands per request")
    )
    # A small allowance for the gateway's background work (the reaper) during the run.
    return _check(
        "Redis <= 2 round trips per chat request (c1)",
        v,
        v is not None and v <= 2.05,
        shown,
        valid=_clean(results, "chat-c1", "abc"),
    )


def error_text(result: dict[str, Any]) -> str:
    parts = []
    if result.get("non_2xx"):
        codes = ", ".join(f"{c}: {n}" for c, n in result["statuses"].items() if c[0] != "2")
        parts.append(f"{result['non_2xx']} non-2xx ({codes})")
    if result.get("body_errors"):
        parts.append(f"{result['body_errors']} 200s carrying an error")
    for kind, n in (result.get("socket_errors") or {}).items():
        parts.append(f"{n} {kind} errors")
    if not result.get("requests"):
        parts.append("no request completed")
    return "; ".join(parts) or "0"


def problems(results: Results) -> list[str]:
    """Everything that makes a figure invalid, to be shown before any figure."""
    found: list[str] = []
    for name, target in results["targets"].items():
        if target.get("status") == "failed":
            found.append(f"target {name} failed: {target.get('error', '').splitlines()[0]}")
    for scenario in results["scenarios"]:
        for name, result in scenario["results"].items():
            if (
                result.get("status") == "failed"
                and results["targets"].get(name, {}).get("status") != "failed"
            ):
                found.append(f"{scenario['key']} {name}: {result.get('reason')}")
            elif result.get("status") == "errors":
                found.append(f"{scenario['key']} {name}: {error_text(result)}")
    for name, result in (results.get("ttft") or {}).items():
        if result.get("status") == "errors" or (
            result.get("status") == "failed"
            and results["targets"].get(name, {}).get("status") != "failed"
        ):
            found.append(f"ttft {name}: {result.get('reason') or result.get('statuses')}")
    for run in results.get("scale_out") or []:
        if run.get("status") in ("failed", "errors"):
            found.append(
                f"scale-out, {run['workers']} workers: "
                f"{run.get('reason') or str(run.get('errors')) + ' errors'}"
            )
    leak = results.get("leak") or {}
    if leak.get("status") in ("failed", "errors"):
        found.append(f"leak check: {leak.get('reason') or str(leak.get('errors')) + ' errors'}")
    profile = results.get("profile") or {}
    if profile.get("error"):
        found.append(f"profile ({profile.get('tool')}): {profile['error']}")
    return found


def warnings(results: Results) -> list[str]:
    """Figures that are valid but were taken while other work used the CPUs too."""
    found = []
    for scenario in results["scenarios"]:
        busy = []
        for name, result in scenario["results"].items():
            other = (result.get("machine") or {}).get("unattributed_pct")
            if other is not None and other > BUSY_MACHINE_PCT:
                busy.append(f"{name} {other:.0f}%")
        if busy:
            found.append(f"{scenario['label']}: {', '.join(busy)}")
    return found
