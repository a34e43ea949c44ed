"""Real redis-server child processes for tests: one node, or a Redis Cluster of them, on
loopback ports; no persistence, or an append-only file synced on every write (`aof=True`),
so a restart keeps all it acknowledged."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisProcess:
    def __init__(self, workdir: Path, port: int | None = None, *, aof: bool = False) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed; run scripts/dev test, which installs it")
        self.workdir = workdir
        self.port = port or free_port()
        self.aof = aof
        self.process: subprocess.Popen[bytes] | None = None
        self.extra_args: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.aof else ["--appendonly", "no"]
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", str(self.workdir), "--daemonize", "no", *self.extra_args],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


# Addresses of the clusters tests started: a gateway or client given one runs in cluster mode.
CLUSTER_URLS: set[str] = set()


def is_cluster_url(url: str) -> bool:
    return url in CLUSTER_URLS


def client_for(url: str) -> redis.Redis | redis.RedisCluster:
    """A plain synchronous client for checks: a cluster client when `url` is a test cluster's."""
    if is_cluster_url(url):
        return redis.RedisCluster.from_url(url)
    return redis.Redis.from_url(url)


def _free_cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    for _ in range(200):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


class RedisClusterProcess:
    """A real Redis Cluster on loopback: `masters` redis-servers with `cluster-enabled yes`,
    each with `replicas` replicas, joined by `redis-cli --cluster create`."""

    def __init__(self, workdir: Path, *, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000) -> None:
        if shutil.which("redis-cli") is None:
            raise RuntimeError("redis-cli is not installed; run scripts/dev test, which installs it")
        self.workdir = workdir
        self.replicas = replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports = [_free_cluster_port() for _ in range(masters * (1 + replicas))]
        self.nodes: dict[int, RedisProcess] = {}

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def _node(self, port: int) -> RedisProcess:
        node = RedisProcess(self.workdir / str(port), port)
        node.extra_args = [
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            # A replica whose master is gone for good takes over however stale it is.
            "--cluster-replica-validity-factor", "0",
        ]
        return node

    def start(self) -> RedisClusterProcess:
        for port in self.ports:
            self.nodes[port] = self._node(port).start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60,
        )
        self.wait_healthy()
        CLUSTER_URLS.add(self.url)
        return self

    def wait_healthy(self, timeout: float = 30) -> None:
        """Every live node says the cluster is ok, and every replica is in sync with its master."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            live = [port for port, node in self.nodes.items() if node.process is not None]
            if all(self._cluster_ok(port) and self._replica_synced(port) for port in live):
                return
            time.sleep(0.1)
        raise RuntimeError("the cluster did not become healthy")

    def _replica_synced(self, port: int) -> bool:
        """True for a master; for a replica, once its link to the master is up."""
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                info = client.info("replication")
            finally:
                client.close()
        except redis.RedisError:
            return False
        return info.get("role") == "master" or (info.get("master_link_status") == "up" and not info.get("master_sync_in_progress"))

    def _cluster_ok(self, port: int) -> bool:
        try:
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                info = client.execute_command("CLUSTER", "INFO")
            finally:
                client.close()
        except redis.RedisError:
            return False
        text = info.decode() if isinstance(info, bytes) else str(info)
        return "cluster_state:ok" in text and "cluster_slots_ok:16384" in text

    def masters(self) -> list[int]:
        """Ports of the live masters that own slots."""
        out = []
        for port, node in self.nodes.items():
            if node.process is None:
                continue
            client = redis.Redis(port=port, socket_timeout=1)
            try:
                role = client.execute_command("ROLE")[0]
            except redis.RedisError:
                continue
            finally:
                client.close()
            if role == b"master":
                out.append(port)
        return out

    def master_of(self, key: str) -> int:
        client = redis.RedisCluster.from_url(self.url)
        try:
            node = client.get_node_from_key(key)
            return int(node.port)
        finally:
            client.close()

    def flush(self) -> None:
        client = redis.RedisCluster.from_url(self.url)
        try:
            client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
        finally:
            client.close()

    def kill(self, port: int) -> None:
        self.nodes[port].stop()

    def restart(self, port: int) -> None:
        """Bring a killed node back with its nodes.conf: it rejoins, as a replica when its
        slots were taken over meanwhile."""
        self.nodes[port] = self._node(port).start()

    def stop(self) -> None:
        CLUSTER_URLS.discard(self.url)
        for node in self.nodes.values():
            node.stop()
