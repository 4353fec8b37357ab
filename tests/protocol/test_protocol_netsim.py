"""End-to-end scenarios over the virtual-time link simulator.

Every transfer must end with the sink holding exactly the source bytes; the sink itself
asserts that no block is written twice.
"""

from __future__ import annotations

import os
import random

import pytest

from netsim import Link, LinkConfig, Pair, SimResult, Simulator, make_pair
from slipstream.protocol import wire
from slipstream.protocol.events import PeerClosed, StreamComplete, Timeout

MB = 1_000_000


def payload(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size) if size < 2**20 else os.urandom(size)


def transfer(
    data: bytes,
    forward: LinkConfig,
    backward: LinkConfig | None = None,
    *,
    time_limit: float = 30.0,
    seed: int = 1,
    **options: object,
) -> SimResult:
    pair = make_pair(data, seed=seed, **options)  # type: ignore[arg-type]
    result = Simulator(pair, forward, backward, seed=seed).run(time_limit)
    assert result.completed, result.row()
    assert bytes(pair.sink.data) == data
    assert result.spins < 50
    return result


def sending_rate_bps(tap: list[tuple[float, bytes]], start: float, end: float) -> float:
    """IP bits per second of DATA the tap saw in ``[start, end)``."""
    total = sum(len(d) + 28 for t, d in tap if start <= t < end and d[2] == wire.PacketType.DATA)
    return total * 8 / (end - start)


def test_clean_link() -> None:
    data = payload(3 * MB)
    result = transfer(data, LinkConfig(rate_bps=100e6, delay=0.01), target_bps=80e6)
    assert result.sender.bytes_retransmitted == 0
    assert result.redundant_bytes == 0
    assert result.goodput_bps > 60e6
    assert StreamComplete() in result.sender_events
    assert StreamComplete() in result.receiver_events


@pytest.mark.parametrize("loss", [0.01, 0.02, 0.10])
def test_random_loss(loss: float) -> None:
    data = payload(4 * MB)
    link = LinkConfig(rate_bps=1e9, delay=0.02, loss=loss)
    result = transfer(data, link, target_bps=200e6)
    retransmitted = result.sender.bytes_retransmitted / len(data)
    assert retransmitted < loss * 1.6 + 0.005
    assert result.redundant_bytes / len(data) < 0.05


def test_redundant_bytes_below_five_percent_at_two_percent_loss() -> None:
    data = payload(6 * MB)
    link = LinkConfig(rate_bps=1e9, delay=0.03, loss=0.02)
    result = transfer(data, link, LinkConfig(rate_bps=1e9, delay=0.03, loss=0.02), target_bps=300e6)
    # Redundant: a retransmitted block the receiver already had.
    assert result.redundant_bytes / len(data) < 0.05
    assert result.sender.bytes_retransmitted / len(data) < 0.05


def test_reordering() -> None:
    data = payload(3 * MB)
    link = LinkConfig(rate_bps=500e6, delay=0.02, reorder=0.2, reorder_delay=0.004)
    result = transfer(data, link, target_bps=200e6)
    assert result.redundant_bytes / len(data) < 0.05


def test_duplication() -> None:
    data = payload(2 * MB)
    link = LinkConfig(rate_bps=500e6, delay=0.01, duplicate=0.05)
    result = transfer(
        data, link, LinkConfig(rate_bps=500e6, delay=0.01, duplicate=0.05), target_bps=200e6
    )
    assert result.forward.duplicated > 0
    assert result.receiver.duplicate_datagrams >= result.forward.duplicated


@pytest.mark.parametrize("cipher", ["aes-128", "none"])
def test_corruption(cipher: str) -> None:
    data = payload(2 * MB)
    link = LinkConfig(rate_bps=500e6, delay=0.01, corrupt=0.03)
    result = transfer(
        data,
        link,
        LinkConfig(rate_bps=500e6, delay=0.01, corrupt=0.03),
        target_bps=200e6,
        cipher=cipher,
    )
    assert result.forward.corrupted > 0


def test_long_fat_lossy_path_is_cheap() -> None:
    """1 Gbit/s, 150 ms RTT, 2 % loss: a few MB in well under a few seconds of CPU."""
    import time

    data = payload(6 * MB)
    started = time.process_time()
    link = LinkConfig(rate_bps=1e9, delay=0.075, loss=0.02, queue_bytes=20 * MB)
    result = transfer(data, link, target_bps=800e6, time_limit=20)
    assert time.process_time() - started < 3.0
    assert result.duration < 2.0  # handshake + a few RTTs of recovery


