"""A fast non-blocking UDP socket for asyncio: batched sends with GSO, batched reads with GRO.

Independent of the Slipstream protocol: it moves opaque datagrams and nothing else.

Why not ``loop.create_datagram_endpoint``: asyncio's ``DatagramProtocol`` reads every datagram
into a fresh 256 KiB buffer and tops out near 30k datagrams/s here. This module reads the socket
itself (``loop.add_reader`` + a drain loop into one preallocated arena), sends runs of equal-size
datagrams as one ``sendmsg`` with the ``UDP_SEGMENT`` cmsg (GSO, Linux >= 4.18), and lets the
kernel coalesce received runs (``UDP_GRO``, Linux >= 5.0). See research/performance.md §4.

ICMP errors: the socket is unconnected (one server port talks to many peers), and Linux only
reports ICMP errors on unconnected UDP sockets when ``IP_RECVERR`` is set. We set it, so a
"port unreachable" shows up as ``ConnectionRefusedError`` on the next send or receive and as an
entry in the socket's error queue. Both are absorbed here: ``icmp_errors`` counts them and
``last_icmp_error`` says which destination refused, so the caller can report a blocked port.
The error queue must be drained, or epoll keeps reporting EPOLLERR and the reader callback
would spin.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from slipstream.transport.pmtu import allow_fragmentation, forbid_fragmentation

__all__ = ["DatagramSocket", "IcmpError", "Address"]

Address = tuple[str, int]
Datagrams = Sequence[bytes | memoryview]
SockAddr = tuple[object, ...]  # what getaddrinfo resolved: 2-tuple (IPv4) or 4-tuple (IPv6)
Received = list[tuple[memoryview | bytes, Address]]

# Linux constants; Python 3.11's socket module lacks most of them.
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104
SO_SNDBUFFORCE = 32
SO_RCVBUFFORCE = 33
IP_RECVERR = 11
IPV6_RECVERR = 25
MSG_ERRQUEUE = 0x2000
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3

GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS: 64 for years (newer kernels allow more)
GSO_MAX_BYTES = 65507  # largest IPv4 UDP payload; a super-datagram must fit in one IP packet
MAX_DATAGRAM = 65536  # room reserved per read: no datagram (or GRO train) is ever truncated
ARENA_BYTES = 1024 * 1024 + MAX_DATAGRAM  # ~700 x 1472 B per batch before a batch stops early

DEFAULT_RCVBUF = 16 * 1024 * 1024  # absorbs ~25 ms at 5 Gbit/s of receiver stalls (GC, core)
DEFAULT_SNDBUF = 4 * 1024 * 1024
NOBUFS_BACKOFF = 0.001  # seconds to wait after ENOBUFS, when writability tells us nothing

_EXT_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err
_GRO_SEG = struct.Struct("=i")  # the UDP_GRO cmsg carries the segment size as a C int
_ANC_BUFSIZE = socket.CMSG_SPACE(_GRO_SEG.size)
_ERRQ_ANC_BUFSIZE = socket.CMSG_SPACE(512)
# Send failures that mean "the kernel is full right now": stop the batch, the caller retries.
_BACKPRESSURE = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS})
# Errors that mean "this datagram will not leave": a local firewall rule (EPERM), no route.
# To the protocol they are losses like any other; raising them would kill the event loop's
# callback and leave the session hanging instead of timing out with a clear message.
_DROPPED = frozenset(
    {errno.EPERM, errno.EACCES, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN}
)


@dataclass(frozen=True, slots=True)
class IcmpError:
    """One ICMP error from the socket's error queue, e.g. port unreachable (ECONNREFUSED)."""

    errno: int
    destination: Address | None  # where the datagram that provoked it was going
    icmp_type: int
    icmp_code: int


