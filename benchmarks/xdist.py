"""The main job under pytest-xdist vs serially, as wall-time ratios measured in one run.

Runs ``pytest specs/`` (or ``--target``) in fresh subprocesses: serially, with ``-n N`` (xdist's default ``load``
distribution: items spread one by one) and with ``-n N --dist loadscope`` (a checkpoint's claims stay on one
worker, so each checkpoint is loaded once), interleaved over ``--repeats`` rounds; reports the median wall time
of each mode and its ratio to serial. Target: ``-n 2`` no slower than serial on 2 cores (issue 13, item 7).
The result cache is off (``--circuit-cache`` is opt-in) and pytest's cache provider is disabled, so every run
evaluates everything. Wall time is what a CI job waits for; run it on an otherwise idle machine.

    python benchmarks/xdist.py [--workers 2] [--repeats 1] [--target specs/]

Prints one line per run and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str]) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=ROOT,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return time.perf_counter() - t, r.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--target", default="specs/")
    args = ap.parse_args()
    if args.workers < 1 or args.repeats < 1:
        ap.error("--workers and --repeats must be positive")
    n = str(args.workers)
    modes = {"serial": [], f"n{n}": ["-n", n], f"n{n}_loadscope": ["-n", n, "--dist", "loadscope"]}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(args.repeats):
        for mode, extra in modes.items():
            wall, rc = timed([args.target, *extra])
            if rc not in (0, 1, 5):  # 1: a claim failed (still timed); anything else: the run itself broke
                sys.exit(f"pytest {args.target} {' '.join(extra)} exited {rc}")
            times[mode].append(wall)
            print(f"round {i + 1} {mode:14s} {wall:7.1f} s wall (exit {rc})", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    out = {"benchmark": "xdist", "target": args.target, "workers": args.workers, "repeats": args.repeats,
           "median_wall_s": {m: round(v, 1) for m, v in med.items()},
           "ratio_over_serial": {m: round(v / med["serial"], 3) for m, v in med.items() if m != "serial"}}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
