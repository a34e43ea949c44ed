"""Time to first streamed token: a small sequential client, the same for every target.

Run as `python -m bench.ttft --url URL --n 200`; the Authorization header value is read
from BENCH_AUTHORIZATION so it never shows in a process list. Prints one JSON line.
The client's own overhead is in every target's figure, so it cancels in the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import aiohttp
import orjson
import uvloop

BODY = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a terse assistant."},
            {"role": "user", "content": "Say hello in one short sentence."},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
)


def _has_content(line: bytes) -> bool:
    if not line.startswith(b"data:"):
        return False
    payload = line[5:].strip()
    if not payload or payload == b"[DONE]":
        return False
    try:
        choices = orjson.loads(payload).get("choices") or []
    except orjson.JSONDecodeError:
        return False
    return any((c.get("delta") or {}).get("content") for c in choices)


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, float | None, float]:
    """(status, seconds to the first content chunk or None, seconds to the end)."""
    started = time.perf_counter()
    first: float | None = None
    async with session.post(url, data=BODY, headers=headers) as response:
        async for line in response.content:
            if first is None and _has_content(line):
                first = time.perf_counter() - started
        return response.status, first, time.perf_counter() - started


def _summary_us(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)

    def pct(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1e6, 1)

    return {
        "min": round(ordered[0] * 1e6, 1),
        "p50": round(statistics.median(ordered) * 1e6, 1),
        "p90": pct(90),
        "p99": pct(99),
        "max": round(ordered[-1] * 1e6, 1),
        "mean": round(statistics.fmean(ordered) * 1e6, 1),
    }


async def measure(url: str, n: int, warmup: int) -> dict[str, object]:
    headers = {"Content-Type": "application/json"}
    auth = os.environ.get("BENCH_AUTHORIZATION")
    if auth:
        headers["Authorization"] = auth
    firsts: list[float] = []
    totals: list[float] = []
    statuses: dict[str, int] = {}
    no_content = 0
    connector = aiohttp.TCPConnector(limit=1)  # one kept-alive connection, like wrk -c1
    async with aiohttp.ClientSession(connector=connector) as session:
        for i in range(warmup + n):
            status, first, total = await _one(session, url, headers)
            if i < warmup:
                continue
            statuses[str(status)] = statuses.get(str(status), 0) + 1
            if status != 200 or first is None:
                no_content += status == 200
                continue
            firsts.append(first)
            totals.append(total)
    return {
        "n": n,
        "ok": len(firsts),
        "statuses": statuses,
        "no_content": no_content,
        "ttft_us": _summary_us(firsts),
        "total_us": _summary_us(totals),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True, help="full chat completions URL")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    result = uvloop.run(measure(args.url, args.n, args.warmup))
    print(orjson.dumps(result).decode())


if __name__ == "__main__":
    main()
