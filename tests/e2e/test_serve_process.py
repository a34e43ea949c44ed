"""`abc-gateway serve` as a real process: embedded redis-server, signals, workers, start-up errors.

Every test runs the console script as a subprocess with its own settings file and a
clean ABC_* environment, and checks what an operator would: the socket and AOF on disk,
/readyz, a chat call, and that nothing (gateway, workers, redis-server) outlives a signal.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from gateway.embedded_redis import INSTALL_HINT, socket_answers
from tests.conftest import ADMIN_TOKEN, SIGNING_SECRET
from tests.redis_proc import free_port

ABC_GATEWAY = Path(sys.executable).parent / "abc-gateway"
PLAN: dict[str, Any] = {
    "name": "serve-test",
    "tenant": "acme",
    "models": [{"name": "gpt-4o-mini", "max_tokens": 64}],
    "budget": {"usd": 1.0},
}
SETTINGS: dict[str, Any] = {
    "providers": [{"name": "mock", "kind": "mock"}],
    "models": [{"name": "gpt-4o-mini", "provider": "mock", "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}],
}
STOP_TIMEOUT_S = 15


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without any ABC_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABC_")}
    env.update(extra)
    return env


def secrets_env(**extra: str) -> dict[str, str]:
    return clean_env(ABC_ADMIN_TOKEN=ADMIN_TOKEN, ABC_SIGNING_KEY=SIGNING_SECRET, **extra)


def pids_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (redis-server shows its socket path)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if text.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def process_group(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])


def listeners(port: int) -> int:
    """How many sockets listen on 127.0.0.1:`port` (SO_REUSEPORT gives one per worker)."""
    local = f"0100007F:{port:04X}"
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        count += fields[1] == local and fields[3] == "0A"
    return count


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    base_url: str
    port: int
    data_dir: Path
    stderr_path: Path
    spawned_at: float
    startup_s: float = 0.0  # spawn -> first 200 on /readyz

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return self.process.wait(timeout=STOP_TIMEOUT_S)


class Launcher:
    """Starts `abc-gateway serve` processes and makes sure none outlives the test."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[Served] = []

    def write_settings(self, data_dir: Path, **extra: Any) -> Path:
        path = self.tmp_path / "gateway.yaml"
        path.write_text(yaml.safe_dump({**SETTINGS, "redis": {"data_dir": str(data_dir)}, **extra}), encoding="utf-8")
        return path

    def serve(self, *args: str, env: dict[str, str] | None = None, new_session: bool = False) -> Served:
        served = self.spawn(*args, env=env, new_session=new_session)
        served.startup_s = wait_ready(served) - served.spawned_at
        return served

    def spawn(self, *args: str, env: dict[str, str] | None = None, new_session: bool = False) -> Served:
        """Start `abc-gateway serve` without waiting for it to be ready."""
        data_dir = self.tmp_path / "var"
        config = self.write_settings(data_dir)
        port = free_port()
        stderr_path = self.tmp_path / f"serve-{len(self.started)}.err"
        spawned_at = time.monotonic()
        with stderr_path.open("wb") as err:
            process = subprocess.Popen(
                [str(ABC_GATEWAY), "serve", "--config", str(config), "--port", str(port), *args],
                cwd=self.tmp_path, env=secrets_env() if env is None else env,
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=new_session,
            )
        served = Served(process, f"http://127.0.0.1:{port}", port, data_dir, stderr_path, spawned_at)
        self.started.append(served)
        return served

    def cleanup(self) -> None:
        for served in self.started:
            if served.process.poll() is None:
                served.process.kill()
                served.process.wait()
        # Whatever a failed test left behind: workers (--config) and redis-server (its socket).
        for pid in pids_mentioning(str(self.tmp_path)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def wait_ready(served: Served, timeout_s: float = 20.0) -> float:
    """Poll /readyz until it answers 200; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2) as client:
        while time.monotonic() < deadline:
            if served.process.poll() is not None:
                pytest.fail(f"serve exited with {served.process.returncode}: {served.stderr()}")
            try:
                if client.get(served.base_url + "/readyz").status_code == 200:
                    return time.monotonic()
            except httpx.TransportError:
                pass
            time.sleep(0.01)
    pytest.fail(f"/readyz did not answer 200 within {timeout_s}s: {served.stderr()}")


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    launcher = Launcher(tmp_path)
    yield launcher
    launcher.cleanup()


def admin(base_url: str) -> httpx.Client:
    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)


def open_session(base_url: str) -> dict[str, Any]:
    with admin(base_url) as client:
        compiled = client.post("/admin/v1/plans/compile", json=PLAN)
        assert compiled.status_code == 201, compiled.text
        opened = client.post("/admin/v1/sessions", json={"assembly_id": compiled.json()["assembly_id"]})
        assert opened.status_code == 201, opened.text
        session: dict[str, Any] = opened.json()
        return session


def chat(base_url: str, token: str) -> str:
    client = openai.OpenAI(base_url=base_url + "/v1", api_key=token, max_retries=0, timeout=10)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    content = completion.choices[0].message.content
    assert content
    return content


def test_serve_runs_an_embedded_redis_and_stops_it_on_sigterm(launcher: Launcher) -> None:
    served = launcher.serve()
    print(f"\nserve start-up, spawn -> first /readyz 200 (embedded redis): {served.startup_s * 1000:.0f} ms")

    assert served.socket_path.is_socket() and socket_answers(served.socket_path)
    redis_pids = pids_mentioning(str(served.socket_path))
    assert len(redis_pids) == 1, redis_pids
    assert "redis-server" in Path(f"/proc/{redis_pids[0]}/cmdline").read_text(errors="replace")
    assert (served.data_dir / "appendonlydir" / "appendonly.aof.manifest").is_file()  # appendonly yes
    ready = httpx.get(served.base_url + "/readyz").json()
    assert ready["redis"] == "ok" and ready["providers"] == ["mock"]

    session = open_session(served.base_url)
    assert chat(served.base_url, session["token"])

    assert served.stop(signal.SIGTERM) == 0
    assert not alive(redis_pids[0])
    assert not socket_answers(served.socket_path)
    assert pids_mentioning(str(served.socket_path)) == []
    assert "Traceback" not in served.stderr()
    increments = list((served.data_dir / "appendonlydir").glob("*.incr.aof"))
    assert increments and sum(p.stat().st_size for p in increments) > 0  # the session went to the AOF


def test_sessions_survive_a_restart_and_sigint_also_stops_everything(launcher: Launcher) -> None:
    first = launcher.serve()
    session = open_session(first.base_url)
    chat(first.base_url, session["token"])
    redis_pid = pids_mentioning(str(first.socket_path))[0]
    assert first.stop(signal.SIGINT) == 0
    assert not alive(redis_pid) and not socket_answers(first.socket_path)

    # A socket file left by a crash answers nothing: it is replaced, not shared.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(first.socket_path))
    assert first.socket_path.is_socket() and not socket_answers(first.socket_path)

    second = launcher.serve()  # same data dir: Redis reloads the AOF
    with admin(second.base_url) as client:
        shown = client.get(f"/admin/v1/sessions/{session['session_id']}").json()
    assert shown["state"] == "active" and shown["requests"] == 1 and shown["spent_nanos"] > 0
    assert chat(second.base_url, session["token"])  # the token still verifies: same key, same session
    assert second.stop(signal.SIGTERM) == 0
    assert pids_mentioning(str(second.socket_path)) == []


def test_with_abc_redis_url_no_embedded_redis_is_started(launcher: Launcher, redis_url: str) -> None:
    served = launcher.serve(env=secrets_env(ABC_REDIS_URL=redis_url))
    assert chat(served.base_url, open_session(served.base_url)["token"])
    assert not served.data_dir.exists()
    assert served.stop() == 0


def test_two_workers_share_the_port_and_stop_with_the_parent(launcher: Launcher) -> None:
    served = launcher.serve("--workers", "2")
    deadline = time.monotonic() + 20
    while listeners(served.port) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    redis_pids = pids_mentioning(str(served.socket_path))
    assert len(redis_pids) == 1  # one embedded redis-server, started by the parent, shared by both
    workers = sorted(set(children_of(served.process.pid)) - set(redis_pids))
    assert len(workers) == 2, workers
    for pid in workers:
        assert b"--reuse-port" in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert listeners(served.port) == 2  # two sockets on one port: SO_REUSEPORT

    session = open_session(served.base_url)
    for _ in range(6):
        # A new connection each time, so the kernel may pick either worker.
        assert chat(served.base_url, session["token"])
    with admin(served.base_url) as client:
        assert client.get(f"/admin/v1/sessions/{session['session_id']}").json()["requests"] == 6

    assert served.stop(signal.SIGTERM) == 0
    assert not any(alive(pid) for pid in workers + redis_pids)
    assert listeners(served.port) == 0
    assert pids_mentioning(str(served.socket_path)) == []


def test_ctrl_c_in_a_terminal_stops_every_worker_once_and_cleanly(launcher: Launcher) -> None:
    served = launcher.serve("--workers", "2", new_session=True)  # its own group, as in a terminal
    deadline = time.monotonic() + 20
    while listeners(served.port) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    redis_pids = pids_mentioning(str(served.socket_path))
    workers = sorted(set(children_of(served.process.pid)) - set(redis_pids))
    assert len(workers) == 2 and len(redis_pids) == 1
    # Only the parent is in the terminal's group: it forwards the signal to each worker once.
    assert all(process_group(pid) != process_group(served.process.pid) for pid in workers)
    assert chat(served.base_url, open_session(served.base_url)["token"])

    os.killpg(served.process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground group
    assert served.process.wait(timeout=STOP_TIMEOUT_S) == 0, served.stderr()
    assert not any(alive(pid) for pid in workers + redis_pids)
    assert "Traceback" not in served.stderr()


def test_when_a_worker_dies_the_parent_stops_the_rest_and_reports_it(launcher: Launcher) -> None:
    served = launcher.serve("--workers", "2")
    redis_pids = pids_mentioning(str(served.socket_path))
    deadline = time.monotonic() + 10
    while True:  # /readyz answered through one worker; the other may still be starting
        workers = sorted(set(children_of(served.process.pid)) - set(redis_pids))
        if len(workers) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(workers) == 2, (workers, redis_pids, served.stderr())

    os.kill(workers[0], signal.SIGKILL)
    code = served.process.wait(timeout=STOP_TIMEOUT_S)
    assert code == 128 + signal.SIGKILL, (code, served.stderr())
    assert not any(alive(pid) for pid in workers + redis_pids)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_while_redis_starts_leaves_no_redis_server_behind(
    launcher: Launcher, tmp_path: Path, signum: int
) -> None:
    # A redis-server that takes a second to come up keeps the gateway waiting for it.
    real = shutil.which("redis-server")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "redis-server").write_text(f'#!/bin/sh\nsleep 1\nexec {real} "$@"\n', encoding="utf-8")
    (fake_bin / "redis-server").chmod(0o755)
    served = launcher.spawn(env=secrets_env(PATH=f"{fake_bin}:{os.environ['PATH']}"))
    deadline = time.monotonic() + 10
    while not pids_mentioning(str(served.socket_path)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pids_mentioning(str(served.socket_path)), served.stderr()

    assert served.stop(signum) == 128 + signum
    assert pids_mentioning(str(served.data_dir)) == []
    assert "Traceback" not in served.stderr()


def run_failing(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    begin = time.monotonic()
    done = subprocess.run([str(ABC_GATEWAY), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=30)
    print(f"\n{args[0]} failed in {(time.monotonic() - begin) * 1000:.0f} ms: {done.stderr.strip()}")
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert done.stdout == ""
    return done


def test_a_bad_settings_file_fails_fast_naming_the_field(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    price = {"input_per_mtok": "cheap", "output_per_mtok": 1}
    bad = {**SETTINGS, "models": [{**SETTINGS["models"][0], "price": price}]}
    config.write_text(yaml.safe_dump(bad), encoding="utf-8")
    done = run_failing(["serve", "--config", str(config), "--port", str(free_port())], secrets_env(), tmp_path)
    assert done.returncode == 2
    assert "models.0.price.input_per_mtok" in done.stderr and str(config) in done.stderr
    assert not (tmp_path / "var").exists()  # nothing was started

    config.write_text(yaml.safe_dump({**SETTINGS, "servr": {"port": 1}}), encoding="utf-8")
    done = run_failing(["serve", "--config", str(config)], secrets_env(), tmp_path)
    assert "servr: Extra inputs are not permitted" in done.stderr


def test_a_missing_settings_file_fails_naming_the_path(tmp_path: Path) -> None:
    done = run_failing(["serve"], secrets_env(ABC_CONFIG=str(tmp_path / "nowhere.yaml")), tmp_path)
    assert f"{tmp_path / 'nowhere.yaml'}: config file not found" in done.stderr


def test_a_port_in_use_fails_in_one_line_and_stops_the_embedded_redis(launcher: Launcher, tmp_path: Path) -> None:
    config = launcher.write_settings(tmp_path / "var")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([str(ABC_GATEWAY), "serve", "--config", str(config), "--port", str(port)],
                              env=secrets_env(), cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    # The app had started, so its own log lines may come first; the reason is the last line.
    assert done.stderr.splitlines()[-1] == f"abc-gateway: cannot listen on 127.0.0.1:{port}: Address already in use"
    assert (tmp_path / "var" / "appendonlydir").is_dir()  # Redis had started ...
    assert pids_mentioning(str(tmp_path / "var")) == []  # ... and was stopped


def test_serve_without_a_signing_key_refuses_to_start(launcher: Launcher, tmp_path: Path) -> None:
    config = launcher.write_settings(tmp_path / "var")
    args = ["serve", "--config", str(config), "--port", str(free_port())]
    done = run_failing(args, clean_env(ABC_ADMIN_TOKEN=ADMIN_TOKEN), tmp_path)
    assert done.returncode == 2
    assert "ABC_SIGNING_KEY is not set" in done.stderr
    assert not (tmp_path / "var").exists()


def test_serve_without_redis_server_says_how_to_install_it(launcher: Launcher, tmp_path: Path) -> None:
    config = launcher.write_settings(tmp_path / "var")
    # The console script's shebang names the venv's python, so no PATH is needed to run it.
    args = ["serve", "--config", str(config), "--port", str(free_port())]
    done = run_failing(args, secrets_env(PATH="/nonexistent"), tmp_path)
    assert done.returncode == 2
    assert INSTALL_HINT in done.stderr and "apt-get install redis-server" in done.stderr
