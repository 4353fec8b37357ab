"""What the sender and the receiver share: handshake, liveness, close, events, numbering.

State machine (one owner: :class:`SessionBase`; the transitions are in ``_on_authenticated``,
``close``, ``_on_close_packet`` and ``_check_idle``)::

    HANDSHAKE --any authenticated packet from the peer--> ESTABLISHED
    HANDSHAKE | ESTABLISHED --close()--> CLOSING --CLOSE sent--> CLOSED
    any --CLOSE received (PeerClosed) | idle_timeout (Timeout)--> CLOSED

Why "any authenticated packet": only a holder of the session keys can produce one, so it
proves the peer is there; the initiator repeats HELLO every 0.25 s until then. The responder
answers every HELLO with a HELLO_ACK (the ACK may be lost; a HELLO costs nothing to answer),
and never sends DATA before its own handshake completed.

Path MTU check (``verify_path_mtu``): HELLO and HELLO_ACK are padded to the size of a full
DATA datagram, and only padded ones complete the handshake, so a session never starts on a
path that would drop its DATA. After a few unanswered padded HELLOs the initiator also
sends small ones; the responder answers those with small ACKs *without* completing its
handshake. Small ACKs with no padded one mean the path is too narrow: ``PathMtuFailed``,
and the engine retries with 1500-byte datagrams.
"""

from __future__ import annotations

import enum
from collections import deque

from . import wire
from .crypto import PacketProtector
from .events import Event, HandshakeComplete, PathMtuFailed, PeerClosed, Timeout

HELLO_INTERVAL = 0.25
MAX_PENDING_HELLO_ACKS = 4  # a flood of replayed HELLOs must not grow a queue
CLOSE_REPEAT_INTERVAL = 0.1  # a closed session re-answers a live peer with CLOSE, this often
DEFAULT_DATAGRAM_SIZE = 1500
SMALL_HELLO_AFTER = 3  # padded HELLOs sent before small ones join them
SMALL_ACKS_TO_FAIL = 3  # small ACKs (with no padded one) that prove the path is too narrow


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    ESTABLISHED = "established"
    CLOSING = "closing"
    CLOSED = "closed"


