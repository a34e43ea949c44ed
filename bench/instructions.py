"""`python -m bench.instructions`: the gateway's user-space instructions per request, under
callgrind. A count, not a time: the same code gives the same figure within about 1% on a
busy machine, where CPU-time figures move by 30%. Use it to compare two trees (before and
after a change) when the machine is shared; quote the timed bench for what users feel.

    python -m bench.instructions                       # this tree, chat, 200 requests
    python -m bench.instructions ../before . --kind stream

Each tree's `gateway` package is imported from that tree (PYTHONPATH) with this venv's
dependencies. Requests are sequential (one connection) after a warm-up; instrumentation is
switched on only around them (`callgrind_control -i on/off`), so start-up is not counted.
Kernel work (socket syscalls) is outside the count.
"""

from __future__ import annotations

import argparse
import http.client
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.load import body
from bench.procs import Supervisor
from bench.targets import Target, start_abc, start_mock

PATHS = {"chat": "/v1/chat/completions", "stream": "/v1/chat/completions", "embeddings": "/v1/embeddings"}
WARM_UP = 60


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.split("\n\n")[0])
    p.add_argument("trees", nargs="*", type=Path, default=[Path(".")], help="source trees to compare (default: .)")
    p.add_argument("--kind", choices=sorted(PATHS), default="chat")
    p.add_argument("--requests", type=int, default=200)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind (apt-get install valgrind)")
    figures = {}
    for tree in args.trees:
        figures[tree] = per_request(tree.resolve(), args.kind, args.requests)
        print(f"{tree}: {figures[tree] / 1e6:.3f} M instructions per {args.kind} request", flush=True)
    if len(figures) > 1:
        first = figures[args.trees[0]]
        for tree in args.trees[1:]:
            print(f"{tree} / {args.trees[0]}: {figures[tree] / first:.3f}")
    return 0


def per_request(tree: Path, kind: str, requests: int) -> float:
    work = Path(tempfile.mkdtemp(prefix="abc-instructions-"))
    out = work / "callgrind.out"
    valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
    with Supervisor(work).running() as sup:
        mock, port = start_mock(sup, cpus=None, delay_ms=0.0)
        target = start_abc(
            sup, name="abc", mock=mock, mock_port=port, workers=1, gateway_cpus=None, redis_cpus=None,
            # -P: without it `-m` puts the current directory first on sys.path, and a bench run
            # from inside a tree would measure that tree's `gateway` for every tree.
            workdir=work, command_prefix=["env", f"PYTHONPATH={tree}", *valgrind, sys.executable, "-P", "-m", "gateway"],
            redis_timeout_ms=30_000,  # valgrind is slow: a missed Redis deadline is a 503, not a figure
        )
        assert target.gateway is not None
        send = _sender(target, kind)
        send(WARM_UP)
        pid = str(target.gateway.pid)  # env execs valgrind, which runs python in the same process
        subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
        send(requests)
        subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
        for child in target.own:
            sup.stop(child)
    time.sleep(0.5)
    return _total(work) / requests


def _sender(target: Target, kind: str):  # type: ignore[no-untyped-def]
    host, _, rest = target.base_url.removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(rest.split("/")[0]), timeout=120)
    headers = {"Content-Type": "application/json", "Authorization": target.authorization or ""}
    data = body(kind)

    def send(n: int) -> None:
        for _ in range(n):
            conn.request("POST", PATHS[kind], body=data, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"the gateway answered {response.status}")

    return send


def _total(work: Path) -> int:
    """The largest `summary:`/`totals:` of the dumps: the instrumented requests' count."""
    total = 0
    for dump in work.glob("callgrind.out*"):
        for line in dump.read_text(errors="replace").splitlines():
            if line.startswith(("summary:", "totals:")):
                total = max(total, int(line.split()[1]))
    return total


if __name__ == "__main__":
    sys.exit(main())