class DatagramSocket:
    """A non-blocking UDP socket with batched, GSO/GRO-accelerated I/O. Not thread-safe.

    Build one with :meth:`bind`. Received datagrams are ``memoryview`` slices of one arena that
    is reused by every :meth:`recv_batch` call: they are valid only until the next call. Copy
    (``bytes(view)``) anything you keep longer.
    """

    def __init__(self, sock: socket.socket, *, gso: bool = True, gro: bool = True) -> None:
        self._sock = sock
        self._fd = sock.fileno()
        self._v6 = sock.family == socket.AF_INET6
        self.gso_supported = gso and _probe_gso(sock)
        self.gro_enabled = gro and _enable_gro(sock)
        self.icmp_errors = 0
        self.send_drops = 0  # datagrams the local stack refused to send (firewall, no route)
        self.last_send_error: OSError | None = None
        self.last_icmp_error: IcmpError | None = None
        self._arena = bytearray(ARENA_BYTES)
        self._view = memoryview(self._arena)
        self._offset = 0
        self._dest_cache: dict[Address, SockAddr] = {}
        self._cmsg_cache: dict[int, list[tuple[int, int, bytes]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = False
        self._writable: asyncio.Future[None] | None = None
        self._device_full = False
        self._gso_max_segment = GSO_MAX_BYTES // 2  # bigger segments could never pair up
        self.fragmenting = False  # True once EMSGSIZE made us let the kernel fragment
        self.closed = False

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def bind(
        cls,
        host: str,
        port: int,
        *,
        reuse_port: bool = False,
        gso: bool = True,
        gro: bool = True,
        rcvbuf: int = DEFAULT_RCVBUF,
        sndbuf: int = DEFAULT_SNDBUF,
        dont_fragment: bool = True,
    ) -> DatagramSocket:
        """Bind a UDP socket; the family (IPv4/IPv6) follows ``host``.

        ``gso=False`` / ``gro=False`` force the plain paths (tests, benchmarks, or a NIC path
        that misbehaves).
        """
        family, sockaddr = _resolve_bind(host, port)
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            _set_buffer(sock, socket.SO_RCVBUF, SO_RCVBUFFORCE, rcvbuf)
            _set_buffer(sock, socket.SO_SNDBUF, SO_SNDBUFFORCE, sndbuf)
            _enable_recverr(sock)
            if dont_fragment:
                # Path MTU discipline (transport/pmtu.py): never fragment; a datagram that
                # no longer fits fails with EMSGSIZE and _send_failed falls back.
                forbid_fragmentation(sock)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        return cls(sock, gso=gso, gro=gro)

    @property
    def local_address(self) -> Address:
        addr = self._sock.getsockname()
        return (addr[0], addr[1])

    @property
    def rcvbuf(self) -> int:
        """The receive buffer the kernel granted (it reports double the requested size)."""
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    @property
    def sndbuf(self) -> int:
        return int(self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))

    def fileno(self) -> int:
        return self._fd

    # -- sending ------------------------------------------------------------------------------

    def send_batch(self, datagrams: Datagrams, addr: Address) -> int:
        """Send ``datagrams`` to ``addr`` in order; return how many the kernel accepted.

        Stops early, without raising, when the kernel is full (EAGAIN/ENOBUFS): send the rest
        later, e.g. after :meth:`wait_writable`. The buffers may be reused as soon as this
        returns: the kernel has copied them.
        """
        dest = self._dest(addr)
        if self.gso_supported:
            return self._send_gso(datagrams, dest)
        return self._send_plain(datagrams, 0, len(datagrams), dest)

    def _send_plain(self, datagrams: Datagrams, start: int, stop: int, dest: SockAddr) -> int:
        sendto = self._sock.sendto
        i = start
        while i < stop:
            try:
                sendto(datagrams[i], dest)
            except OSError as exc:
                if exc.errno in _DROPPED:
                    self._note_dropped(exc)
                    i += 1
                    continue
                if self._send_failed(exc):
                    continue  # an earlier datagram's ICMP error surfaced here: this one is unsent
                return i
            i += 1
        return i

    def _send_gso(self, datagrams: Datagrams, dest: SockAddr) -> int:
        n = len(datagrams)
        i = 0
        while i < n:
            if not self.gso_supported:  # switched off by a failure below
                return self._send_plain(datagrams, i, n, dest)
            end, segment = _next_run(datagrams, i, n, self._gso_max_segment)
            reached = self._send_run(datagrams, i, end, segment, dest)
            if reached < end:
                return reached
            i = end
        return i

    def _send_run(
        self, datagrams: Datagrams, start: int, end: int, segment: int, dest: SockAddr
    ) -> int:
        """Send one run as one GSO super-datagram; return the index reached."""
        if end - start == 1:
            return self._send_plain(datagrams, start, end, dest)
        while True:
            try:
                self._sock.sendmsg(datagrams[start:end], self._segment_cmsg(segment), 0, dest)
                return end
            except OSError as exc:
                if exc.errno in _DROPPED:
                    self._note_dropped(exc)
                    return end
                if exc.errno in (errno.EIO, errno.EINVAL):
                    # No checksum offload, a route through xfrm, or a kernel that lied about
                    # support: GSO will not work on this socket. sendto will.
                    self.gso_supported = False
                    return self._send_plain(datagrams, start, end, dest)
                if exc.errno == errno.EMSGSIZE:
                    # Segment plus headers exceed the route MTU: GSO cannot cut it (plain
                    # sendto may still fragment it). Keep GSO for smaller segments only.
                    self._gso_max_segment = segment - 1
                    return self._send_plain(datagrams, start, end, dest)
                if not self._send_failed(exc):
                    return start

    def _note_dropped(self, exc: OSError) -> None:
        self.send_drops += 1
        self.last_send_error = exc

    def _send_failed(self, exc: OSError) -> bool:
        """Classify a send error: True = retry the datagram, False = stop the batch."""
        if exc.errno == errno.EMSGSIZE and not self.fragmenting:
            # The route's MTU shrank below our datagrams mid-session (an ICMP "fragmentation
            # needed" taught the kernel): fragmenting is slower, black-holing is worse.
            self.fragmenting = allow_fragmentation(self._sock)
            return self.fragmenting
        if exc.errno in _BACKPRESSURE:
            # ENOBUFS is the device/qdisc queue, not our send buffer (reported because
            # IP_RECVERR is on): the socket still polls writable, see wait_writable.
            self._device_full = exc.errno == errno.ENOBUFS
            return False
        # With IP_RECVERR a pending ICMP error fails the next send (which then sent nothing).
        if self._absorb_icmp(exc):
            return True
        raise exc

    def _absorb_icmp(self, exc: OSError) -> bool:
        """True if ``exc`` was a reported ICMP error (now counted), False if it is real."""
        if self._drain_error_queue():
            return True
        if isinstance(exc, ConnectionRefusedError):
            self.icmp_errors += 1  # no queue entry to read it from, but still a refusal
            return True
        return False

    def _segment_cmsg(self, segment: int) -> list[tuple[int, int, bytes]]:
        cmsg = self._cmsg_cache.get(segment)
        if cmsg is None:
            cmsg = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", segment))]
            self._cmsg_cache[segment] = cmsg
        return cmsg

    def _dest(self, addr: Address) -> SockAddr:
        """Resolve once per peer: numeric sockaddrs skip the resolver inside sendto.

        It also maps IPv4 peers to ``::ffff:a.b.c.d`` on an IPv6 socket and keeps the scope id
        of link-local IPv6 peers.
        """
        dest = self._dest_cache.get(addr)
        if dest is None:
            if len(self._dest_cache) >= 256:
                self._dest_cache.clear()  # a server with many peers: bounded, rebuilt on demand
            flags = socket.AI_V4MAPPED if self._v6 else 0
            info = socket.getaddrinfo(
                addr[0], addr[1], self._sock.family, socket.SOCK_DGRAM, 0, flags
            )
            dest = tuple(info[0][4])
            self._dest_cache[addr] = dest
        return dest

    # -- receiving ----------------------------------------------------------------------------

    def recv_batch(self, max_datagrams: int = 256) -> Received:
        """Read queued datagrams until the socket is empty or ``max_datagrams`` are read.

        The views are valid only until the next call (they share one reused arena). With GRO
        one read may bring up to 64 segments, so the result may exceed ``max_datagrams`` by up
        to 63. A batch also ends early once the arena is full; the reader callback fires again.
        """
        out: Received = []
        if self.closed:
            return out
        read = self._read_gro if self.gro_enabled else self._read_plain
        self._offset = 0  # recycles the arena: the previous batch's views go stale here
        while True:
            try:
                read(out, max_datagrams)
                break  # max reached or arena full
            except BlockingIOError:
                break
            except OSError as exc:
                # An ICMP error (e.g. port unreachable) reported on receive: count it, go on.
                if not self._absorb_icmp(exc):
                    raise
        if not out:
            # Woken with nothing to read: maybe EPOLLERR from an error queue entry whose
            # sk_err was already consumed. Drain it, or the reader callback would spin.
            self._drain_error_queue()
        return out

    def _read_plain(self, out: Received, limit: int) -> None:
        # recvfrom_into into a shared arena: no per-datagram buffer allocation; the views are
        # packed back to back so ~700 full-size datagrams share 1 MiB of warm cache.
        recv = self._sock.recvfrom_into
        view = self._view
        last = len(view) - MAX_DATAGRAM  # a read needs MAX_DATAGRAM of room: never truncate
        append = out.append
        v6 = self._v6
        offset = self._offset
        try:
            while len(out) < limit and offset <= last:
                n, addr = recv(view[offset:])
                if v6:
                    addr = _v6_address(addr)
                append((view[offset : offset + n], addr))
                offset += n
        finally:
            self._offset = offset  # the loop usually ends in BlockingIOError

    def _read_gro(self, out: Received, limit: int) -> None:
        # recvmsg_into, because only the cmsg tells where a coalesced read splits.
        recv = self._sock.recvmsg_into
        view = self._view
        last = len(view) - MAX_DATAGRAM
        append = out.append
        v6 = self._v6
        offset = self._offset
        try:
            while len(out) < limit and offset <= last:
                n, ancdata, _flags, addr = recv((view[offset:],), _ANC_BUFSIZE)
                if v6:
                    addr = _v6_address(addr)
                end = offset + n
                segment = _gro_segment(ancdata, n)
                train = view[offset:end]
                if segment >= n:
                    append((train, addr))
                else:
                    # Slices of `train` clamp at its end, which cuts the shorter last segment.
                    out += [(train[at : at + segment], addr) for at in range(0, n, segment)]
                offset = end
        finally:
            self._offset = offset

    def _drain_error_queue(self) -> int:
        """Read every queued socket error; count and remember the ICMP ones. Returns count."""
        found = 0
        while True:
            try:
                _data, ancdata, _flags, addr = self._sock.recvmsg(
                    1, _ERRQ_ANC_BUFSIZE, MSG_ERRQUEUE
                )
            except (BlockingIOError, InterruptedError):
                return found
            except OSError:
                return found  # closed, or no error queue support: nothing to drain
            for _level, _kind, data in ancdata:
                if len(data) < _EXT_ERR.size:
                    continue
                err, origin, icmp_type, icmp_code, _pad, _info, _data2 = _EXT_ERR.unpack_from(data)
                if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
                    continue
                found += 1
                self.icmp_errors += 1
                dest = (addr[0], addr[1]) if addr else None
                self.last_icmp_error = IcmpError(err, dest, icmp_type, icmp_code)
            if not ancdata:
                return found

    # -- asyncio ------------------------------------------------------------------------------

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], None]) -> None:
        """Call ``on_readable`` (which should call :meth:`recv_batch`) whenever data waits."""
        self._loop = loop
        loop.add_reader(self._fd, on_readable)
        self._reading = True

    def wait_writable(self) -> Awaitable[None]:
        """A future that resolves once the socket can take more data (after a short send).

        One-shot; concurrent callers share one future, since add_writer holds one callback.
        """
        if self._writable is not None and not self._writable.done():
            return self._writable
        loop = self._loop or asyncio.get_running_loop()
        self._loop = loop
        future: asyncio.Future[None] = loop.create_future()
        self._writable = future
        if self._device_full:
            # After ENOBUFS the socket buffer has room, so add_writer would fire at once and
            # the caller would spin against a full device queue. A short sleep lets it drain.
            self._device_full = False
            loop.call_later(NOBUFS_BACKOFF, _resolve, future)
            return future

        def on_writable() -> None:
            loop.remove_writer(self._fd)
            _resolve(future)

        loop.add_writer(self._fd, on_writable)
        return future

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._loop is not None and not self._loop.is_closed():
            if self._reading:
                self._loop.remove_reader(self._fd)
            self._loop.remove_writer(self._fd)
        self._reading = False
        if self._writable is not None and not self._writable.done():
            self._writable.cancel()
        self._sock.close()

    def __enter__(self) -> DatagramSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# -- helpers ----------------------------------------------------------------------------------


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # close() may have cancelled it
        future.set_result(None)


