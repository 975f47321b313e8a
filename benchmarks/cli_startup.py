"""How long `removebg --help` takes, against a bare interpreter, each in a fresh process.

Run: PYTHONPATH=src .venv/bin/python benchmarks/cli_startup.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "removebg --help": [sys.executable, "-m", "removebg_provider", "--help"],
    "removebg run --help": [sys.executable, "-m", "removebg_provider", "run", "--help"],
}


def wall_seconds(command: list[str]) -> float:
    """Wall time of one run of `command`, output discarded."""
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15, help="runs per command (default %(default)s)")
    args = parser.parse_args()
    print(f"load average before: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| command | median s | min s | max s |")
    print("|---|---:|---:|---:|")
    for name, command in COMMANDS.items():
        wall_seconds(command)  # warm the page cache
        times = [wall_seconds(command) for _ in range(args.repeats)]
        print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
