"""The test MCP server (tests/fakes/mcp_server.py) as a child process on a free loopback port."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import httpx

from tests.redis_proc import free_port


class McpServerProcess:
    def __init__(self) -> None:
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return self.base + "/mcp"

    def start(self) -> McpServerProcess:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.fakes.mcp_server", "--port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60  # importing the SDK is slow on a loaded machine
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError("the test MCP server exited")
            try:
                httpx.get(self.base + "/control/calls", timeout=0.5)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError("the test MCP server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def calls(self) -> dict[str, Any]:
        counts: dict[str, Any] = httpx.get(self.base + "/control/calls", timeout=5).json()
        return counts

    def control(self, what: str) -> None:
        httpx.post(f"{self.base}/control/{what}", timeout=5).raise_for_status()
