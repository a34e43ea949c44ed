"""Child processes of the benchmark: start them pinned, read their CPU and RSS, always stop them.

Every child runs in its own session, so stopping its process group also stops whatever
it forked (gateway workers, uvicorn), and a Supervisor stops them all on any exit path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

CLK_TCK = os.sysconf("SC_CLK_TCK")
MS_PER_TICK = 1000.0 / CLK_TCK


def free_port() -> int:
    """A port free right now; a small race with other programs is accepted for a benchmark."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    # taskset execs the program, so the pid we get is the program's own.
    return ["taskset", "-c", cpus, *argv] if cpus else list(argv)


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name may hold spaces and parentheses; fields resume after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ms(pid: int) -> float | None:
    """utime + stime of one live process, in milliseconds."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) * MS_PER_TICK


def sys_cpu_ms(pid: int) -> float | None:
    """stime alone (the kernel's share of cpu_ms: syscalls, socket work), in milliseconds."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[12]) * MS_PER_TICK


def tree_pids(root: int) -> list[int]:
    """The root and all its descendants alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    queue = deque([root])
    while queue:
        pid = queue.popleft()
        if pid == root and not Path(f"/proc/{pid}").exists():
            return []
        found.append(pid)
        queue.extend(children.get(pid, ()))
    return found


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    cpus: str | None

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def cpu_ms_by_pid(self) -> dict[int, float]:
        result: dict[int, float] = {}
        for pid in tree_pids(self.pid):
            value = cpu_ms(pid)
            if value is not None:
                result[pid] = value
        return result

    def rss_bytes(self) -> int:
        """Summed over the process tree: shared pages count once per process (an upper bound)."""
        return sum(rss_bytes(pid) for pid in tree_pids(self.pid))

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return "(no output)"
        return "\n".join(text.splitlines()[-lines:]) or "(no output)"

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen.poll() is not None:
            return
        _signal_group(self.pid, signal.SIGTERM)
        try:
            self.popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=grace_s)
        # Workers that outlived their parent are still in the group.
        _signal_group(self.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class Supervisor:
    """Owns every long-lived child; `stop_all` runs on normal exit, exceptions and SIGTERM."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cpus: str | None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                pinned(argv, cpus),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        child = Child(name=name, popen=popen, log_path=log_path, cpus=cpus)
        self.children.append(child)
        return child

    def stop(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(self.children):
            try:
                child.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: could not stop {child.name} (pid {child.pid}): {exc}")
        self.children.clear()

    @contextlib.contextmanager
    def running(self) -> Iterator[Supervisor]:
        def _terminate(signum: int, _frame: FrameType | None) -> None:
            raise SystemExit(128 + signum)

        previous = {s: signal.signal(s, _terminate) for s in (signal.SIGTERM, signal.SIGHUP)}
        try:
            yield self
        finally:
            self.stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@dataclass(frozen=True)
class Finished:
    returncode: int
    output: str
    cpu_ms: float  # user + system time of the process, from wait4's rusage
    wall_s: float


def run_to_end(
    argv: Sequence[str],
    *,
    cpus: str | None,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> Finished:
    """Run a short-lived tool (wrk, the TTFT client) and get its own CPU time as well."""
    started = time.monotonic()
    # Output goes to a file, not a pipe, so the timeout holds even if the tool hangs.
    with tempfile.TemporaryFile() as out:
        popen = subprocess.Popen(
            pinned(argv, cpus),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
        try:
            deadline = started + timeout_s
            while True:
                # wait4 rather than Popen.wait: it returns the child's rusage with its status.
                pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{argv[0]} ran longer than {timeout_s:.0f}s")
                time.sleep(0.02)
        except BaseException:
            _signal_group(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        popen.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read().decode(errors="replace")
    return Finished(
        returncode=popen.returncode,
        output=output,
        cpu_ms=(usage.ru_utime + usage.ru_stime) * 1000.0,
        wall_s=time.monotonic() - started,
    )
