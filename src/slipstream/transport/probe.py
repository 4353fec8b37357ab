"""Diagnostic probes on the UDP data port: a real round trip without logging in.

``slipstream doctor`` must tell "UDP blocked" from "UDP fine" before anyone has
credentials, and measure the path MTU. The server therefore answers one kind of
unauthenticated datagram on its data port. It uses the common header (docs/protocol.md §2)
with type ``PROBE`` (0x7F) and the reserved session id ``ff x 8``, so the dispatcher routes
it here like any session:

    request  header(flags 0) | nonce (16) | padding to the probed size (>= 64 bytes in all)
    reply    header(flags 1, same packet number) | nonce (16) | received size (u32)

A reply is 40 bytes and a request at least 64, so the port cannot be used to amplify
traffic towards a forged source address, and replies are rate-limited on top.
"""

from __future__ import annotations

import struct
import time
from typing import Any

MAGIC = 0x53
VERSION = 1
PROBE_TYPE = 0x7F
FLAG_REPLY = 0x01
PROBE_SESSION_ID = b"\xff" * 8
MIN_REQUEST = 64
NONCE_BYTES = 16
_HEADER = struct.Struct("!BBBB8sQ")
_SIZE = struct.Struct("!I")
REPLY_SIZE = _HEADER.size + NONCE_BYTES + _SIZE.size
REPLIES_PER_SECOND = 200.0


def encode_request(number: int, nonce: bytes, size: int) -> bytes:
    """A probe of ``size`` bytes of UDP payload (at least :data:`MIN_REQUEST`)."""
    head = _HEADER.pack(MAGIC, VERSION, PROBE_TYPE, 0, PROBE_SESSION_ID, number) + nonce
    return head + bytes(max(size, MIN_REQUEST) - len(head))


def decode_reply(data: bytes) -> tuple[int, bytes, int] | None:
    """``(packet number, nonce, size the server received)``, or None if not a reply."""
    if len(data) != REPLY_SIZE:
        return None
    magic, version, kind, flags, session, number = _HEADER.unpack_from(data)
    if (magic, version, kind, session) != (MAGIC, VERSION, PROBE_TYPE, PROBE_SESSION_ID):
        return None
    if not flags & FLAG_REPLY:
        return None
    nonce = bytes(data[_HEADER.size : _HEADER.size + NONCE_BYTES])
    (size,) = _SIZE.unpack_from(data, _HEADER.size + NONCE_BYTES)
    return number, nonce, size


def make_reply(data: bytes | memoryview) -> bytes | None:
    """The answer to a probe request, or None for anything else."""
    if len(data) < MIN_REQUEST:
        return None
    magic, version, kind, flags, session, number = _HEADER.unpack_from(data)
    if (magic, version, kind, session) != (MAGIC, VERSION, PROBE_TYPE, PROBE_SESSION_ID):
        return None
    if flags & FLAG_REPLY:
        return None
    nonce = bytes(data[_HEADER.size : _HEADER.size + NONCE_BYTES])
    header = _HEADER.pack(MAGIC, VERSION, PROBE_TYPE, FLAG_REPLY, PROBE_SESSION_ID, number)
    return header + nonce + _SIZE.pack(len(data))


class ProbeResponder:
    """Registered with the server's UDP dispatcher under :data:`PROBE_SESSION_ID`.

    It has the two methods the dispatcher calls on a session endpoint (both the batched and
    the single-datagram form), and answers probes from a token bucket.
    """

    def __init__(self, sock: Any, rate: float = REPLIES_PER_SECOND) -> None:
        self.sock = sock
        self._rate = rate
        self._credit = rate
        self._stamp = time.monotonic()
        self.answered = 0

    def datagrams_received(self, batch: list[tuple[Any, Any]]) -> None:
        for data, addr in batch:
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes | memoryview, addr: Any) -> None:
        reply = make_reply(data)
        if reply is None or not self._take():
            return
        try:
            self.sock.send_batch([reply], addr)
            self.answered += 1
        except OSError:
            pass  # an unreachable prober is its own problem

    def step(self) -> None:
        """Nothing to send later: a probe is answered at once."""

    def _take(self) -> bool:
        now = time.monotonic()
        self._credit = min(self._rate, self._credit + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._credit < 1:
            return False
        self._credit -= 1
        return True
