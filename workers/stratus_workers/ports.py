"""Free TCP ports for processes this one starts, chosen where no other socket on the host can take them first."""

from __future__ import annotations

import random
import socket
from pathlib import Path

# Why not bind port 0 and hand the kernel's choice on: that port comes from the ephemeral range, and between
# closing the probe and the child's bind (seconds: a model loads, a process group forms) any outgoing
# connection on the host (gloo's pairs, a gRPC client) can be given the same port, and the child fails with
# "Address already in use". Ports below the ephemeral range are only ever taken by an explicit bind.
_EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 20000
_handed_out: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically assigned ports (Linux's default where it cannot be read)."""
    try:
        low, high = (int(part) for part in _EPHEMERAL_RANGE.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def _bindable(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nobody listens on now, outside the ephemeral range and not handed out before by this process."""
    low, high = ephemeral_range()
    # Below the ephemeral range where there is room, else above it; the kernel's own choice only as a last resort.
    lo, hi = (_LOWEST, low - 1) if low - 1 - _LOWEST >= 1000 else (high + 1, 65535)
    rng = random.SystemRandom()  # two processes seeded alike (pytest's random seeding) must not pick alike
    for _ in range(200 if lo <= hi else 0):
        port = rng.randint(lo, hi)
        if port not in _handed_out and _bindable(host, port):
            _handed_out.add(port)
            return port
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])
