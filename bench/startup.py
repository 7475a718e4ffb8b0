"""CLI start-up: how long the light commands take, against the interpreter's own start-up.

    python bench/startup.py [--repeat 11]

Runs each command in a fresh interpreter `--repeat` times, interleaved (so that load on the machine hits them
alike), as the console script does (`controller.cli:main`, this checkout's code), and prints the median wall
time of each, absolute and as a ratio to `python -c pass`. Targets on an idle 2-core machine: `--version`
≤ 0.3 s, `validate` ≤ 0.6 s; on a busy machine compare the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SPEC = "examples/homelab.yaml"
MAIN = "import sys; sys.argv[0] = 'homelab'; from controller.cli import main; main()"

CASES: list[tuple[str, list[str]]] = [
    ("python -c pass", ["-c", "pass"]),
    ("homelab --version", ["-c", MAIN, "--version"]),
    ("homelab --help", ["-c", MAIN, "--help"]),
    (f"homelab validate -f {SPEC}", ["-c", MAIN, "validate", "-f", SPEC]),
    ("homelab schema", ["-c", MAIN, "schema"]),
]


def once(args: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, check=False)
    took = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{args}: exit {done.returncode}: {done.stderr.decode(errors='replace').strip()}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=11, help="runs of each command (default 11)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name, _ in CASES}
    for _ in range(max(1, args.repeat)):
        for name, argv in CASES:
            times[name].append(once(argv))
    base = statistics.median(times[CASES[0][0]])
    width = max(len(name) for name, _ in CASES)
    print(f"{'command':<{width}}  {'median s':>8}  {'× python -c pass':>16}   (median of {args.repeat} runs)")
    for name, _ in CASES:
        median = statistics.median(times[name])
        print(f"{name:<{width}}  {median:8.3f}  {median / base:16.1f}")


if __name__ == "__main__":
    main()
