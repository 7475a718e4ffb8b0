"""Run one call in a forked child, measuring its CPU time and peak memory, so that a hostile input
that hangs, loops or allocates without bound fails a test instead of the test run.

The child gets an address-space cap (`AS_LIMIT`) so that a runaway allocation ends in a MemoryError
there, not in the machine swapping; the parent kills it after `wall_limit` seconds (a hang: a FIFO
open waits without using CPU). What the call returned or raised comes back through a pipe.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

AS_LIMIT = 4 << 30
"""The child's address space: above the interpreter with numpy, pydantic and OR-Tools loaded (~1.5 GiB of
mappings), well below what would hurt the machine."""
CPU_LIMIT_S = 2.0
MEMORY_LIMIT_BYTES = 500 << 20


@dataclass(frozen=True)
class Outcome:
    kind: str
    """`ok` (returned), `error` (raised one of the expected exception types), `crash` (anything else:
    a traceback), `hang` (killed after the wall limit) or `died` (killed by a signal, e.g. out of memory)."""
    text: str
    """What the call returned (as text), the exception's message, or the traceback."""
    cpu_s: float
    """CPU time of the child, user + system, from its rusage."""
    max_rss: int
    """Peak resident memory of the child in bytes (ru_maxrss), the forked interpreter included."""
    baseline_rss: int
    """Resident memory of the parent when it forked: what the child starts with."""

    @property
    def growth(self) -> int:
        """Memory the call itself added over the interpreter it was forked from."""
        return max(0, self.max_rss - self.baseline_rss)


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_bounded(
    call: Callable[[], object],
    expected: tuple[type[BaseException], ...],
    *,
    wall_limit: float = 30.0,
) -> Outcome:
    """Run `call()` in a forked child; classify how it ended (see `Outcome`)."""
    read_fd, write_fd = os.pipe()
    baseline = _rss_now()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_fd)
        code = 0
        try:
            resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
            try:
                result = ("ok", str(call()))
            except expected as exc:
                result = ("error", str(exc))
            except BaseException:
                result = ("crash", traceback.format_exc())
            payload = json.dumps(result).encode()
            with os.fdopen(write_fd, "wb") as out:
                out.write(payload)
        except BaseException:
            code = 3
        os._exit(code)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + wall_limit
    hung = False
    with os.fdopen(read_fd, "rb") as pipe:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                hung = True
                os.kill(pid, signal.SIGKILL)
                break
            ready, _, _ = select.select([pipe], [], [], left)
            if ready:
                chunk = os.read(pipe.fileno(), 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
    _, status, usage = os.wait4(pid, 0)
    cpu = usage.ru_utime + usage.ru_stime
    rss = usage.ru_maxrss * 1024
    if hung:
        return Outcome("hang", f"killed after {wall_limit:g}s", cpu, rss, baseline)
    if not chunks:
        return Outcome("died", f"child ended with status {status} and no result", cpu, rss, baseline)
    kind, text = json.loads(b"".join(chunks))
    return Outcome(kind, text, cpu, rss, baseline)


def check_bounded(outcome: Outcome) -> None:
    """The limits of issue 23: at most 2 s (CPU) and 500 MB over the forked interpreter."""
    assert outcome.kind in ("ok", "error"), f"{outcome.kind}: {outcome.text}"
    assert outcome.cpu_s < CPU_LIMIT_S, f"took {outcome.cpu_s:.2f} s of CPU"
    assert outcome.growth < MEMORY_LIMIT_BYTES, f"grew by {outcome.growth >> 20} MiB"
