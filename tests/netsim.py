"""A deterministic, virtual-time network simulator for the sans-IO sessions.

Two one-way links (forward: sender -> receiver, backward: receiver -> sender), each with a
bottleneck rate, propagation delay, a drop-tail queue limited in bytes, and seeded random
loss, reordering, duplication and corruption. :func:`run` drives a :class:`SenderSession`
and a :class:`ReceiverSession` exactly as a transport would (transmit after every input,
wake at ``get_timer()``), jumping virtual time from event to event, so "1 Gbit/s, 150 ms
RTT, 2 % loss" costs only the CPU of the packets themselves.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from slipstream.protocol.crypto import PacketProtector, Role, derive_protectors
from slipstream.protocol.events import Event
from slipstream.protocol.rate import create_rate_controller
from slipstream.protocol.receiver import ReceiverSession
from slipstream.protocol.sender import SenderSession
from slipstream.protocol.wire import DATA_OVERHEAD, payload_size_for

IP_UDP_OVERHEAD = 28
SESSION_ID = b"netsim01"


@dataclass
class LinkConfig:
    rate_bps: float = 1e9
    delay: float = 0.010  # one-way propagation, seconds
    queue_bytes: int = 4 << 20  # drop-tail limit of the bottleneck queue
    loss: float = 0.0  # random loss probability, after the queue (the wire loses it)
    reorder: float = 0.0  # probability that a datagram is held back...
    reorder_delay: float = 0.005  # ...by up to this long
    duplicate: float = 0.0
    corrupt: float = 0.0  # probability of flipping one byte
    mtu: int = 0  # IP datagrams above this are dropped silently (a black hole); 0: no limit


@dataclass
class LinkStats:
    datagrams: int = 0
    bytes: int = 0  # IP bytes accepted into the queue
    queue_drops: int = 0
    random_drops: int = 0
    duplicated: int = 0
    corrupted: int = 0
    max_queue_delay: float = 0.0
    queue_delay_sum: float = 0.0

    @property
    def mean_queue_delay(self) -> float:
        return self.queue_delay_sum / self.datagrams if self.datagrams else 0.0


class Link:
    """One direction: a FIFO bottleneck (drop-tail) followed by a lossy wire."""

    def __init__(self, config: LinkConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng
        self.busy_until = 0.0
        self.stats = LinkStats()

    def send(self, now: float, datagram: bytes) -> list[tuple[float, bytes]]:
        cfg, stats = self.config, self.stats
        size = len(datagram) + IP_UDP_OVERHEAD
        if cfg.mtu and size > cfg.mtu:
            stats.random_drops += 1
            return []
        backlog = max(0.0, self.busy_until - now)
        if backlog * cfg.rate_bps / 8 + size > cfg.queue_bytes:
            stats.queue_drops += 1
            return []
        start = now + backlog
        self.busy_until = start + size * 8 / cfg.rate_bps
        stats.datagrams += 1
        stats.bytes += size
        stats.queue_delay_sum += backlog
        stats.max_queue_delay = max(stats.max_queue_delay, backlog)
        if cfg.loss and self.rng.random() < cfg.loss:
            stats.random_drops += 1
            return []
        arrival = self.busy_until + cfg.delay
        if cfg.reorder and self.rng.random() < cfg.reorder:
            arrival += self.rng.uniform(0, cfg.reorder_delay)
        if cfg.corrupt and self.rng.random() < cfg.corrupt:
            stats.corrupted += 1
            damaged = bytearray(datagram)
            damaged[self.rng.randrange(len(damaged))] ^= 1 << self.rng.randrange(8)
            datagram = bytes(damaged)
        deliveries = [(arrival, datagram)]
        if cfg.duplicate and self.rng.random() < cfg.duplicate:
            stats.duplicated += 1
            deliveries.append((arrival + self.rng.uniform(0, 0.002), datagram))
        return deliveries


class BytesSource:
    """A BlockSource over one bytes object cut in ``block_payload`` pieces."""

    def __init__(self, data: bytes, block_payload: int) -> None:
        self.view = memoryview(data)
        self.block_payload = block_payload
        self.reads = 0

    @property
    def block_count(self) -> int:
        return -(-len(self.view) // self.block_payload)

    def read_block(self, block: int) -> memoryview:
        self.reads += 1
        start = block * self.block_payload
        return self.view[start : start + self.block_payload]


class BytesSink:
    """A BlockSink into a bytearray; insists on each block being written exactly once."""

    def __init__(self, size: int, block_payload: int) -> None:
        self.data = bytearray(size)
        self.block_payload = block_payload
        self.written: set[int] = set()

    def write_block(self, block: int, payload: memoryview) -> None:
        assert block not in self.written, f"block {block} written twice"
        self.written.add(block)
        start = block * self.block_payload
        self.data[start : start + len(payload)] = payload


@dataclass
class SimResult:
    completed: bool
    duration: float  # virtual seconds from start to both sides complete (or the limit)
    payload_bytes: int
    sender: SenderSession
    receiver: ReceiverSession
    forward: LinkStats
    backward: LinkStats
    sender_events: list[Event] = field(default_factory=list)
    receiver_events: list[Event] = field(default_factory=list)
    spins: int = 0  # timer wake-ups that produced nothing: should stay near zero

    @property
    def goodput_bps(self) -> float:
        return self.payload_bytes * 8 / self.duration if self.duration > 0 else 0.0

    @property
    def redundant_bytes(self) -> int:
        """Payload bytes that reached the receiver although it already had them."""
        return self.receiver.duplicate_bytes

    def row(self) -> dict[str, float]:
        sent = max(1, self.sender.bytes_sent)
        return {
            "seconds": round(self.duration, 3),
            "goodput_mbps": round(self.goodput_bps / 1e6, 1),
            "retransmitted_pct": round(100 * self.sender.bytes_retransmitted / sent, 2),
            "redundant_pct": round(100 * self.redundant_bytes / max(1, self.payload_bytes), 2),
            "max_queue_ms": round(self.forward.max_queue_delay * 1e3, 1),
            "mean_queue_ms": round(self.forward.mean_queue_delay * 1e3, 1),
        }


@dataclass
class Pair:
    sender: SenderSession
    receiver: ReceiverSession
    source: BytesSource
    sink: BytesSink


def make_pair(
    data: bytes,
    *,
    policy: str = "fixed",
    target_bps: float | None = 100e6,
    min_bps: float = 0,
    cipher: str = "aes-128",
    dgram_size: int = 1500,
    sender_is_initiator: bool = True,
    report_interval: float = 0.01,
    idle_timeout: float = 20.0,
    seed: int = 1,
    now: float = 0.0,
    wrap_protector: Callable[[PacketProtector], PacketProtector] | None = None,
    verify_mtu: bool = False,
) -> Pair:
    """A sender and a receiver sharing keys, with ``data`` as the whole stream."""
    secret = random.Random(seed).randbytes(32)
    sender_role: Role = "initiator" if sender_is_initiator else "responder"
    receiver_role: Role = "responder" if sender_is_initiator else "initiator"
    sender_keys = derive_protectors(cipher, secret, SESSION_ID, sender_role)
    receiver_keys = derive_protectors(cipher, secret, SESSION_ID, receiver_role)
    wrap = wrap_protector or (lambda protector: protector)
    block_payload = payload_size_for(dgram_size)
    source = BytesSource(data, block_payload)
    sink = BytesSink(len(data), block_payload)
    sender = SenderSession(
        session_id=SESSION_ID,
        protector_out=wrap(sender_keys.outbound),
        protector_in=sender_keys.inbound,
        initiator=sender_is_initiator,
        source=source,
        block_payload=block_payload,
        rate=create_rate_controller(policy, target_bps=target_bps, min_bps=min_bps),
        now=now,
        idle_timeout=idle_timeout,
    )
    receiver = ReceiverSession(
        session_id=SESSION_ID,
        protector_out=wrap(receiver_keys.outbound),
        protector_in=receiver_keys.inbound,
        initiator=not sender_is_initiator,
        sink=sink,
        now=now,
        report_interval=report_interval,
        idle_timeout=idle_timeout,
        max_datagram=dgram_size,
    )
    if verify_mtu:  # pad the handshake to a full DATA datagram (docs/protocol.md §2)
        sender.verify_path_mtu(block_payload + DATA_OVERHEAD)
        receiver.verify_path_mtu(block_payload + DATA_OVERHEAD)
    blocks = source.block_count
    sender.add_blocks(blocks)
    sender.close_stream()
    receiver.close_stream(blocks)
    return Pair(sender, receiver, source, sink)


Hook = Callable[[float, "Simulator"], None]

CROSS_PACKET = 1500  # IP bytes of one cross-traffic packet


class CrossFlow:
    """Competing traffic on the forward link, so controllers can be judged against others.

    ``kind="cbr"``: a constant bit rate (UDP video, another fixed-rate sender).
    ``kind="tcp"``: a TCP-like window flow, CUBIC's multiplicative decrease (x0.7 once per
    loss event, seen three packets later as duplicate ACKs would show it) and a Reno-like
    additive increase of one packet per RTT, slow start up to the first loss. ACKs return
    after the backward link's delay (they are not queued). Goodput is counted per packet
    that arrives.
    """

    def __init__(
        self, kind: str, *, start: float = 0.0, stop: float = 1e9, rate_bps: float = 0.0
    ) -> None:
        if kind not in ("cbr", "tcp"):
            raise ValueError(kind)
        self.kind = kind
        self.start = start
        self.stop = stop
        self.rate_bps = rate_bps
        self.delivered_bytes = 0
        self.delivered_log: list[tuple[float, int]] = []  # (arrival time, bytes)
        self._next_send = start
        self._seq = 0
        self.cwnd = 10.0
        self.ssthresh = float("inf")
        self._in_flight: dict[int, float] = {}
        self._highest_acked = -1
        self._recover_until = -1  # no further cut until a packet sent after the cut is acked

    def timer(self, rto: float) -> float | None:
        if self._next_send >= self.stop:
            return None
        if self.kind == "cbr" or self._seq == 0:
            return self._next_send
        if self._in_flight:  # ACK-clocked: only the retransmission timeout needs a timer
            return self._in_flight[next(iter(self._in_flight))] + rto
        return None

    def send_due(self, now: float) -> list[int]:
        """Sequence numbers to put on the link now."""
        if now < self.start or now >= self.stop:
            return []
        out: list[int] = []
        if self.kind == "cbr":
            gap = CROSS_PACKET * 8 / self.rate_bps
            while self._next_send <= now and len(out) < 64:
                out.append(self._take_seq(now))
                self._next_send += gap
            return out
        while len(self._in_flight) < int(self.cwnd) and len(out) < 64:
            out.append(self._take_seq(now))
        return out

    def _take_seq(self, now: float) -> int:
        seq = self._seq
        self._seq += 1
        if self.kind == "tcp":
            self._in_flight[seq] = now
        return seq

    def on_arrival(self, now: float, seq: int) -> None:
        self.delivered_bytes += CROSS_PACKET
        self.delivered_log.append((now, CROSS_PACKET))

    def on_ack(self, now: float, seq: int) -> None:
        if self._in_flight.pop(seq, None) is None:
            return
        self._highest_acked = max(self._highest_acked, seq)
        lost = False  # the dict keeps send order: older packets are at its front
        while self._in_flight and (oldest := next(iter(self._in_flight))) < seq - 3:
            del self._in_flight[oldest]
            lost = True
        if lost and seq > self._recover_until:
            self.cwnd = max(2.0, self.cwnd * 0.7)
            self.ssthresh = self.cwnd
            self._recover_until = self._seq
        elif self.cwnd < self.ssthresh:
            self.cwnd += 1
        else:
            self.cwnd += 1 / self.cwnd

    def check_timeout(self, now: float, rto: float) -> None:
        oldest = next(iter(self._in_flight), None)
        if self.kind == "tcp" and oldest is not None and now - self._in_flight[oldest] > rto:
            self._in_flight.clear()  # everything outstanding is gone: restart small
            self.ssthresh = max(2.0, self.cwnd / 2)
            self.cwnd = 2.0
            self._recover_until = self._seq

    def rate_bps_between(self, start: float, end: float) -> float:
        total = sum(size for t, size in self.delivered_log if start <= t < end)
        return total * 8 / (end - start)


class Simulator:
    """The event loop. ``hooks`` are ``(virtual time, callback)`` run once at that time."""

    def __init__(
        self,
        pair: Pair,
        forward: LinkConfig,
        backward: LinkConfig | None = None,
        *,
        seed: int = 1,
        start: float = 0.0,
    ) -> None:
        rng = random.Random(seed)
        self.pair = pair
        self.forward = Link(forward, random.Random(rng.random()))
        self.backward = Link(
            backward or LinkConfig(rate_bps=forward.rate_bps, delay=forward.delay),
            random.Random(rng.random()),
        )
        self.now = start
        self.start = start
        # (arrival, tie-break, destination, datagram); cross traffic carries an int sequence
        # number instead of a datagram, and a negative (data) or >= 1000 (ACK) destination.
        self._in_transit: list[tuple[float, int, int, bytes | int]] = []
        self._sequence = 0
        self.sender_events: list[Event] = []
        self.receiver_events: list[Event] = []
        self.hooks: list[tuple[float, Hook]] = []
        self.spins = 0
        self.sender_alive = True  # False: the sender vanished (stops sending and receiving)
        self.receiver_alive = True
        # Taps: (time, datagram) for everything each side emits, before the link. Off
        # unless a test sets them to a list.
        self.sent_by_sender: list[tuple[float, bytes]] | None = None
        self.sent_by_receiver: list[tuple[float, bytes]] | None = None
        self.cross: list[CrossFlow] = []  # competing flows on the forward link

    def run(self, time_limit: float, until: Callable[[Simulator], bool] | None = None) -> SimResult:
        sender, receiver = self.pair.sender, self.pair.receiver
        done = until or (lambda sim: sender.is_complete and receiver.is_complete)
        completed = False
        self.hooks.sort(key=lambda hook: hook[0])
        while self.now - self.start <= time_limit:
            self._run_hooks()
            self._step_endpoints()
            if done(self):
                completed = True
                break
            if not self._advance():
                break
        return SimResult(
            completed=completed,
            duration=self.now - self.start,
            payload_bytes=len(self.pair.sink.data),
            sender=sender,
            receiver=receiver,
            forward=self.forward.stats,
            backward=self.backward.stats,
            sender_events=self.sender_events,
            receiver_events=self.receiver_events,
            spins=self.spins,
        )

    def _run_hooks(self) -> None:
        while self.hooks and self.hooks[0][0] <= self.now:
            _at, hook = self.hooks.pop(0)
            hook(self.now, self)

    def _cross_rto(self) -> float:
        return max(0.2, 4 * (self.forward.config.delay + self.backward.config.delay))

    def _step_cross(self) -> None:
        forward = self.forward
        rto = self._cross_rto()
        for index, flow in enumerate(self.cross):
            flow.check_timeout(self.now, rto)
            for seq in flow.send_due(self.now):
                filler = bytes(CROSS_PACKET - IP_UDP_OVERHEAD)
                for arrival, _data in forward.send(self.now, filler):
                    self._sequence += 1
                    heapq.heappush(self._in_transit, (arrival, self._sequence, -2 - index, seq))

    def _deliver_cross(self, destination: int, seq: int) -> None:
        index = -2 - destination if destination <= -2 else destination - 1000
        flow = self.cross[index]
        if destination <= -2:
            flow.on_arrival(self.now, seq)
            if flow.kind == "tcp":
                ack_at = self.now + self.backward.config.delay
                self._sequence += 1
                heapq.heappush(self._in_transit, (ack_at, self._sequence, 1000 + index, seq))
        else:
            flow.on_ack(self.now, seq)

    def _step_endpoints(self) -> None:
        pair = self.pair
        if self.cross:
            self._step_cross()
        if self.sender_alive:
            self._step(pair.sender, self.forward, 1, self.sender_events, self.sent_by_sender)
        if self.receiver_alive:
            self._step(pair.receiver, self.backward, 0, self.receiver_events, self.sent_by_receiver)

    def _step(
        self,
        endpoint: SenderSession | ReceiverSession,
        link: Link,
        destination: int,
        events: list[Event],
        tap: list[tuple[float, bytes]] | None,
    ) -> None:
        timer = endpoint.get_timer()
        if timer is not None and timer <= self.now:
            endpoint.handle_timer(self.now)
        while True:
            batch = endpoint.datagrams_to_send(self.now)
            for datagram in batch:
                if tap is not None:
                    tap.append((self.now, datagram))
                for arrival, delivered in link.send(self.now, datagram):
                    self._sequence += 1
                    heapq.heappush(
                        self._in_transit, (arrival, self._sequence, destination, delivered)
                    )
            if len(batch) < 64:
                break
        while (event := endpoint.next_event()) is not None:
            events.append(event)

    def _advance(self) -> bool:
        """Jump to the next arrival, timer or hook; deliver what arrives then."""
        candidates = [self._in_transit[0][0]] if self._in_transit else []
        for alive, endpoint in (
            (self.sender_alive, self.pair.sender),
            (self.receiver_alive, self.pair.receiver),
        ):
            timer = endpoint.get_timer() if alive else None
            if timer is not None:
                candidates.append(timer)
        if self.hooks:
            candidates.append(self.hooks[0][0])
        for flow in self.cross:
            timer = flow.timer(self._cross_rto())
            if timer is not None:
                candidates.append(timer)
        if not candidates:
            return False
        target = min(candidates)
        if target <= self.now:
            self.spins += 1  # a timer already due that produced nothing: move on a little
            target = self.now + 1e-6
        self.now = target
        while self._in_transit and self._in_transit[0][0] <= self.now:
            _arrival, _seq, destination, datagram = heapq.heappop(self._in_transit)
            if isinstance(datagram, int):
                self._deliver_cross(destination, datagram)
            elif destination == 1 and self.receiver_alive:
                self.pair.receiver.receive_datagram(datagram, self.now)
            elif destination == 0 and self.sender_alive:
                self.pair.sender.receive_datagram(datagram, self.now)
        return True


def simulate(
    data: bytes,
    forward: LinkConfig,
    backward: LinkConfig | None = None,
    *,
    time_limit: float = 60.0,
    seed: int = 1,
    **pair_options: object,
) -> SimResult:
    """Transfer ``data`` over the links; returns the result (check ``sink`` for the bytes)."""
    pair = make_pair(data, seed=seed, **pair_options)  # type: ignore[arg-type]
    return Simulator(pair, forward, backward, seed=seed).run(time_limit)
