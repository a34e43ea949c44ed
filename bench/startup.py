"""Start-up time and memory with and without a litellm provider configured, and what the
first call through litellm costs (litellm is imported only when such a provider exists).

    .venv/bin/python -m bench.startup [--runs 5] [--out bench/results/startup.json]

Each run starts a fresh `abc-gateway serve` against one redis-server and the bench's mock
upstream, and measures: seconds from spawn to the first 200 from /readyz, the process
tree's RSS right then, then (after compiling a plan and opening a session) the latency
of the first and the second chat call and the RSS after them. Variant `plain` has the
bench's OpenAI-compatible provider only; `litellm` adds a `kind: litellm` provider (its
`openai` route pointed at the same mock, LITELLM_LOCAL_MODEL_COST_MAP=True: nothing is
fetched) and sends its calls to that model. Medians over the runs are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.httpcall import call, call_json, wait_for_200
from bench.procs import Supervisor, free_port
from bench.targets import (
    UPSTREAM_KEY_ENV,
    child_env,
    gateway_executable,
    gateway_settings,
    start_mock,
    start_redis,
)

MIB = 1024 * 1024
VARIANTS = ("plain", "litellm")


def _settings(mock_port: int, variant: str) -> dict[str, Any]:
    settings = gateway_settings(mock_port, None)
    if variant == "litellm":
        settings["providers"].append({
            "name": "via-litellm", "kind": "litellm", "litellm_provider": "openai",
            "api_base": f"http://127.0.0.1:{mock_port}/v1", "api_key_env": UPSTREAM_KEY_ENV,
        })
        settings["models"].append({
            "name": "ll-chat", "provider": "via-litellm", "upstream_model": "gpt-4o-mini",
            "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6},
        })
    return settings


def _chat_ms(root: str, token: str, model: str) -> float:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}]}).encode()
    started = time.monotonic()
    status, raw = call("POST", f"{root}/v1/chat/completions", body=body,
                       headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    elapsed = (time.monotonic() - started) * 1000
    if status != 200:
        raise RuntimeError(f"chat call to {model} answered {status}: {raw[:300]!r}")
    return elapsed


def one_run(sup: Supervisor, workdir: Path, *, variant: str, mock_port: int, redis_port: int, run: int) -> dict[str, float]:
    settings_path = workdir / f"{variant}-{run}.yaml"
    settings_path.write_text(yaml.safe_dump(_settings(mock_port, variant)))
    port = free_port()
    admin = secrets.token_urlsafe(24)
    env = child_env(
        ABC_REDIS_URL=f"redis://127.0.0.1:{redis_port}/0", ABC_ADMIN_TOKEN=admin,
        ABC_SIGNING_KEY=secrets.token_urlsafe(36), LITELLM_LOCAL_MODEL_COST_MAP="True",
        **{UPSTREAM_KEY_ENV: "sk-bench-upstream"},
    )
    argv = [str(gateway_executable()), "serve", "--config", str(settings_path), "--host", "127.0.0.1", "--port", str(port)]
    started = time.monotonic()
    gateway = sup.start(f"{variant}-{run}", argv, cpus=None, env=env)
    root = f"http://127.0.0.1:{port}"
    try:
        startup_s = wait_for_200(f"{root}/readyz", started=started, timeout_s=60, still_running=gateway.alive)
        rss_start = gateway.rss_bytes() / MIB
        model = "ll-chat" if variant == "litellm" else "gpt-4o-mini"
        auth = {"Authorization": f"Bearer {admin}"}
        plan = {"name": f"startup-{variant}", "models": [{"name": model, "max_tokens": 64}], "budget": {"usd": 10}}
        status, compiled = call_json("POST", f"{root}/admin/v1/plans/compile", plan, headers=auth)
        if status != 201:
            raise RuntimeError(f"compile answered {status}: {compiled}")
        status, session = call_json("POST", f"{root}/admin/v1/sessions", {"assembly_id": compiled["assembly_id"]}, headers=auth)
        if status != 201:
            raise RuntimeError(f"session answered {status}: {session}")
        first_ms = _chat_ms(root, session["token"], model)
        second_ms = _chat_ms(root, session["token"], model)
        rss_after = gateway.rss_bytes() / MIB
    finally:
        sup.stop(gateway)
    return {"startup_s": startup_s, "rss_start_mib": rss_start, "first_call_ms": first_ms,
            "second_call_ms": second_ms, "rss_after_calls_mib": rss_after}


def table(results: dict[str, list[dict[str, float]]]) -> str:
    rows = ["| settings | runs | start-up to /readyz 200 (s) | RSS after start (MiB) | 1st chat call (ms) | 2nd chat call (ms) | RSS after the calls (MiB) |",
            "|---|---|---|---|---|---|---|"]
    for variant, runs in results.items():
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        rows.append(f"| {variant} | {len(runs)} | {med['startup_s']:.3f} | {med['rss_start_mib']:.1f} | "
                    f"{med['first_call_ms']:.1f} | {med['second_call_ms']:.1f} | {med['rss_after_calls_mib']:.1f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("bench/results/startup.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="abc-startup-") as tmp:
        workdir = Path(tmp)
        sup = Supervisor(workdir)
        try:
            _, mock_port = start_mock(sup, cpus=None, delay_ms=0)
            _, redis_port = start_redis(sup, name="redis", cpus=None, workdir=workdir)
            # Interleaved, so a slow moment of the machine does not land on one variant only.
            results: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
            for run in range(args.runs):
                for variant in VARIANTS:
                    results[variant].append(one_run(sup, workdir, variant=variant, mock_port=mock_port, redis_port=redis_port, run=run))
        finally:
            sup.stop_all()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
