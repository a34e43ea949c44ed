"""LiteLLM's proxy as a comparison target: installed into bench/.litellm-venv, never the project's.

One worker, no database, a master key (so it authenticates each call as ABC does),
pointed at the same mock upstream.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.httpcall import wait_for_200
from bench.procs import Child, Supervisor, free_port
from bench.targets import CHAT_MODEL, EMBEDDING_MODEL, Target, TargetFailed, child_env

LITELLM_VERSION = "1.80.0"
# These two releases shipped a credential stealer; never install or run them.
FORBIDDEN_VERSIONS = frozenset({"1.82.7", "1.82.8"})
VENV = Path(__file__).resolve().parent / ".litellm-venv"


def _installed_version() -> str | None:
    python = VENV / "bin" / "python"
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "from importlib.metadata import version; print(version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _refuse_forbidden(version: str | None) -> None:
    if version in FORBIDDEN_VERSIONS:
        raise TargetFailed(
            f"litellm {version} is a compromised release and will not be run; "
            f"delete {VENV} and rerun to get {LITELLM_VERSION}"
        )


def _stream_progress(argv: list[str], what: str, timeout_s: float) -> None:
    print(f"  {what}: {' '.join(argv)}", flush=True)
    started = time.monotonic()
    popen = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env()
    )
    assert popen.stdout is not None
    tail: list[str] = []
    for line in popen.stdout:
        line = line.rstrip()
        tail = [*tail, line][-20:]
        # pip is chatty; the lines that show progress are enough.
        if line.startswith(("Collecting", "Downloading", "Installing", "Successfully")):
            print(f"    [{time.monotonic() - started:5.0f}s] {line[:120]}", flush=True)
        if time.monotonic() - started > timeout_s:
            popen.kill()
            break
    if popen.wait() != 0:
        raise TargetFailed(f"{what} failed:\n" + "\n".join(tail))


def ensure_litellm() -> Path:
    """The litellm executable of the bench's own venv, installed at the pinned version."""
    _refuse_forbidden(LITELLM_VERSION)
    installed = _installed_version()
    _refuse_forbidden(installed)
    if installed != LITELLM_VERSION:
        print(f"installing litellm[proxy]=={LITELLM_VERSION} into {VENV} (takes minutes)")
        if not (VENV / "bin" / "python").exists():
            _stream_progress([sys.executable, "-m", "venv", str(VENV)], "creating venv", 300)
        pip = [str(VENV / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        _stream_progress(pip + [f"litellm[proxy]=={LITELLM_VERSION}"], "pip install", 1800)
        installed = _installed_version()
        _refuse_forbidden(installed)
        if installed != LITELLM_VERSION:
            raise TargetFailed(f"expected litellm {LITELLM_VERSION} in {VENV}, found {installed}")
    return VENV / "bin" / "litellm"


def _litellm_config(mock_port: int, master_key: str) -> dict[str, object]:
    api_base = f"http://127.0.0.1:{mock_port}/v1"
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": api_base,
                    "api_key": "sk-bench-upstream",
                },
            }
            for name in (CHAT_MODEL, EMBEDDING_MODEL)
        ],
        "general_settings": {"master_key": master_key},
        "litellm_settings": {"telemetry": False},
    }


def start_litellm(
    sup: Supervisor, *, mock: Child, mock_port: int, cpus: str | None, workdir: Path
) -> Target:
    exe = ensure_litellm()
    master_key = "sk-" + secrets.token_urlsafe(24)
    config_path = workdir / "litellm.yaml"
    config_path.write_text(yaml.safe_dump(_litellm_config(mock_port, master_key)))
    port = free_port()
    argv = [str(exe), "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1"]
    env = child_env(
        # The bundled price map instead of a download at start: no network, steadier start-up.
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
    )
    started = time.monotonic()
    proxy = sup.start("litellm", argv, cpus=cpus, env=env)
    target = Target(
        name="litellm",
        label=f"LiteLLM {LITELLM_VERSION}",
        base_url=f"http://127.0.0.1:{port}/v1",
        authorization=f"Bearer {master_key}",
        roles={"gateway": proxy, "mock": mock},
        own=[proxy],
        gateway_cpus=cpus,
    )
    try:
        target.startup_s = wait_for_200(
            f"http://127.0.0.1:{port}/health/liveliness",
            started=started,
            timeout_s=180,
            still_running=proxy.alive,
        )
    except (RuntimeError, TimeoutError) as exc:
        sup.stop(proxy)
        raise TargetFailed(
            f"litellm: {exc}\n--- last lines of its output ---\n{proxy.tail()}"
        ) from None
    target.idle_rss_bytes = proxy.rss_bytes()
    return target