def test_zero_block_stream() -> None:
    pair = make_pair(b"")
    result = Simulator(pair, LinkConfig(delay=0.01)).run(5)
    assert result.completed
    assert pair.sender.is_complete and pair.receiver.is_complete
    assert StreamComplete() in result.sender_events
    assert pair.sender.bytes_sent == 0


class TailDropLink(Link):
    """Drops the first transmission of the stream's last blocks (and nothing else)."""

    def __init__(self, config: LinkConfig, rng: random.Random, first_dropped: int) -> None:
        super().__init__(config, rng)
        self.first_dropped = first_dropped
        self.dropped: list[int] = []

    def send(self, now: float, datagram: bytes) -> list[tuple[float, bytes]]:
        if datagram[2] == wire.PacketType.DATA and not datagram[3] & wire.FLAG_RETRANSMISSION:
            _pn, block, _t = wire.peek_data(datagram)
            if block >= self.first_dropped and block != wire.NO_BLOCK:
                self.dropped.append(block)
                return []
        return super().send(now, datagram)


def test_tail_loss_is_repaired() -> None:
    data = payload(1 * MB)
    pair = make_pair(data, target_bps=100e6)
    blocks = pair.source.block_count
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.025))
    sim.forward = TailDropLink(sim.forward.config, random.Random(1), blocks - 5)
    result = sim.run(10)
    assert result.completed
    assert bytes(pair.sink.data) == data
    assert sorted(sim.forward.dropped) == list(range(blocks - 5, blocks))
    assert result.redundant_bytes == 0
    assert result.duration < 0.5  # ~ data + 1.25 SRTT + report allowance + 1 RTT


def test_fixed_policy_paces_at_target() -> None:
    data = payload(6 * MB)
    pair = make_pair(data, policy="fixed", target_bps=100e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01))
    sim.sent_by_sender = []
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    data_times = [t for t, d in sim.sent_by_sender if d[2] == wire.PacketType.DATA]
    start, end = data_times[0], data_times[-1]
    rate = sending_rate_bps(sim.sent_by_sender, start, end)
    assert 95e6 <= rate <= 105e6


def test_fair_backs_off_at_a_bottleneck_and_bounds_the_queue() -> None:
    data = payload(15 * MB)
    bottleneck = LinkConfig(rate_bps=50e6, delay=0.02, queue_bytes=1 * MB)  # 160 ms queue
    result = transfer(data, bottleneck, policy="fair", target_bps=200e6)
    assert result.forward.queue_drops == 0
    assert 38e6 < result.goodput_bps <= 50e6
    assert result.sender.pacing_rate * 8 < 80e6  # backed off far below the 200 Mbit/s target
    assert result.forward.mean_queue_delay < 0.040
    assert result.forward.max_queue_delay < 0.100


def test_fair_at_a_shallow_bottleneck_follows_delivery() -> None:
    data = payload(8 * MB)
    bottleneck = LinkConfig(rate_bps=50e6, delay=0.02, queue_bytes=64_000)
    result = transfer(data, bottleneck, policy="fair", target_bps=200e6)
    assert result.goodput_bps > 35e6
    assert result.sender.bytes_retransmitted / len(data) < 0.15
    assert result.sender.pacing_rate * 8 < 80e6


@pytest.mark.parametrize("loss", [0.02, 0.10])
def test_fair_does_not_back_off_on_random_loss(loss: float) -> None:
    data = payload(30 * MB)
    link = LinkConfig(rate_bps=1e9, delay=0.02, loss=loss)
    pair = make_pair(data, policy="fair", target_bps=300e6)
    sim = Simulator(pair, link)
    rates: list[float] = []
    received: list[int] = []

    def sample(now: float, sim: Simulator) -> None:
        rates.append(sim.pair.sender.pacing_rate * 8)
        received.append(sim.pair.receiver.received_bytes)

    sim.hooks = [(t / 100, sample) for t in range(1, 300)]
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    reached = next(i for i, rate in enumerate(rates) if rate == pytest.approx(300e6))
    assert reached * 0.01 < 0.5  # start-up takes a handful of 40 ms rounds
    assert min(rates[reached:]) >= 0.9 * 300e6  # once there, loss alone never moved it
    # Goodput once at the target (0.2 s later, for the pipe to fill): the target less loss.
    steady = (received[reached + 40] - received[reached + 20]) * 8 / 0.2
    assert steady > 0.9 * 300e6 * (1 - loss) * wire.payload_size_for() / 1500


