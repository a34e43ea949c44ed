"""`python -m bench.interleaved BEFORE AFTER`: two source trees' gateways up at once, wrk
alternating between them round by round, so both meet the same machine; prints each
round's gateway CPU ms per request and the median ratio AFTER ÷ BEFORE.

On a shared machine, two bench runs minutes apart can differ by 30%; interleaving cancels
most of that. Each tree's `gateway` package is imported from that tree (PYTHONPATH) with
this venv's dependencies. Both gateways, with their redis-servers, share the gateway CPU.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.load import KINDS, Scenario, run_wrk
from bench.procs import Supervisor
from bench.targets import Target, start_abc, start_mock


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.interleaved", description=__doc__.split("\n\n")[0])
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--kind", choices=KINDS, default="chat")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--load-cpus", default="0")
    p.add_argument("--gateway-cpus", default="1")
    args = p.parse_args(argv)
    scenario = Scenario(args.kind, args.connections)
    work = Path(tempfile.mkdtemp(prefix="abc-interleaved-"))
    cpu: dict[str, list[float]] = {"before": [], "after": []}
    with Supervisor(work).running() as sup:
        mock, port = start_mock(sup, cpus=args.load_cpus, delay_ms=0.0)
        targets: dict[str, Target] = {}
        for label, tree in (("before", args.before), ("after", args.after)):
            (work / label).mkdir()
            targets[label] = start_abc(
                sup, name=label, mock=mock, mock_port=port, workers=1, gateway_cpus=args.gateway_cpus,
                redis_cpus=args.gateway_cpus, workdir=work / label,
                # -P: else `-m` puts the current directory (maybe another tree) first on sys.path.
                command_prefix=["env", f"PYTHONPATH={tree.resolve()}", sys.executable, "-P", "-m", "gateway"],
            )
        for target in targets.values():  # warm-up: lazy imports, caches, connections
            run_wrk(target, scenario, duration_s=2, load_cpus=args.load_cpus)
        for n in range(args.rounds):
            for label in ("before", "after") if n % 2 == 0 else ("after", "before"):
                result = run_wrk(targets[label], scenario, duration_s=args.seconds, load_cpus=args.load_cpus)
                if result["status"] != "ok":
                    sys.exit(f"{label}: {result.get('reason') or result['status']}")
                cpu[label].append(result["cpu_ms_per_req"]["gateway"])
    for label, figures in cpu.items():
        print(f"{label}: gateway CPU ms/req per round {[round(f, 3) for f in figures]}, median {statistics.median(figures):.3f}")
    ratios = [a / b for a, b in zip(cpu["after"], cpu["before"], strict=True)]
    print(
        f"{scenario.label}: after / before = {statistics.median(cpu['after']) / statistics.median(cpu['before']):.3f} "
        f"(medians); per-round median {statistics.median(ratios):.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
