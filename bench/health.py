"""Health fan-out: 500 endpoints on loopback, a tenth of them never answering.

    python bench/health.py [--endpoints 500] [--hung 0.1] [--timeout 1.0] [--sweeps 3]

A child process serves the endpoints (small asyncio HTTP servers on 127.0.0.1:
most answer 200 at once, the hung ones accept and never answer); this process
probes them all with `controller.effects.health.probe_all`, as `homelab health` does.
Printed: sweep time against the longest timeout (target ≤ 1.2×) and the CPU
time the prober spent per endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import resource
import statistics
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.effects.health import Endpoint, Status, probe_all


def raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(n_ok: int, n_hung: int, conn: Connection) -> None:
    raise_fd_limit()

    async def main() -> None:
        held: list[asyncio.StreamWriter] = []

        async def ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                writer.close()
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
            await writer.drain()
            writer.close()

        async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        ports = []
        for i in range(n_ok + n_hung):
            server = await asyncio.start_server(ok if i < n_ok else hung, "127.0.0.1", 0, backlog=16)
            ports.append(int(server.sockets[0].getsockname()[1]))
        conn.send(ports)
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # serve until the parent is done

    asyncio.run(main())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--endpoints", type=int, default=500)
    ap.add_argument("--hung", type=float, default=0.1)
    ap.add_argument("--timeout", type=float, default=1.0)
    ap.add_argument("--sweeps", type=int, default=3)
    args = ap.parse_args()
    raise_fd_limit()
    n_hung = int(args.endpoints * args.hung)
    n_ok = args.endpoints - n_hung
    parent, child = mp.Pipe()
    proc = mp.Process(target=serve, args=(n_ok, n_hung, child), daemon=True)
    proc.start()
    ports: list[int] = parent.recv()
    eps = [
        Endpoint(f"n{i}/ollama", "local", "ollama", f"http://127.0.0.1:{p}/api/tags", args.timeout, f"n{i}")
        for i, p in enumerate(ports)
    ]
    walls, cpus = [], []
    counts: dict[Status, int] = {}
    for _ in range(args.sweeps):
        w0, c0 = time.perf_counter(), time.process_time()
        probes = asyncio.run(probe_all(eps, slow_threshold=args.timeout))
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
        counts = {s: sum(1 for p in probes if p.status is s) for s in Status}
    parent.send("done")
    proc.join(timeout=10)
    wall = statistics.median(walls)
    cpu = statistics.median(cpus)
    print(f"{'endpoints':>9} {'hung':>5} {'timeout s':>9} {'sweep s':>8} {'ratio':>6} {'CPU ms/endpoint':>16}  up/down")
    print(
        f"{len(eps):>9} {n_hung:>5} {args.timeout:>9.2f} {wall:>8.3f} {wall / args.timeout:>6.2f}"
        f" {1000 * cpu / len(eps):>16.3f}  {counts[Status.UP] + counts[Status.SLOW]}/{counts[Status.DOWN]}"
    )
    print(f"target: sweep ≤ 1.2 × the longest timeout; {args.sweeps} sweeps, median shown")


if __name__ == "__main__":
    main()
