"""The sending half of a session, sans-IO: pacing, acknowledgement, loss recovery.

Blocks form one global append-only stream (the engine maps them to files). The sender
paces DATA with a token bucket at the rate controller's pacing rate, serves
retransmissions before new blocks, and learns from the receiver's REPORTs which blocks
arrived (cumulative point plus ranges above it).

Loss rule (performance.md §3c): a block in flight is declared lost when the receiver's
REPORT shows it missing although a packet sent after it (by a small reordering margin)
has arrived, and only once it was last sent at least 1.25 x SRTT ago, so a block is never
re-sent before the previous copy could have been acknowledged. Tail loss: when nothing new
can be sent and the oldest unacknowledged block is older than 1.25 x SRTT plus a report
interval, the unacknowledged blocks are re-sent (with exponential back-off while nothing
progresses). Everything is bounded: blocks in flight are capped at about two pacing-rate
x SRTT products, the retransmission queue only ever holds blocks taken out of flight.
"""

from __future__ import annotations

import bisect
import enum
from collections import deque
from typing import Protocol

from . import wire
from .crypto import PacketProtector
from .events import Acked, StreamComplete
from .rangeset import RangeSet
from .rate import RateController, create_rate_controller
from .session import SessionBase, SessionState

UDP_IP_OVERHEAD = wire.UDP_HEADER_SIZE + wire.IPV4_HEADER_SIZE  # charged per datagram
BURST_SECONDS = 0.002  # credit cap: a stalled caller must not turn into a line-rate burst
MIN_BURST_DATAGRAMS = 16  # ...but one wake-up may always send a small batch
WAKE_SECONDS = 0.001  # ask to be woken when this much credit is ready, not per datagram
INITIAL_RTT = 0.333  # until the first sample (QUIC's choice): errs towards patience
RETRANSMIT_RTT_FACTOR = 1.25
REPORT_ALLOWANCE = 0.02  # the receiver may hold a REPORT this long (its report interval)
MIN_REORDER_MARGIN = 0.001
MIN_RTT_WINDOW = 30.0  # seconds a minimum RTT sample stays valid (re-probe route changes)
MIN_RTT_BUCKETS = 6  # the window is kept as the minima of this many slices
MIN_INFLIGHT_BLOCKS = 64
MAX_INFLIGHT_BLOCKS = 1 << 18  # hard ceiling: 10 Gbit/s x 150 ms x 2 in 1400-byte blocks
CAP_RATE_MEMORY = 4  # SRTTs the in-flight cap remembers a higher rate
MAX_TAIL_BACKOFF = 64
MAX_KEEPALIVE_INTERVAL = 1.0
_DATA_WIRE_OVERHEAD = wire.DATA_OVERHEAD + UDP_IP_OVERHEAD
SENT_RECORD_LIMIT = 8192  # batches remembered for the controller's sent-rate questions


class BlockSource(Protocol):
    def read_block(self, block: int) -> bytes | memoryview:
        """The payload of ``block``; may be asked again for a retransmission."""
        ...


class _Unchanged(enum.Enum):
    UNCHANGED = 0


UNCHANGED = _Unchanged.UNCHANGED