def _next_run(datagrams: Datagrams, start: int, n: int, max_segment: int) -> tuple[int, int]:
    """End (exclusive) and segment size of the GSO run starting at ``start``.

    A run is equal-size datagrams, optionally closed by one shorter (non-empty) datagram:
    exactly what the kernel cuts a super-datagram back into.
    """
    segment = len(datagrams[start])
    end = start + 1
    if segment == 0 or segment > max_segment:
        return end, segment  # empty datagrams cannot be segments; too big ones travel alone
    total = segment
    stop = min(n, start + GSO_MAX_SEGMENTS)
    while end < stop:
        size = len(datagrams[end])
        if total + size > GSO_MAX_BYTES:
            break
        if size != segment:
            if 0 < size < segment:
                end += 1  # a shorter datagram may close the run
            break
        total += size
        end += 1
    return end, segment


def _v6_address(addr: tuple[str, int, int, int]) -> Address:
    """(host, port) from an IPv6 sockaddr; a link-local scope stays in the host as ``%id``."""
    if addr[3]:
        return (f"{addr[0]}%{addr[3]}", addr[1])
    return (addr[0], addr[1])


def _gro_segment(ancdata: list[tuple[int, int, bytes]], n: int) -> int:
    """Segment size of a GRO read; the cmsg is present only when segments were coalesced."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            return int(_GRO_SEG.unpack(data)[0])
    return n


def _resolve_bind(host: str, port: int) -> tuple[socket.AddressFamily, SockAddr]:
    if host == "":
        host = "0.0.0.0"
    info = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_DGRAM, 0, socket.AI_PASSIVE)
    family, _type, _proto, _name, sockaddr = info[0]
    return family, tuple(sockaddr)


def _set_buffer(sock: socket.socket, option: int, force_option: int, size: int) -> None:
    # SO_*BUFFORCE ignores net.core.[rw]mem_max but needs CAP_NET_ADMIN; without it the plain
    # option silently caps at the sysctl maximum, which is still the best we can get.
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_option, size)
    except OSError:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, size)


def _enable_recverr(sock: socket.socket) -> None:
    # Both levels on IPv6 sockets: IPv4-mapped peers report through the IPv4 option.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def _probe_gso(sock: socket.socket) -> bool:
    # Reading UDP_SEGMENT succeeds exactly on kernels that implement it (>= 4.18). The option
    # numbers are Linux's, so ask nobody else.
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
    except OSError:
        return False
    return True


def _enable_gro(sock: socket.socket) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        return False
    return True
