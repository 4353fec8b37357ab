"""TCP settings for the SSH connection that carries a control stream.

Used by the control stream itself (engine/control_stream.py) and by the process that shares
one SSH connection between commands (transport/master.py), which writes on its behalf.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator
from typing import Any

CONTROL_TCP_CONGESTION = b"bbr"


def tcp_socket(writer: Any) -> Any:
    """The TCP socket under an SSH channel's writer (asyncio's TransportSocket); None for
    any other stream."""
    try:
        sock = writer.get_extra_info("connection").get_extra_info("socket")
    except AttributeError:
        return None
    return sock if hasattr(sock, "setsockopt") else None


@contextlib.contextmanager
def corked(sock: Any) -> Iterator[None]:
    """Hold back partial TCP segments while one batch is written.

    asyncssh puts an empty SSH_MSG_IGNORE before every packet and writes each to the socket
    on its own; with TCP_NODELAY every batch then left as two segments, the first 36 bytes
    long: ~12,000 extra segments (about 1 MB with headers) on the data's path for 10,000
    small files. Corked, the kernel sends them together, without waiting for anything.
    """
    cork = getattr(socket, "TCP_CORK", None)
    if sock is None or cork is None:
        yield
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, cork, 1)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, cork, 0)


def prefer_loss_tolerant_tcp(sock: Any) -> None:
    """Ask for BBR on the control connection's TCP socket (each end sets its own sending side).

    The per-file messages of a many-files session ride this connection. With a loss-based
    congestion control (cubic, reno), 1 % loss at 100 ms RTT caps it near 1.4 Mbit/s
    (Mathis), and a few MB of announcements then take longer than the data itself. BBR keeps
    it near the path's rate, as the UDP data path is. Best effort: where the kernel lacks it,
    the system default stays.
    """
    if sock is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, CONTROL_TCP_CONGESTION)
