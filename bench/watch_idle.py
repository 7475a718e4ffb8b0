"""Idle cost of `homelab watch`: CPU a watch with nothing to do uses (target: well under 1% of a core).

    python bench/watch_idle.py [--seconds 20] [--warmup 5] [--interval 60s] [--metrics]

Starts a real `python -m controller watch` on a one-node spec whose Docker engine
does not exist (the start-up reconcile finds nothing to do quickly), lets it
settle for `--warmup` seconds, then reads the process's CPU time (user + system,
every thread: /proc/PID/stat) over `--seconds`. Printed: CPU seconds and the
percentage of one core. The file watcher (watchfiles), the asyncio loop asleep
until the next interval and, with `--metrics`, the /metrics server thread are
what runs while idle.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

SPEC = """\
cluster: {name: idle}
nodes:
  - name: box
    tier: cpu
    address: 127.0.0.1
    docker: {endpoint: "unix:///nonexistent/docker.sock"}
    ram: 8GiB
    llamacpp: {image: "llama:none", ports: 3000-3009}
models:
  - name: tiny
    runtime: llamacpp
    source: {gguf: /nonexistent/tiny.gguf}
    placement: {cpu_only: true}
    memory: {vram: 1GiB, layers: 12}
recovery: {enabled: false}
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--interval", default="60s")
    ap.add_argument("--metrics", action="store_true", help="also serve /metrics (on a free port)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "cluster.yaml"
        spec.write_text(SPEC)
        cmd = [sys.executable, "-m", "controller", "watch", "-f", str(spec), "--interval", args.interval]
        cmd += ["--state-dir", str(Path(tmp) / "state")]
        if args.metrics:
            cmd += ["--metrics-port", "0"]
        log = (Path(tmp) / "watch.log").open("w")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            time.sleep(args.warmup)
            if proc.poll() is not None:
                sys.exit(f"the watch exited: {(Path(tmp) / 'watch.log').read_text()}")
            start_cpu, start = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(args.seconds)
            used, wall = cpu_seconds(proc.pid) - start_cpu, time.monotonic() - start
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=30)
            log.close()
    print("| what | wall s | CPU s | % of one core | exit |")
    print("|---|---|---|---|---|")
    what = "idle watch" + (" + /metrics" if args.metrics else "") + f", interval {args.interval}"
    print(f"| {what} | {wall:.1f} | {used:.3f} | {100 * used / wall:.2f}% | {code} |")


if __name__ == "__main__":
    main()
