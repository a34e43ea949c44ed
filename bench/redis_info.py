"""Redis work per request, from INFO before and after a scenario.

`commands` sums INFO commandstats calls, which include the commands run inside Lua
scripts. `reads` is total_reads_processed (Redis 7+): the read events the server
handled, about one per round trip, since a pipeline or a script arrives in one read.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class RedisCounters:
    commands: dict[str, int]  # command name -> calls
    reads: int | None  # None on Redis before 7.0


def _info(port: int, sections: list[str]) -> str:
    parts = [b"INFO", *(s.encode() for s in sections)]
    request = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        reader = sock.makefile("rb")
        header = reader.readline()
        if not header.startswith(b"$"):
            raise RuntimeError(f"unexpected INFO reply: {header!r}")
        return reader.read(int(header[1:])).decode()


def counters(port: int) -> RedisCounters:
    commands: dict[str, int] = {}
    reads: int | None = None
    for line in _info(port, ["stats", "commandstats"]).splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            stats = dict(item.split("=", 1) for item in fields.split(","))
            commands[name] = int(stats["calls"])
        elif line.startswith("total_reads_processed:"):
            reads = int(line.split(":", 1)[1])
    return RedisCounters(commands=commands, reads=reads)


def per_request(
    before: RedisCounters, after: RedisCounters, requests: int
) -> dict[str, object] | None:
    if requests <= 0:
        return None
    # Our own INFO calls are not the gateway's work.
    deltas = {
        name: calls - before.commands.get(name, 0)
        for name, calls in after.commands.items()
        if name != "info" and calls - before.commands.get(name, 0) > 0
    }
    reads = None
    if before.reads is not None and after.reads is not None:
        reads = round((after.reads - before.reads - 1) / requests, 3)  # -1: the INFO itself
    return {
        "commands_per_req": round(sum(deltas.values()) / requests, 3),
        "reads_per_req": reads,
        "by_command_per_req": {
            name: round(calls / requests, 3)
            for name, calls in sorted(deltas.items(), key=lambda kv: -kv[1])
        },
    }
