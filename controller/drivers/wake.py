"""Wake a sleeping node: a Wake-on-LAN magic packet, or the node's configured wake command.

The magic packet is six 0xFF bytes and the node's MAC sixteen times, sent as
one UDP datagram to `wake.wol.broadcast:wake.wol.port` (default
255.255.255.255:9). `SO_BROADCAST` is set only when the target is a broadcast
address (255.255.255.255, or an address ending in .255 such as 192.168.1.255);
a unicast target — 127.0.0.1 in tests — is sent to as is.

A wake command (an IPMI call, a smart plug's HTTP API, an RDP session) runs on
this machine with `sh -c`, like any command of `drivers.ssh.LocalShell`.
"""

from __future__ import annotations

import ipaddress
import socket

from controller.drivers.base import DriverError
from controller.drivers.ssh import CommandResult, LocalShell

WAKE_COMMAND_TIMEOUT_S = 60.0


def mac_bytes(mac: str) -> bytes:
    digits = mac.replace(":", "").replace("-", "")
    if len(digits) != 12:
        raise DriverError(f"wake-on-lan: {mac!r} is not a MAC address")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise DriverError(f"wake-on-lan: {mac!r} is not a MAC address") from None


def magic_packet(mac: str) -> bytes:
    """6 × 0xFF, then the MAC 16 times (102 bytes)."""
    return b"\xff" * 6 + mac_bytes(mac) * 16


def is_broadcast(address: str) -> bool:
    ip = ipaddress.IPv4Address(address)
    return ip == ipaddress.IPv4Address("255.255.255.255") or (ip.packed[-1] == 255 and not ip.is_loopback)


def send_magic_packet(mac: str, address: str, port: int) -> None:
    """Send one magic packet for `mac` to `address:port`. Raises DriverError."""
    packet = magic_packet(mac)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            if is_broadcast(address):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            sock.sendto(packet, (address, port))
    except OSError as exc:
        raise DriverError(f"wake-on-lan to {address}:{port}: {exc.strerror or type(exc).__name__}") from None


async def run_wake_command(
    node: str, command: str, timeout: float = WAKE_COMMAND_TIMEOUT_S, stdin: bytes | None = None
) -> CommandResult:
    """Run the node's wake command here (`sh -c`), `stdin` (a secret) on its standard input; a non-zero exit
    is a result, a timeout a CommandFailed."""
    return await LocalShell(node).run(command, stdin=stdin, timeout=timeout)
