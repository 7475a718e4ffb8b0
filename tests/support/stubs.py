"""Tiny servers on 127.0.0.1 for probe tests: answer with a status, answer late, or never answer.

Each runs in one background asyncio loop; `StubServers.close()` stops them all.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class Behaviour:
    status: int = 200
    delay: float = 0.0
    hang: bool = False
    """Accept the connection and never answer."""
    banner: bytes | None = None
    """Send this line at once (an SSH server's greeting) instead of speaking HTTP."""


class StubServers:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.base_events.Server] = []
        self._hung: list[asyncio.StreamWriter] = []

    def start(self, behaviour: Behaviour) -> int:
        """Serve `behaviour` on a new port; return the port."""
        fut = asyncio.run_coroutine_threadsafe(self._start(behaviour), self.loop)
        return fut.result(timeout=10)

    async def _start(self, b: Behaviour) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if b.banner is not None:
                writer.write(b.banner + b"\r\n")
                await writer.drain()
                await asyncio.sleep(0.05)
                writer.close()
                return
            try:
                await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                writer.close()
                return
            if b.hang:
                self._hung.append(writer)
                return
            if b.delay:
                await asyncio.sleep(b.delay)
            body = b'{"status":"ok"}'
            head = f"HTTP/1.1 {b.status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        self.servers.append(server)
        return int(server.sockets[0].getsockname()[1])

    def close(self) -> None:
        async def stop() -> None:
            for w in self._hung:
                w.close()
            for s in self.servers:
                s.close()
                await s.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)
        self.loop.close()
