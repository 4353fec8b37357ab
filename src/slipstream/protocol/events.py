"""Events a session hands to its driver through ``next_event()``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every session event."""


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The peer proved it holds the session keys; data may flow."""


@dataclass(frozen=True, slots=True)
class Acked(Event):
    """Sender progress: every block below ``cum`` is acknowledged, ``acked_blocks`` in all."""

    cum: int
    acked_blocks: int


@dataclass(frozen=True, slots=True)
class StreamComplete(Event):
    """The stream is closed and every block of it is acknowledged (sender) or held (receiver)."""


@dataclass(frozen=True, slots=True)
class PeerClosed(Event):
    """The peer sent CLOSE; ``code`` 0 is a normal end, anything else an error code."""

    code: int


@dataclass(frozen=True, slots=True)
class Timeout(Event):
    """No authenticated packet from the peer for ``idle_timeout`` seconds: the session is dead."""


@dataclass(frozen=True, slots=True)
class PathMtuFailed(Event):
    """The padded handshake never got through but small datagrams did: the path does not
    carry the session's datagram size. The session is closed; retry with a smaller one."""

    dgram_size: int
