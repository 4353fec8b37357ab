"""The receiving half of a session, sans-IO: deliver each block once, report what we hold.

A DATA datagram's block number and send time are cleartext associated data, so a
duplicate is dropped before any decryption. Every new block goes to the sink exactly once.

REPORTs go out about every ``report_interval`` while data flows, at once when the stream
completes, when a PROBE asks, and soon after a duplicate (a duplicate means the sender is
missing news). Each report round describes ``cum`` plus every received range above it; if
that list does not fit one datagram, the round takes several (up to
:data:`MAX_REPORT_DATAGRAMS`), each continuing where the previous one's horizon ended.
When blocks are known to be missing (``extend_known``) but nothing arrives, reports keep
coming with a back-off so the sender hears about the hole.
"""

from __future__ import annotations

from typing import Protocol

from . import wire
from .crypto import PacketProtector
from .events import StreamComplete
from .rangeset import RangeSet
from .session import DEFAULT_DATAGRAM_SIZE, SessionBase, SessionState

MAX_REPORT_DATAGRAMS = 16  # per round: 16 x 343 ranges covers any sane loss pattern
MAX_NAG_INTERVAL = 1.0  # longest wait between reports while known blocks are missing
_unpack_data_prefix = wire.DATA_PREFIX.unpack_from


class BlockSink(Protocol):
    def write_block(self, block: int, payload: memoryview) -> None:
        """Called once per block, the first time it arrives intact."""
        ...