@pytest.mark.parametrize("policy", ["fair", "high", "low"])
def test_every_policy_completes_and_respects_limits(policy: str) -> None:
    data = payload(3 * MB)
    result = transfer(
        data,
        LinkConfig(rate_bps=100e6, delay=0.02, loss=0.01, queue_bytes=500_000),
        policy=policy,
        target_bps=80e6,
        min_bps=5e6,
    )
    assert 5e6 / 8 <= result.sender.pacing_rate <= 80e6 / 8


def test_live_set_rate_applies_within_one_rtt() -> None:
    data = payload(8 * MB)
    pair = make_pair(data, policy="fixed", target_bps=200e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.02))  # RTT 40 ms
    sim.sent_by_sender = []
    change_at = 0.15
    sim.hooks = [(change_at, lambda now, s: s.pair.sender.set_rate(target_bps=50e6))]
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    tap = sim.sent_by_sender
    before = sending_rate_bps(tap, change_at - 0.04, change_at)
    within_one_rtt = sending_rate_bps(tap, change_at + 0.004, change_at + 0.04)
    assert before == pytest.approx(200e6, rel=0.06)
    assert within_one_rtt == pytest.approx(50e6, rel=0.06)


def test_live_policy_change_keeps_going() -> None:
    data = payload(3 * MB)
    pair = make_pair(data, policy="fixed", target_bps=100e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01))
    sim.hooks = [(0.1, lambda now, s: s.pair.sender.set_rate(policy="fair", min_bps=10e6))]
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    assert pair.sender.rate_controller.min_bps == 10e6
    assert pair.sender.rate_controller.target_bps == 100e6


def _vanish(side: str, at: float) -> tuple[Pair, SimResult, Simulator]:
    data = payload(4 * MB)
    pair = make_pair(data, target_bps=50e6, idle_timeout=2.0)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01))

    def vanish(now: float, s: Simulator) -> None:
        if side == "sender":
            s.sender_alive = False
        else:
            s.receiver_alive = False

    sim.hooks = [(at, vanish)]
    survivor_events = sim.receiver_events if side == "sender" else sim.sender_events
    result = sim.run(10, until=lambda s: Timeout() in survivor_events)
    return pair, result, sim


def test_idle_timeout_when_the_sender_vanishes() -> None:
    pair, result, _sim = _vanish("sender", 0.2)
    assert Timeout() in result.receiver_events
    assert 2.0 <= result.duration - 0.2 <= 2.2
    assert not pair.receiver.is_alive
    assert pair.receiver.get_timer() is None


def test_idle_timeout_when_the_receiver_vanishes() -> None:
    pair, result, _sim = _vanish("receiver", 0.2)
    assert Timeout() in result.sender_events
    assert not pair.sender.is_alive
    # The sender kept probing, bounded: no flood of retransmissions into the void.
    assert pair.sender.bytes_retransmitted < 2 * MB


def test_close_is_delivered() -> None:
    data = payload(200_000)
    pair = make_pair(data, target_bps=50e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.01))
    result = sim.run(5)
    assert result.completed
    pair.sender.close(sim.now, code=0)
    result = sim.run(1, until=lambda s: any(isinstance(e, PeerClosed) for e in s.receiver_events))
    assert PeerClosed(0) in result.receiver_events
    assert not pair.receiver.is_alive and not pair.sender.is_alive


def test_download_direction_server_sends() -> None:
    """The UDP client (initiator) receives; the responder sends only after HELLO."""
    data = payload(2 * MB)
    pair = make_pair(data, sender_is_initiator=False, target_bps=100e6)
    sim = Simulator(pair, LinkConfig(rate_bps=1e9, delay=0.02))
    sim.sent_by_sender = []
    result = sim.run(10)
    assert result.completed and bytes(pair.sink.data) == data
    first_type = sim.sent_by_sender[0][1][2]
    assert first_type == wire.PacketType.HELLO_ACK
    assert sim.sent_by_sender[0][0] >= 0.02  # nothing before the HELLO arrived