class SessionBase:
    """Handshake, idle timeout, CLOSE and the event queue; subclasses add data transfer."""

    def __init__(
        self,
        *,
        session_id: bytes,
        protector_out: PacketProtector,
        protector_in: PacketProtector,
        initiator: bool,
        now: float,
        idle_timeout: float,
        max_datagram: int = DEFAULT_DATAGRAM_SIZE,
    ) -> None:
        if len(session_id) != wire.SESSION_ID_SIZE:
            raise ValueError("session_id must be 8 bytes")
        self.session_id = session_id
        self._protector_out = protector_out
        self._protector_in = protector_in
        self.initiator = initiator
        self.idle_timeout = idle_timeout
        self._max_datagram = max_datagram
        self._state = SessionState.HANDSHAKE
        self._events: deque[Event] = deque()
        self._next_packet_number = 0
        self._last_peer_activity = now
        # Datagrams that passed authentication: the endpoint moves the peer address only
        # on these, so a forged datagram carrying a known session id cannot redirect us.
        self.authenticated_datagrams = 0
        self._hello_due: float | None = now if initiator else None
        self._hello_acks_due: deque[tuple[int, bool]] = deque()  # (echo time, padded)
        self._pad_to = 0  # UDP payload size the handshake proves (0: no check)
        self._hellos_sent = 0
        self._small_acks = 0
        self._close_code = 0
        self._close_sent_at: float | None = None
        self._close_answer_due = False

    # --- public ----------------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        return self._state

    @property
    def is_alive(self) -> bool:
        return self._state in (SessionState.HANDSHAKE, SessionState.ESTABLISHED)

    def verify_path_mtu(self, udp_payload: int) -> None:
        """Pad the handshake to ``udp_payload`` bytes and complete it only that way."""
        self._pad_to = udp_payload

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def close(self, now: float, code: int = 0) -> None:
        """Queue a CLOSE carrying ``code`` (0 = normal end); the session then stops."""
        if self.is_alive:
            self._close_code = code
            self._state = SessionState.CLOSING

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` (then ``datagrams_to_send``) should run next."""
        if self._state is SessionState.CLOSING:
            return self._last_peer_activity  # in the past: send the CLOSE now
        if self._state is SessionState.CLOSED:
            return self._close_sent_at if self._close_answer_due else None
        deadlines = [self._last_peer_activity + self.idle_timeout]
        if self._state is SessionState.HANDSHAKE and self._hello_due is not None:
            deadlines.append(self._hello_due)
        if self._hello_acks_due:
            deadlines.append(self._last_peer_activity)
        own = self._own_timer()
        if own is not None:
            deadlines.append(own)
        return min(deadlines)

    def handle_timer(self, now: float) -> None:
        if not self.is_alive:
            return
        if self._check_idle(now):
            return
        self._on_timer(now)

    def receive_datagram(self, data: bytes | memoryview, now: float) -> None:
        if self._state is SessionState.CLOSED:
            self._maybe_answer_closed(data, now)
            return
        if len(data) >= wire.DATA_OVERHEAD and data[2] == wire.PacketType.DATA:
            self._on_data_datagram(data, now)  # the hot path parses its own prefix
            return
        try:
            _ptype, _flags, session_id, _pn = wire.peek_header(data)
        except wire.DecodeError:
            return
        if session_id != self.session_id:
            return
        try:
            packet = wire.decode(data, self._protector_in)
        except wire.DecodeError:
            return  # forged, altered, truncated or unknown: dropped without a trace
        if (
            self._pad_to
            and isinstance(packet, wire.HelloPacket | wire.HelloAckPacket)
            and not packet.flags & wire.FLAG_PADDED
        ):
            self._on_small_hello(packet, now)
            return
        self._on_authenticated(now)
        if isinstance(packet, wire.HelloPacket):
            self._on_hello(packet)
        elif isinstance(packet, wire.HelloAckPacket):
            self._on_hello_ack(packet, now)
        elif isinstance(packet, wire.ReportPacket):
            self._on_report(packet, now)
        elif isinstance(packet, wire.ClosePacket):
            self._on_close_packet(packet)

    # --- for subclasses ---------------------------------------------------------------

    def _own_timer(self) -> float | None:
        return None

    def _on_timer(self, now: float) -> None:
        """Subclass timers (reports, loss recovery)."""

    def _on_data_datagram(self, data: bytes | memoryview, now: float) -> None:
        """A DATA datagram (type byte checked, length >= DATA_OVERHEAD), not authenticated."""

    def _on_report(self, packet: wire.ReportPacket, now: float) -> None:
        """An authenticated REPORT."""

    def _on_hello_ack(self, packet: wire.HelloAckPacket, now: float) -> None:
        """An authenticated HELLO_ACK (its echo gives the initiator a first RTT sample)."""

    def _allocate_packet_number(self) -> int:
        number = self._next_packet_number
        self._next_packet_number = number + 1
        return number

    def _on_authenticated(self, now: float) -> None:
        self.authenticated_datagrams += 1
        self._last_peer_activity = now
        if self._state is SessionState.HANDSHAKE:
            self._state = SessionState.ESTABLISHED
            self._hello_due = None
            self._events.append(HandshakeComplete())

    def _control_datagrams(self, now: float) -> list[bytes]:
        """HELLO / HELLO_ACK / CLOSE due now. Sets the state to CLOSED once CLOSE is out."""
        out: list[bytes] = []
        if self._state is SessionState.CLOSING:
            out.append(self._encode_close())
            self._state = SessionState.CLOSED
            self._close_sent_at = now
            return out
        if self._state is SessionState.CLOSED:
            if self._close_answer_due:
                self._close_answer_due = False
                self._close_sent_at = now
                out.append(self._encode_close())
            return out
        if (
            self._state is SessionState.HANDSHAKE
            and self._hello_due is not None
            and now >= self._hello_due
        ):
            self._hello_due = now + HELLO_INTERVAL
            self._hellos_sent += 1
            out.append(self._encode_hello(now, self._pad_to))
            if self._pad_to and self._hellos_sent > SMALL_HELLO_AFTER:
                out.append(self._encode_hello(now, 0))  # does anything get through at all?
        while self._hello_acks_due:
            echo, padded = self._hello_acks_due.popleft()
            out.append(
                wire.encode_hello_ack(
                    self._protector_out,
                    self.session_id,
                    self._allocate_packet_number(),
                    echo_time_us=echo,
                    max_datagram=self._max_datagram,
                    pad_to=self._pad_to if padded else 0,
                )
            )
        return out

    def _encode_hello(self, now: float, pad_to: int) -> bytes:
        return wire.encode_hello(
            self._protector_out,
            self.session_id,
            self._allocate_packet_number(),
            time_us=int(now * 1e6),
            max_datagram=self._max_datagram,
            pad_to=pad_to,
        )

    # --- internals --------------------------------------------------------------------

    def _check_idle(self, now: float) -> bool:
        if now - self._last_peer_activity >= self.idle_timeout:
            self._state = SessionState.CLOSED
            self._events.append(Timeout())
            return True
        return False

    def _on_hello(self, packet: wire.HelloPacket) -> None:
        if not self.initiator and len(self._hello_acks_due) < MAX_PENDING_HELLO_ACKS:
            self._hello_acks_due.append((packet.time_us, bool(self._pad_to)))

    def _on_small_hello(self, packet: wire.HelloPacket | wire.HelloAckPacket, now: float) -> None:
        """An unpadded handshake packet while the path MTU is checked: proof of life only.

        It counts as authenticated (the endpoint may learn the peer's address from it) but
        completes no handshake: the big datagrams have not been shown to pass.
        """
        self.authenticated_datagrams += 1
        self._last_peer_activity = now
        if isinstance(packet, wire.HelloPacket):
            if not self.initiator and len(self._hello_acks_due) < MAX_PENDING_HELLO_ACKS:
                self._hello_acks_due.append((packet.time_us, False))
            return
        if self._state is not SessionState.HANDSHAKE:
            return
        self._small_acks += 1
        if self._small_acks >= SMALL_ACKS_TO_FAIL:
            self._state = SessionState.CLOSED
            self._events.append(PathMtuFailed(self._pad_to))

    def _on_close_packet(self, packet: wire.ClosePacket) -> None:
        self._state = SessionState.CLOSED
        self._close_sent_at = None  # the peer is gone: nothing to answer any more
        self._events.append(PeerClosed(packet.code))

    def _encode_close(self) -> bytes:
        return wire.encode_close(
            self._protector_out,
            self.session_id,
            self._allocate_packet_number(),
            self._close_code,
        )

    def _maybe_answer_closed(self, data: bytes | memoryview, now: float) -> None:
        """After our CLOSE, a peer that still talks did not get it: say it again, rarely."""
        if self._close_sent_at is None or now - self._close_sent_at < CLOSE_REPEAT_INTERVAL:
            return
        try:
            packet = wire.decode(data, self._protector_in)
        except wire.DecodeError:
            return
        if packet.session_id == self.session_id and not isinstance(packet, wire.ClosePacket):
            self._close_answer_due = True
