"""Free TCP ports on loopback, picked at run time (other work may share this machine)."""

from __future__ import annotations

import socket


def free_port(address: str = "127.0.0.1") -> int:
    """A port nothing listens on at `address` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def ports_free(address: str, base: int, n: int = 1) -> bool:
    """Nothing listens on any of the `n` ports from `base` at `address` right now."""
    socks: list[socket.socket] = []
    try:
        for port in range(base, base + n):
            s = socket.socket()
            socks.append(s)
            s.bind((address, port))
        return True
    except OSError:
        return False
    finally:
        for s in socks:
            s.close()


def free_port_range(n: int, address: str = "127.0.0.1", start: int = 21000) -> int:
    """The first port of `n` consecutive ports that are all free at `address`."""
    for base in range(start, 60000, 97):
        if ports_free(address, base, n):
            return base
    raise RuntimeError(f"no {n} consecutive free ports on {address}")
