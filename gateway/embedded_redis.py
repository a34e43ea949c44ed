"""The embedded `redis-server` child process used when ABC_REDIS_URL is unset.

It listens on a unix socket only (no TCP port), keeps AOF on under the data dir,
and is stopped when the gateway exits.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from gateway.errors import ConfigError

INSTALL_HINT = (
    "redis-server not found: install it (Debian/Ubuntu: sudo apt-get install redis-server) "
    "or set ABC_REDIS_URL to an existing Redis"
)


class EmbeddedRedis:
    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.socket_path = self.data_dir / "redis.sock"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def start(self, *, timeout_s: float = 10.0) -> str:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ConfigError(INSTALL_HINT)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.socket_path.exists():
            if socket_answers(self.socket_path):
                # Another gateway process on this machine already runs it (e.g. a demo
                # left running); share it rather than fight over the AOF.
                return self.url
            self.socket_path.unlink()
        args = [
            binary,
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.data_dir / "redis.log"),
        ]
        # start_new_session: a Ctrl-C aimed at the gateway must not kill Redis before
        # the gateway has flushed its last journal writes; we stop it ourselves.
        self._process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return self._wait_ready(timeout_s)
        except BaseException:
            # Also on Ctrl-C or SIGTERM while waiting: in its own session, it would outlive us.
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float) -> str:
        assert self._process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ConfigError(f"redis-server exited at start; see {self.data_dir / 'redis.log'}")
            if socket_answers(self.socket_path):
                return self.url
            time.sleep(0.02)
        raise ConfigError(f"redis-server did not start within {timeout_s:.0f}s")

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def socket_answers(path: Path) -> bool:
    """A redis-server answers PING on this unix socket."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(str(path))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False
