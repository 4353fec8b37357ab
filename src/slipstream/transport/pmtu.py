"""Path MTU: the route MTU toward a peer, and "do not fragment" on the data sockets.

Each end reads the MTU of its route toward the other (a connected UDP socket never sends
anything; ``IP_MTU`` / ``IPV6_MTU`` reports the route's MTU, including a path MTU the kernel
learnt from ICMP). The client sends its value in OPEN; the server picks the smaller of the
two (at most 9000) when the spec names no ``dgram_size``, and the padded handshake checks
that the chosen size really passes (docs/protocol.md §2).

Data sockets set ``IP_PMTUDISC_DO``: nothing is fragmented, so a too-big datagram fails at
``sendto`` with EMSGSIZE instead of being cut into fragments that a lossy path multiplies.
If the route's MTU shrinks mid-transfer (the kernel learns it from an ICMP "fragmentation
needed"), DatagramSocket then falls back to letting the kernel fragment
(:func:`allow_fragmentation`), so the transfer slows down instead of black-holing.
"""

from __future__ import annotations

import contextlib
import socket

# Linux values; Python 3.11's socket module lacks some of them.
IP_MTU_DISCOVER = 10
IP_MTU = 14
IPV6_MTU_DISCOVER = 23
IPV6_MTU = 24
IP_PMTUDISC_WANT = 1  # the kernel default: DF while the packet fits the known PMTU
IP_PMTUDISC_DO = 2  # always DF, never fragment locally: EMSGSIZE instead


def route_mtu(peer_ip: str) -> int | None:
    """The MTU of this host's route toward ``peer_ip`` (None if the OS will not say)."""
    family = socket.AF_INET6 if ":" in peer_ip else socket.AF_INET
    host = peer_ip.split("%")[0] if family == socket.AF_INET else peer_ip
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect((host, 9))  # UDP connect: a route lookup, nothing is sent
            if family == socket.AF_INET6:
                return int(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_MTU))
            return int(sock.getsockopt(socket.IPPROTO_IP, IP_MTU))
    except OSError:
        return None


def forbid_fragmentation(sock: socket.socket) -> bool:
    """Set DF on every datagram (``IP_PMTUDISC_DO``); False where unsupported."""
    return _set_discover(sock, IP_PMTUDISC_DO)


def allow_fragmentation(sock: socket.socket) -> bool:
    """Back to the kernel default: fragment datagrams bigger than the known path MTU."""
    return _set_discover(sock, IP_PMTUDISC_WANT)


def _set_discover(sock: socket.socket, mode: int) -> bool:
    done = False
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, mode)
        done = True
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, mode)
            done = True
    return done
