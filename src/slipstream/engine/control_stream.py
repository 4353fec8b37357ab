"""The control stream of a session's data phase: JSON lines over the SSH channel.

Both drivers (engine/send_driver.py, engine/recv_driver.py) talk through one
:class:`ControlStream`; docs/protocol.md, "Control channel", has every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from typing import Any

import asyncssh

from slipstream.errors import PeerAborted, SlipstreamError
from slipstream.protocol import control

__all__ = ["CONTROL_TCP_CONGESTION", "ControlStream"]

CONTROL_TCP_CONGESTION = b"bbr"
RECV_BURST = 32  # control messages handled between two turns of the event loop


class ControlStream:
    """JSON lines over the SSH channel.

    Messages sent with :meth:`send_nowait` are gathered and written once per event-loop
    iteration: a burst of READY or FILE_DONE for thousands of small files becomes a few SSH
    packets (each one encrypted once) instead of one per message.
    """

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[bytes] = []
        self._received = 0
        self._broken: PeerAborted | None = None
        self._tcp = _tcp_socket(writer)
        _prefer_loss_tolerant_tcp(self._tcp)

    def send_nowait(self, msg_type: str, **fields: Any) -> None:
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(control.encode(msg_type, **fields))

    def _flush(self) -> None:
        if not self._pending or self._broken is not None:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        try:
            with _corked(self._tcp):
                self._writer.write(data)
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            self._broken = PeerAborted(internal_message=f"control channel: {exc}")

    async def drain(self) -> None:
        """Write what is gathered and wait until the channel takes more."""
        self._flush()
        if self._broken is not None:
            raise self._broken
        try:
            await self._writer.drain()
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc

    async def send(self, msg_type: str, **fields: Any) -> None:
        self.send_nowait(msg_type, **fields)
        await self.drain()

    async def recv(self) -> dict[str, Any] | None:
        """The next message, or None when the peer closed the channel.

        Reading buffered lines never yields to the event loop, so a burst of 2,048 FILE
        announcements would be handled whole before the first READY is written (and before
        the UDP endpoint runs): every RECV_BURST messages the loop gets a turn.
        """
        self._received += 1
        if self._received % RECV_BURST == 0:
            await asyncio.sleep(0)
        try:
            line = await self._reader.readline()
        except (ConnectionError, OSError, asyncssh.Error) as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc
        if not line:
            return None
        return control.decode(line)

    async def send_error(self, error: SlipstreamError) -> None:
        with contextlib.suppress(Exception):
            await self.send(control.ERROR, error=error.to_dict())


def _tcp_socket(writer: Any) -> Any:
    """The TCP socket under an SSH channel's writer (asyncio's TransportSocket); None for
    any other stream."""
    try:
        sock = writer.get_extra_info("connection").get_extra_info("socket")
    except AttributeError:
        return None
    return sock if hasattr(sock, "setsockopt") else None


@contextlib.contextmanager
def _corked(sock: Any) -> Iterator[None]:
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


def _prefer_loss_tolerant_tcp(sock: Any) -> None:
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