class SenderSession(SessionBase):
    def __init__(
        self,
        *,
        session_id: bytes,
        protector_out: PacketProtector,
        protector_in: PacketProtector,
        initiator: bool,
        source: BlockSource,
        block_payload: int,
        rate: RateController,
        now: float,
        idle_timeout: float = 20.0,
    ) -> None:
        super().__init__(
            session_id=session_id,
            protector_out=protector_out,
            protector_in=protector_in,
            initiator=initiator,
            now=now,
            idle_timeout=idle_timeout,
            max_datagram=block_payload + wire.DATA_OVERHEAD + UDP_IP_OVERHEAD,
        )
        if block_payload <= 0:
            raise ValueError("block_payload must be positive")
        self._source = source
        self._block_payload = block_payload
        self._wire_block = block_payload + wire.DATA_OVERHEAD + UDP_IP_OVERHEAD
        self._rate = rate
        # (time, cumulative wire bytes) after each batch: what was really sent, when.
        self._sent_times: list[float] = [now]
        self._sent_totals: list[int] = [0]
        self._equip(rate)
        self._target_bps: float | None = rate.target_bps
        self._min_bps = rate.min_bps
        # The stream and what the receiver acknowledged.
        self._total_blocks = 0
        self._stream_closed = False
        self._next_new = 0
        self._acked = RangeSet()
        self._cum_ack = 0
        self._complete_announced = False
        # Blocks in flight: send time by block, and the blocks in send order. A block has
        # one entry in the order log while in flight (it is popped from the log before it
        # can be re-sent), so an entry whose block left ``_in_flight`` is simply stale.
        self._in_flight: dict[int, float] = {}
        self._flight_order: deque[int] = deque()
        self._retransmit: deque[int] = deque()
        # Token bucket.
        self._tokens = 0.0
        self._last_refill = now
        self._app_limited = False
        self._cap_rate = rate.pacing_rate
        self._cap_rate_at = now
        # Path estimates from REPORT echoes.
        self._srtt: float | None = None
        self._latest_rtt: float | None = None
        self._min_rtt: float | None = None
        # Sliding minimum over MIN_RTT_WINDOW: (slice start, slice minimum), oldest first.
        # A plain "replace after the window" would adopt whatever sample came next, often
        # one inflated by a standing queue.
        self._rtt_slices: deque[tuple[float, float]] = deque()
        self._echo_s = 0.0  # newest send time the receiver has seen, seconds
        self._coverage_end = 0  # REPORT ranges are known complete below this block
        self._last_report_time_us = -1
        self._last_received_bytes = 0
        self._last_received_datagrams = 0
        self._tail_backoff = 1
        self._last_tail_at: float | None = None
        self._last_send = now
        self._keepalive = min(MAX_KEEPALIVE_INTERVAL, idle_timeout / 4)
        # Counters.
        self.bytes_sent = 0  # DATA payload bytes put on the wire, retransmissions included
        self.bytes_retransmitted = 0
        self.wire_bytes_sent = 0  # IP datagram bytes of DATA, what the rate is measured on
        self.datagrams_sent = 0

    # --- the stream ----------------------------------------------------------------------

    def add_blocks(self, count: int) -> int:
        """Append ``count`` blocks to the stream; returns the index of the first."""
        if self._stream_closed:
            raise ValueError("the stream is closed")
        if count < 0:
            raise ValueError("count must be >= 0")
        first = self._total_blocks
        self._total_blocks += count
        return first

    def close_stream(self) -> None:
        """No more blocks will be added."""
        self._stream_closed = True
        self._check_complete()

    @property
    def total_blocks(self) -> int:
        return self._total_blocks

    @property
    def is_complete(self) -> bool:
        return self._stream_closed and self._cum_ack >= self._total_blocks

    @property
    def cum_ack(self) -> int:
        return self._cum_ack

    @property
    def acked_count(self) -> int:
        return self._acked.covered

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # --- rate ------------------------------------------------------------------------------

    @property
    def srtt(self) -> float | None:
        return self._srtt

    @property
    def min_rtt(self) -> float | None:
        return self._min_rtt

    @property
    def latest_rtt(self) -> float | None:
        return self._latest_rtt

    @property
    def pacing_rate(self) -> float:
        """Bytes per second (IP datagram bytes)."""
        return self._rate.pacing_rate

    @property
    def rate_controller(self) -> RateController:
        return self._rate

    def set_rate(
        self,
        *,
        target_bps: float | None | _Unchanged = UNCHANGED,
        min_bps: float | None = None,
        policy: str | None = None,
    ) -> None:
        """Change target (bits/s, None = unlimited), minimum and/or policy, live.

        The pacer reads the controller's rate on every call, so the change applies to the
        very next batch: well within one RTT.
        """
        if not isinstance(target_bps, _Unchanged):
            self._target_bps = target_bps
        if min_bps is not None:
            self._min_bps = min_bps
        if policy is not None:
            previous_rate = self._rate.pacing_rate
            self._rate = create_rate_controller(
                policy, target_bps=self._target_bps, min_bps=self._min_bps
            )
            self._equip(self._rate)
            self._rate.seed(previous_rate)
            return
        if not isinstance(target_bps, _Unchanged):
            self._rate.set_target(target_bps)
        if min_bps is not None:
            self._rate.set_min(min_bps)

    def _equip(self, rate: RateController) -> None:
        rate.datagram_bytes = self._wire_block
        rate.sent_meter = self.sent_rate_between

    def sent_rate_between(self, start: float, end: float) -> float | None:
        """Wire bytes/s actually sent in ``[start, end]`` (None before there is a record)."""
        times = self._sent_times
        if end <= start or start < times[0]:
            return None
        return (self._sent_total_at(end) - self._sent_total_at(start)) / (end - start)

    def _sent_total_at(self, when: float) -> int:
        index = bisect.bisect_right(self._sent_times, when) - 1
        return self._sent_totals[max(0, index)]

    def _record_sent(self, now: float) -> None:
        times, totals = self._sent_times, self._sent_totals
        if times[-1] == now:
            totals[-1] = self.wire_bytes_sent
        else:
            times.append(now)
            totals.append(self.wire_bytes_sent)
        if len(times) > SENT_RECORD_LIMIT:  # a few seconds of batches is all anyone asks
            del times[: SENT_RECORD_LIMIT // 2], totals[: SENT_RECORD_LIMIT // 2]

    # --- sending ---------------------------------------------------------------------------

    def datagrams_to_send(self, now: float, max_datagrams: int = 64) -> list[bytes]:
        out = self._control_datagrams(now)
        if self._state is not SessionState.ESTABLISHED:
            return out
        self._refill(now)
        sent = self._send_data(now, out, max_datagrams - len(out))
        if sent:
            self._last_send = now
            self._record_sent(now)
        elif now - self._last_send >= self._keepalive:
            out.append(self._encode_probe(now))
            self._last_send = now
        return out

    def _refill(self, now: float) -> None:
        rate = self._rate.pacing_rate
        burst = max(rate * BURST_SECONDS, MIN_BURST_DATAGRAMS * self._wire_block)
        elapsed = now - self._last_refill
        if elapsed > 0:
            self._tokens = min(burst, self._tokens + elapsed * rate)
        self._last_refill = now
        # The in-flight cap follows the recent peak rate, not the current one: after a rate
        # cut the blocks already in flight are legitimate and must not stall the sender.
        srtt = self._srtt if self._srtt is not None else INITIAL_RTT
        if rate >= self._cap_rate or now - self._cap_rate_at > CAP_RATE_MEMORY * srtt:
            self._cap_rate = rate
            self._cap_rate_at = now

    def _send_data(self, now: float, out: list[bytes], budget: int) -> int:
        """The hot loop: fill ``out`` with up to ``budget`` DATA datagrams the pacer allows.

        Everything is bound to locals first; per datagram we allocate only the header, the
        sealed body and the datagram itself (no tuples: the flight log holds plain ints).
        """
        tokens = self._tokens
        if budget <= 0 or tokens <= 0:
            return 0
        in_flight = self._in_flight
        remember = self._flight_order.append
        retransmit = self._retransmit
        acked = self._acked
        read_block = self._source.read_block
        seal = self._protector_out.seal
        pack = wire.DATA_PREFIX.pack
        magic, version, data_type = wire.MAGIC, wire.VERSION, int(wire.PacketType.DATA)
        overhead = _DATA_WIRE_OVERHEAD
        session_id = self.session_id
        send_time_us = int(now * 1e6)
        packet_number = self._next_packet_number
        next_new, total = self._next_new, self._total_blocks
        new_allowed = self._inflight_cap() - len(in_flight)
        sent = payload_bytes = retransmitted_bytes = 0
        while sent < budget and tokens > 0:
            if retransmit:
                block = retransmit.popleft()
                if block < self._cum_ack or block in acked:
                    continue  # acknowledged after all (late REPORT): nothing to repair
                flags = wire.FLAG_RETRANSMISSION
                new_allowed -= 1
            elif next_new < total and new_allowed > 0:
                block = next_new
                next_new += 1
                new_allowed -= 1
                flags = 0
            else:
                self._app_limited = True
                break
            payload = read_block(block)
            prefix = pack(
                magic, version, data_type, flags, session_id, packet_number, block, send_time_us
            )
            out.append(prefix + seal(packet_number, prefix, payload))
            packet_number += 1
            in_flight[block] = now
            remember(block)
            size = len(payload)
            tokens -= size + overhead
            payload_bytes += size
            if flags:
                retransmitted_bytes += size
            sent += 1
        self._next_new = next_new
        self._next_packet_number = packet_number
        self._tokens = tokens
        self.bytes_sent += payload_bytes
        self.bytes_retransmitted += retransmitted_bytes
        self.wire_bytes_sent += payload_bytes + sent * overhead
        self.datagrams_sent += sent
        return sent

    def _encode_probe(self, now: float) -> bytes:
        """An empty DATA asking for a prompt REPORT: keeps an idle session alive."""
        return wire.encode_data(
            self._protector_out,
            self.session_id,
            self._allocate_packet_number(),
            block=wire.NO_BLOCK,
            send_time_us=int(now * 1e6),
            payload=b"",
            flags=wire.FLAG_PROBE,
        )

    def _inflight_cap(self) -> int:
        # Acknowledgements come in REPORTs about every report interval, not per datagram, so
        # the feedback loop is SRTT plus that interval: on a short path the interval dominates.
        srtt = self._srtt if self._srtt is not None else INITIAL_RTT
        loop_time = srtt + REPORT_ALLOWANCE
        blocks = 2 * max(self._cap_rate, self._rate.pacing_rate) * loop_time / self._wire_block
        return int(min(MAX_INFLIGHT_BLOCKS, max(MIN_INFLIGHT_BLOCKS, blocks)))

    def _can_send_new(self) -> bool:
        return self._next_new < self._total_blocks and len(self._in_flight) < self._inflight_cap()

    # --- timers ----------------------------------------------------------------------------

    def _own_timer(self) -> float | None:
        if self._state is not SessionState.ESTABLISHED:
            return None
        deadlines = [self._last_send + self._keepalive]
        if self._retransmit or self._can_send_new():
            deadlines.append(self._pacing_due())
        tail = self._tail_due()
        if tail is not None:
            deadlines.append(tail)
        return min(deadlines)

    def _pacing_due(self) -> float:
        rate = self._rate.pacing_rate
        burst = max(rate * BURST_SECONDS, MIN_BURST_DATAGRAMS * self._wire_block)
        wanted = min(burst, max(rate * WAKE_SECONDS, self._wire_block))
        if self._tokens >= wanted:
            return self._last_refill
        return self._last_refill + (wanted - self._tokens) / rate

    def _tail_delay(self) -> float:
        srtt = self._srtt if self._srtt is not None else INITIAL_RTT
        return (RETRANSMIT_RTT_FACTOR * srtt + REPORT_ALLOWANCE) * self._tail_backoff

    def _tail_due(self) -> float | None:
        if self._retransmit or self._can_send_new() or not self._flight_order:
            return None
        oldest = self._in_flight.get(self._flight_order[0])
        if oldest is None:
            return self._last_refill  # a stale log head: the timer cleans it up now
        due = oldest + self._tail_delay()
        if self._last_tail_at is not None:
            due = max(due, self._last_tail_at + self._tail_delay())
        return due

    def _on_timer(self, now: float) -> None:
        due = self._tail_due()
        if due is not None and now >= due:
            self._resend_tail(now)

    def _resend_tail(self, now: float) -> None:
        """Nothing new to send and old blocks unacknowledged: re-send them, backing off."""
        age_limit = self._tail_delay()
        order = self._flight_order
        while order:
            sent_at = self._in_flight.get(order[0])
            if sent_at is None:
                order.popleft()
                continue
            if now - sent_at < age_limit:
                break
            block = order.popleft()
            del self._in_flight[block]
            self._retransmit.append(block)
        self._last_tail_at = now
        self._tail_backoff = min(MAX_TAIL_BACKOFF, self._tail_backoff * 2)

    # --- REPORT processing -----------------------------------------------------------------

    def _on_hello_ack(self, packet: wire.HelloAckPacket, now: float) -> None:
        self._on_rtt_sample(now - packet.echo_time_us / 1e6, now)

    def _on_report(self, packet: wire.ReportPacket, now: float) -> None:
        fresh = packet.report_time_us > self._last_report_time_us
        same_round = packet.report_time_us == self._last_report_time_us
        if fresh and packet.received_datagrams + packet.echo_time_us > 0:
            self._on_rtt_sample(now - (packet.echo_time_us + packet.hold_us) / 1e6, now)
            self._echo_s = max(self._echo_s, packet.echo_time_us / 1e6)
        acked_before = self._acked.covered
        self._acknowledge(0, packet.cum)
        for start, end in packet.ranges:
            self._acknowledge(start, end)
        newly_acked = self._acked.covered - acked_before
        if newly_acked:
            self._tail_backoff = 1
            self._last_tail_at = None
        if fresh or same_round:
            self._update_coverage(packet)
        lost = self._detect_losses(now)
        if fresh:
            self._feed_rate_controller(packet, now, lost, newly_acked)
            self._last_report_time_us = packet.report_time_us
        if newly_acked:
            self._events.append(Acked(self._cum_ack, self._acked.covered))
        self._check_complete()

    def _on_rtt_sample(self, sample: float, now: float) -> None:
        if sample <= 0:
            return
        self._latest_rtt = sample
        self._srtt = sample if self._srtt is None else self._srtt + (sample - self._srtt) / 8
        slices = self._rtt_slices
        if not slices or now - slices[-1][0] >= MIN_RTT_WINDOW / MIN_RTT_BUCKETS:
            slices.append((now, sample))
        elif sample < slices[-1][1]:
            slices[-1] = (slices[-1][0], sample)
        while now - slices[0][0] > MIN_RTT_WINDOW:
            slices.popleft()
        self._min_rtt = min(minimum for _start, minimum in slices)

    def _acknowledge(self, start: int, end: int) -> None:
        # Only blocks we actually sent can be acknowledged: a bogus REPORT cannot make us
        # loop over, or believe in, blocks that do not exist.
        end = min(end, self._next_new)
        if end <= start:
            return
        in_flight = self._in_flight
        for gap_start, gap_end in self._acked.missing(start, end):
            for block in range(gap_start, gap_end):
                in_flight.pop(block, None)
        self._acked.add(start, end)
        if start <= self._cum_ack < end:
            self._cum_ack = self._acked.first_gap_from(self._cum_ack)

    def _update_coverage(self, packet: wire.ReportPacket) -> None:
        """Track below which block the REPORT round's range lists are complete."""
        if packet.base == packet.cum:
            self._coverage_end = packet.horizon  # first datagram of a round
        elif packet.base <= self._coverage_end:
            self._coverage_end = max(self._coverage_end, packet.horizon)

    def _detect_losses(self, now: float) -> int:
        srtt = self._srtt if self._srtt is not None else INITIAL_RTT
        guard = RETRANSMIT_RTT_FACTOR * srtt
        seen_after = self._echo_s - max(srtt / 8, MIN_REORDER_MARGIN)
        long_after = self._echo_s - 2 * srtt
        order, in_flight = self._flight_order, self._in_flight
        lost = 0
        while order:
            block = order[0]
            sent_at = in_flight.get(block)
            if sent_at is None:
                order.popleft()  # acknowledged since: the entry is stale
                continue
            if now - sent_at < guard:
                break  # every later entry is younger still
            reported_missing = block < self._coverage_end and sent_at < seen_after
            # Beyond a truncated REPORT: only when far newer packets arrived.
            if not reported_missing and sent_at >= long_after:
                break
            order.popleft()
            del in_flight[block]
            self._retransmit.append(block)
            lost += 1
        return lost

    def _feed_rate_controller(
        self, packet: wire.ReportPacket, now: float, lost: int, acked: int
    ) -> None:
        delivered_payload = packet.received_bytes - self._last_received_bytes
        delivered_datagrams = packet.received_datagrams - self._last_received_datagrams
        interval = (packet.report_time_us - self._last_report_time_us) / 1e6
        first = self._last_report_time_us < 0
        self._last_received_bytes = packet.received_bytes
        self._last_received_datagrams = packet.received_datagrams
        if first or delivered_payload < 0 or interval <= 0:
            return
        if self._app_limited:
            self._app_limited = False  # the rate was not the limit: teach the controller nothing
            return
        # In wire bytes, the unit of the pacing rate.
        overhead = delivered_datagrams * (wire.DATA_OVERHEAD + UDP_IP_OVERHEAD)
        self._rate.on_report(
            now,
            delivered_bytes=delivered_payload + overhead,
            interval=interval,
            rtt=self._latest_rtt,
            min_rtt=self._min_rtt,
            lost=lost,
            acked=acked,
        )

    def _check_complete(self) -> None:
        if self.is_complete and not self._complete_announced:
            self._complete_announced = True
            self._events.append(StreamComplete())