class ReceiverSession(SessionBase):
    def __init__(
        self,
        *,
        session_id: bytes,
        protector_out: PacketProtector,
        protector_in: PacketProtector,
        initiator: bool,
        sink: BlockSink,
        now: float,
        report_interval: float = 0.01,
        idle_timeout: float = 20.0,
        max_datagram: int = DEFAULT_DATAGRAM_SIZE,
    ) -> None:
        super().__init__(
            session_id=session_id,
            protector_out=protector_out,
            protector_in=protector_in,
            initiator=initiator,
            now=now,
            idle_timeout=idle_timeout,
            max_datagram=max_datagram,
        )
        self._sink = sink
        self.report_interval = report_interval
        self._report_budget = wire.report_body_budget(max_datagram)
        self._received = RangeSet()
        self._cum = 0
        self._known_end = 0
        self._total_blocks: int | None = None
        self._complete_announced = False
        self._newest_send_us = 0
        self._newest_arrival = now
        self._report_due: float | None = None
        self._last_report_at: float | None = None
        self._nag_interval = report_interval
        # Counters (payload bytes and datagrams of new blocks: the sender's delivery rate).
        self.received_bytes = 0
        self.received_datagrams = 0
        self.duplicate_datagrams = 0
        self.duplicate_bytes = 0
        self.reports_sent = 0

    # --- the stream ----------------------------------------------------------------------

    def extend_known(self, end_block: int) -> None:
        """Blocks below ``end_block`` exist, so a missing tail can be reported."""
        self._known_end = max(self._known_end, end_block)

    def close_stream(self, total_blocks: int) -> None:
        self._total_blocks = total_blocks
        self.extend_known(total_blocks)
        self._check_complete(None)

    @property
    def received_count(self) -> int:
        return self._received.covered

    @property
    def cum(self) -> int:
        return self._cum

    @property
    def is_complete(self) -> bool:
        return self._total_blocks is not None and self._cum >= self._total_blocks

    def missing(self, limit: int | None = None) -> list[tuple[int, int]]:
        """Known blocks not yet received, as ranges."""
        return self._received.missing(self._cum, self._known_end, limit)

    # --- receiving -----------------------------------------------------------------------

    def _on_data_datagram(self, data: bytes | memoryview, now: float) -> None:
        # The hot path (one call per datagram at up to ~200k/s): helpers are inlined where
        # the common case, a new in-order block, allows.
        magic, version, _type, flags, session_id, packet_number, block, send_time_us = (
            _unpack_data_prefix(data)
        )
        if magic != wire.MAGIC or version != wire.VERSION or session_id != self.session_id:
            return
        if flags & wire.FLAG_PROBE:
            self._on_probe(data, packet_number, send_time_us, now)
            return
        cum = self._cum
        if block != cum and (block < cum or block in self._received):
            # Dropped before decryption; the sender re-sent it, so it lacks our news.
            self.duplicate_datagrams += 1
            self.duplicate_bytes += len(data) - wire.DATA_OVERHEAD
            self._report_soon(now)
            return
        total = self._total_blocks
        if total is not None and block >= total:
            return  # beyond the end the engine announced: never valid
        try:
            payload = wire.open_data(data, packet_number, self._protector_in)
        except wire.DecodeError:
            return
        if self._state is not SessionState.ESTABLISHED:
            self._on_authenticated(now)
            if self._state is not SessionState.ESTABLISHED:
                return
        else:
            self.authenticated_datagrams += 1
            self._last_peer_activity = now
        self._sink.write_block(block, memoryview(payload))
        received = self._received
        received.add_one(block)
        if block == cum:
            self._cum = received.first_gap_from(block)
        self.received_bytes += len(payload)
        self.received_datagrams += 1
        if send_time_us >= self._newest_send_us:
            self._newest_send_us = send_time_us
            self._newest_arrival = now
        self._nag_interval = self.report_interval
        if self._report_due is None:
            self._report_due = now + self.report_interval
        if total is not None and self._cum >= total:
            self._check_complete(now)

    def _on_probe(
        self, data: bytes | memoryview, packet_number: int, send_time_us: int, now: float
    ) -> None:
        try:
            wire.open_data(data, packet_number, self._protector_in)
        except wire.DecodeError:
            return
        self._on_authenticated(now)
        self._note_send_time(send_time_us, now)
        self._report_due = now

    def _note_send_time(self, send_time_us: int, now: float) -> None:
        if send_time_us >= self._newest_send_us:
            self._newest_send_us = send_time_us
            self._newest_arrival = now

    def _report_soon(self, now: float) -> None:
        if self._last_report_at is None:
            due = now
        else:
            due = max(now, self._last_report_at + self.report_interval)
        if self._report_due is None or due < self._report_due:
            self._report_due = due

    def _check_complete(self, now: float | None) -> None:
        if self.is_complete and not self._complete_announced:
            self._complete_announced = True
            self._events.append(StreamComplete())
            if now is not None:
                self._report_due = now  # tell the sender at once: it is waiting to finish

    # --- timers and sending ----------------------------------------------------------------

    def _own_timer(self) -> float | None:
        return self._report_due if self._state is SessionState.ESTABLISHED else None

    def datagrams_to_send(self, now: float, max_datagrams: int = 64) -> list[bytes]:
        out = self._control_datagrams(now)
        if self._state is not SessionState.ESTABLISHED:
            return out
        if self._report_due is not None and now >= self._report_due:
            out.extend(self._report_round(now, max(1, max_datagrams - len(out))))
            self._last_report_at = now
            self._report_due = self._next_nag(now)
        return out

    def _next_nag(self, now: float) -> float | None:
        """While known blocks are missing, keep reminding the sender, slower and slower."""
        if self._cum >= self._known_end:
            return None
        due = now + self._nag_interval
        self._nag_interval = min(MAX_NAG_INTERVAL, self._nag_interval * 2)
        return due

    def _report_round(self, now: float, max_datagrams: int) -> list[bytes]:
        now_us = int(now * 1e6)
        fields = wire.ReportFields(
            cum=self._cum,
            echo_time_us=self._newest_send_us,
            hold_us=max(0, now_us - int(self._newest_arrival * 1e6)),
            received_bytes=self.received_bytes,
            received_datagrams=self.received_datagrams,
            report_time_us=now_us,
        )
        ranges = self._received.ranges_from(self._cum)
        datagrams: list[bytes] = []
        base = self._cum
        limit = min(MAX_REPORT_DATAGRAMS, max_datagrams)
        while True:
            datagram, used = wire.encode_report(
                self._protector_out,
                self.session_id,
                self._allocate_packet_number(),
                fields,
                base=base,
                ranges=ranges,
                final_horizon=wire.HORIZON_ALL,
                body_budget=self._report_budget,
            )
            datagrams.append(datagram)
            if used == len(ranges) or len(datagrams) >= limit:
                break
            base = ranges[used][0]
            ranges = ranges[used:]
        self.reports_sent += len(datagrams)
        return datagrams
