"""The control stream of a session's data phase: JSON lines over the SSH channel.

Both drivers (engine/send_driver.py, engine/recv_driver.py) talk through one
:class:`ControlStream`; docs/protocol.md, "Control channel", has every message.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sys
from typing import Any

from slipstream.engine.compressed_lines import LineDeflater, LineInflater
from slipstream.errors import PeerAborted, SlipstreamError
from slipstream.protocol import control
from slipstream.transport.tcp_tuning import corked, prefer_loss_tolerant_tcp, tcp_socket

__all__ = ["ControlStream"]

RECV_BURST = 32  # control messages handled between two turns of the event loop
# A message waits at most this long for others to share its write. One small file's
# FILE_END or READY each flushed alone cost ~160 bytes of TCP, SSH and IGNORE framing on
# the data's path (10,000 files: ~1.6 MB); a message after a quiet spell goes at once.
MIN_FLUSH_INTERVAL = 0.004
READ_CHUNK = 65536


def _stream_errors() -> tuple[type[BaseException], ...]:
    """What a broken stream raises. asyncssh's errors only when it is loaded: a transfer on
    a shared login (transport/shared.py) talks over a Unix socket and never imports it,
    which saves ~0.1 s of start-up."""
    asyncssh = sys.modules.get("asyncssh")
    errors: tuple[type[BaseException], ...] = (ConnectionError, OSError)
    return errors + (asyncssh.Error,) if asyncssh is not None else errors


class ControlStream:
    """JSON lines over the SSH channel.

    Messages sent with :meth:`send_nowait` are gathered and written once per event-loop
    iteration, and at most once per MIN_FLUSH_INTERVAL: a burst of READY or FILE_DONE for
    thousands of small files becomes a few SSH packets (each one encrypted once) instead of
    one per message. :meth:`drain` (and :meth:`send`) write at once.
    """

    def __init__(self, reader: Any, writer: Any) -> None:
        self._reader = reader
        self._writer = writer
        self._pending: list[bytes] = []
        self._received = 0
        self._broken: PeerAborted | None = None
        self._tcp = tcp_socket(writer)
        prefer_loss_tolerant_tcp(self._tcp)
        self._deflater: LineDeflater | None = None
        self._inflater: LineInflater | None = None
        self._last_flush = -math.inf

    def start_compression(self) -> None:
        """From now on both directions are deflated (the ``zlib`` feature, agreed in OPEN
        and ACCEPT: each end calls this right after ACCEPT has passed)."""
        self._flush()  # what was gathered before goes out as it was
        self._deflater = LineDeflater()
        self._inflater = LineInflater()

    @property
    def compressed(self) -> bool:
        return self._deflater is not None

    def send_nowait(self, msg_type: str, **fields: Any) -> None:
        if self._broken is not None:
            raise self._broken
        if not self._pending:
            loop = asyncio.get_running_loop()
            wait = self._last_flush + MIN_FLUSH_INTERVAL - loop.time()
            if wait > 0:
                loop.call_later(wait, self._flush)
            else:
                loop.call_soon(self._flush)
        self._pending.append(control.encode(msg_type, **fields))

    def _flush(self) -> None:
        if not self._pending or self._broken is not None:
            return
        self._last_flush = asyncio.get_running_loop().time()
        data = b"".join(self._pending)
        self._pending.clear()
        if self._deflater is not None:
            data = self._deflater.pack(data)
        try:
            with corked(self._tcp):
                self._writer.write(data)
        except _stream_errors() as exc:
            self._broken = PeerAborted(internal_message=f"control channel: {exc}")

    async def drain(self) -> None:
        """Write what is gathered and wait until the channel takes more."""
        self._flush()
        if self._broken is not None:
            raise self._broken
        try:
            await self._writer.drain()
        except _stream_errors() as exc:
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
            line = await (self._reader.readline() if self._inflater is None else self._inflated())
        except _stream_errors() as exc:
            raise PeerAborted(internal_message=f"control channel: {exc}") from exc
        if not line:
            return None
        return control.decode(line)

    async def _inflated(self) -> bytes:
        assert self._inflater is not None
        while (line := self._inflater.next_line()) is None:
            data = await self._reader.read(READ_CHUNK)
            if not data:
                return b""
            self._inflater.feed(data)
        return line

    async def send_error(self, error: SlipstreamError) -> None:
        with contextlib.suppress(Exception):
            await self.send(control.ERROR, error=error.to_dict())
