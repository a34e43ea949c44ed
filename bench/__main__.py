"""`python -m bench`: the gateway vs the mock directly (vs LiteLLM), side by side, one run.

See bench/README.md for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from bench.report import finish
from bench.run import Options, run

TARGETS = ("direct", "abc", "litellm")
APT_PACKAGES = {"wrk": "wrk", "redis-server": "redis-server", "taskset": "util-linux"}


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError("values must be positive")
    return values


def _csv_targets(text: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"targets are {', '.join(TARGETS)}; got {text!r}")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--targets",
        type=_csv_targets,
        default=("direct", "abc"),
        help="comma-separated: direct, abc, litellm (default: direct,abc)",
    )
    p.add_argument(
        "--with-litellm",
        action="store_true",
        help="add LiteLLM's proxy (installed into bench/.litellm-venv)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 s scenarios, a 2k/20k leak check, 100 TTFT requests",
    )
    p.add_argument("--duration", type=int, help="seconds per scenario (default 10, quick 3)")
    p.add_argument("--connections", type=int, default=32, help="the loaded level (default 32)")
    p.add_argument("--skip-leak", action="store_true", help="skip the 10k vs 100k RSS check")
    p.add_argument(
        "--leak-requests",
        type=_csv_ints,
        help="the two leak-check milestones (default 10000,100000; quick 2000,20000)",
    )
    p.add_argument(
        "--workers",
        type=_csv_ints,
        default=(1, 2),
        help="gateway worker counts for the scale-out run (default 1,2)",
    )
    p.add_argument("--ttft-requests", type=int, help="sequential TTFT requests (default 200)")
    p.add_argument(
        "--mock-delay-ms",
        type=float,
        default=0.0,
        help="the mock upstream waits this long before answering",
    )
    p.add_argument("--load-cpus", default="0", help="CPUs for mock, wrk, TTFT client (taskset)")
    p.add_argument("--gateway-cpus", default="1", help="CPUs for the gateway and redis-server")
    p.add_argument(
        "--profile",
        choices=("py-spy", "cprofile"),
        help="profile ABC: py-spy during the loaded chat scenario, or cProfile "
        "over the whole ABC run (its figures are then not representative)",
    )
    p.add_argument(
        "--tree",
        type=Path,
        help="run ABC's code from this source tree (e.g. a checkout from before a change), "
        "with this venv's dependencies",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("bench/results/latest.json"),
        help="JSON results; the markdown goes next to it (.md)",
    )
    return p.parse_args(argv)


def _ensure_tools(need_redis: bool) -> None:
    """wrk and redis-server come from apt when missing and we may install (root)."""
    tools = ["wrk", "taskset"] + (["redis-server"] if need_redis else [])
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    packages = sorted({APT_PACKAGES[t] for t in missing})
    if os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"installing {' '.join(packages)} with apt-get", flush=True)
        subprocess.run(["apt-get", "install", "-y", *packages], check=False)
    still = [t for t in missing if shutil.which(t) is None]
    if still:
        sys.exit(f"missing tools: {', '.join(still)} (apt-get install {' '.join(packages)})")


def options(args: argparse.Namespace, argv: list[str]) -> Options:
    targets = list(args.targets)
    if args.with_litellm and "litellm" not in targets:
        targets.append("litellm")
    if "direct" not in targets:
        # Every overhead and ratio is against direct; without it the report has no baseline.
        print("note: adding the direct target, the baseline of every comparison")
        targets.insert(0, "direct")
    load_cpus, gateway_cpus = args.load_cpus, args.gateway_cpus
    if (os.cpu_count() or 1) < 2:
        load_cpus = gateway_cpus = None
    return Options(
        targets=tuple(targets),
        duration=args.duration or (3 if args.quick else 10),
        connections=args.connections,
        warmup_s=1 if args.quick else 2,
        skip_leak=args.skip_leak,
        leak_requests=_two(
            args.leak_requests or ((2000, 20000) if args.quick else (10000, 100000))
        ),
        workers=args.workers,
        ttft_requests=args.ttft_requests or (100 if args.quick else 200),
        mock_delay_ms=args.mock_delay_ms,
        load_cpus=load_cpus,
        gateway_cpus=gateway_cpus,
        command=shlex.join(["python", "-m", "bench", *argv]),
        profile=args.profile,
        profile_dir=args.out.parent,
        tree=args.tree,
    )


def _cpu_set(spec: str) -> set[int]:
    """taskset's list syntax: "0", "0,2", "0-3"."""
    cpus: set[int] = set()
    for part in spec.split(","):
        low, _, high = part.partition("-")
        cpus.update(range(int(low), int(high or low) + 1))
    return cpus


def _two(values: tuple[int, ...]) -> tuple[int, int]:
    if len(values) != 2 or values[0] >= values[1]:
        sys.exit("--leak-requests takes two increasing counts, e.g. 10000,100000")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    opts = options(args, argv)
    _ensure_tools(need_redis="abc" in opts.targets)
    if opts.load_cpus:
        # The harness itself stays off the gateway's CPU too.
        os.sched_setaffinity(0, _cpu_set(opts.load_cpus))
    results = run(opts)
    out = args.out
    text = finish(results, out)
    print("\n" + text)
    print(f"written: {out} and {out.with_suffix('.md')}")
    if results["problems"]:
        print("\n!! ERRORS (figures marked ERR are not valid):")
        for problem in results["problems"]:
            print(f"!!  {problem}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
