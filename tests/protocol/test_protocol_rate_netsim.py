"""Each rate policy against the virtual-time link, alone and next to competing traffic.

The links here are small (20-50 Mbit/s) so every scenario costs well under two seconds of
CPU; the controllers only see rates relative to the path, so the behaviour carries over.
"""

from __future__ import annotations

import os

import pytest

from netsim import CrossFlow, LinkConfig, Simulator, make_pair
from slipstream.protocol import wire
from slipstream.protocol.rate import PathEstimate

PAYLOAD_SHARE = wire.payload_size_for() / 1500  # goodput share of a full 1500-byte datagram


def run_for(
    policy: str,
    *,
    seconds: float,
    rate_bps: float,
    rtt: float,
    loss: float = 0.0,
    cross: list[CrossFlow] | None = None,
    target_bps: float | None = None,
    min_bps: float = 0.0,
    queue_bdp: float = 1.0,
    hint: PathEstimate | None = None,
) -> tuple[Simulator, list[tuple[float, int]]]:
    """Run ``seconds`` of virtual time; returns the simulator and (time, received bytes).
    ``hint``: what an earlier session on the path remembered (careful resume)."""
    delay = rtt / 2
    queue = max(64 * 1500, int(rate_bps / 8 * rtt * queue_bdp))
    size = int(rate_bps / 8 * seconds * 1.5)
    pair = make_pair(os.urandom(size), policy=policy, target_bps=target_bps, min_bps=min_bps)
    if hint is not None:
        pair.sender.rate_controller.resume_path(hint.rate, hint.min_rtt)
    sim = Simulator(
        pair,
        LinkConfig(rate_bps=rate_bps, delay=delay, loss=loss, queue_bytes=queue),
        LinkConfig(rate_bps=rate_bps, delay=delay),
    )
    sim.cross = cross or []
    received: list[tuple[float, int]] = []

    def sample(now: float, s: Simulator) -> None:
        received.append((now, s.pair.receiver.received_bytes))

    sim.hooks = [(t / 10, sample) for t in range(1, int(seconds * 10) + 1)]
    sim.run(seconds + 0.01, until=lambda s: s.now >= seconds)
    return sim, received


def goodput_bps(received: list[tuple[float, int]], start: float, end: float) -> float:
    first = next(b for t, b in received if t >= start - 1e-9)
    last = next(b for t, b in received if t >= end - 1e-9)
    return (last - first) * 8 / (end - start)


@pytest.mark.parametrize("policy", ["fair", "high", "low"])
def test_alone_converges_to_the_bottleneck_and_bounds_the_queue(policy: str) -> None:
    rate, rtt = 50e6, 0.04
    sim, received = run_for(policy, seconds=6, rate_bps=rate, rtt=rtt)
    steady = goodput_bps(received, 2.0, 6.0)
    assert steady == pytest.approx(rate * PAYLOAD_SHARE, rel=0.10)
    # The standing queue a lone flow adds stays well under its own base RTT (1.5x RTT in
    # all); the drop-tail limit here is one BDP, so a runaway flow would show 40 ms.
    assert sim.forward.stats.mean_queue_delay < 0.5 * rtt


def test_fair_fills_a_long_lossy_path() -> None:
    """100 ms, 2 % random loss, one BDP of buffer: loss alone never slows it down."""
    rate = 30e6
    _sim, received = run_for("fair", seconds=8, rate_bps=rate, rtt=0.1, loss=0.02)
    assert goodput_bps(received, 3.0, 8.0) > 0.9 * rate * PAYLOAD_SHARE * 0.98


def test_fair_shares_with_a_tcp_flow() -> None:
    rate = 20e6
    tcp = CrossFlow("tcp")
    sim, received = run_for("fair", seconds=20, rate_bps=rate, rtt=0.05, cross=[tcp])
    ours = goodput_bps(received, 5.0, 20.0)
    theirs = tcp.rate_bps_between(5.0, 20.0)
    share = ours / (ours + theirs)
    assert 0.35 < share < 0.65, (ours, theirs)
    assert ours + theirs > 0.85 * rate * PAYLOAD_SHARE  # together they still fill the link


def test_low_yields_to_a_tcp_flow() -> None:
    rate = 20e6
    tcp = CrossFlow("tcp")
    _sim, received = run_for("low", seconds=12, rate_bps=rate, rtt=0.05, cross=[tcp])
    ours = goodput_bps(received, 4.0, 12.0)
    theirs = tcp.rate_bps_between(4.0, 12.0)
    assert theirs > 0.85 * rate * PAYLOAD_SHARE
    assert ours < 0.1 * rate


def test_low_backs_off_when_a_competing_flow_appears() -> None:
    rate = 40e6
    cbr = CrossFlow("cbr", start=3.0, rate_bps=24e6)
    _sim, received = run_for("low", seconds=9, rate_bps=rate, rtt=0.04, cross=[cbr])
    before = goodput_bps(received, 1.5, 3.0)
    after = goodput_bps(received, 5.0, 9.0)
    assert before > 0.85 * rate * PAYLOAD_SHARE  # alone it used the whole link
    assert after < 0.45 * rate  # with 60 % taken it fits in what is left...
    assert after > 0.2 * rate  # ...and still uses the idle part
    assert cbr.rate_bps_between(5.0, 9.0) > 0.97 * 24e6  # the other flow lost nothing


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_fixed_ignores_loss_and_competition(loss: float) -> None:
    rate = 40e6
    tcp = CrossFlow("tcp")
    sim, _received = run_for(
        "fixed", seconds=4, rate_bps=rate, rtt=0.04, loss=loss, target_bps=15e6, cross=[tcp]
    )
    assert sim.pair.sender.pacing_rate * 8 == pytest.approx(15e6)
    sent = sim.pair.sender.wire_bytes_sent * 8 / 4
    assert sent == pytest.approx(15e6, rel=0.05)


@pytest.mark.parametrize("policy", ["fair", "low", "high"])
def test_lowered_target_takes_effect_within_one_rtt(policy: str) -> None:
    rate, rtt, change_at = 50e6, 0.04, 2.0
    data = os.urandom(int(rate / 8 * 4))
    pair = make_pair(data, policy=policy, target_bps=None)
    sim = Simulator(pair, LinkConfig(rate_bps=rate, delay=rtt / 2, queue_bytes=250_000))
    sim.sent_by_sender = []
    sim.hooks = [(change_at, lambda now, s: s.pair.sender.set_rate(target_bps=10e6))]
    sim.run(3, until=lambda s: s.now >= 3)
    window = [
        (t, d)
        for t, d in sim.sent_by_sender
        if change_at + 0.002 <= t < change_at + rtt and d[2] == wire.PacketType.DATA
    ]
    sent_bps = sum(len(d) + 28 for _t, d in window) * 8 / (rtt - 0.002)
    assert sent_bps < 10e6 * 1.1
    assert sim.pair.sender.pacing_rate * 8 <= 10e6 + 1


def test_min_rate_floors_fair_under_competition() -> None:
    rate = 20e6
    tcp = CrossFlow("tcp")
    sim, received = run_for("low", seconds=8, rate_bps=rate, rtt=0.04, cross=[tcp], min_bps=6e6)
    assert sim.pair.sender.pacing_rate * 8 >= 6e6
    assert goodput_bps(received, 3.0, 8.0) > 0.8 * 6e6 * PAYLOAD_SHARE


# --- careful resume: a remembered path -------------------------------------------------------


def _received_at(received: list[tuple[float, int]], when: float) -> int:
    return next(b for t, b in received if t >= when - 1e-9)


def test_a_remembered_path_is_filled_sooner() -> None:
    rate, rtt = 50e6, 0.1
    _sim, cold = run_for("fair", seconds=1.5, rate_bps=rate, rtt=rtt)
    hint = PathEstimate(rate / 8, rtt)
    sim, warm = run_for("fair", seconds=1.5, rate_bps=rate, rtt=rtt, hint=hint)
    # Cold start-up doubles from 10 Mbit/s for ~3 RTTs; warm jumps to half the old rate
    # after one RTT and is full a round later.
    assert _received_at(warm, 0.6) > 1.4 * _received_at(cold, 0.6)
    assert goodput_bps(warm, 0.4, 1.5) > 0.9 * rate * PAYLOAD_SHARE
    # The jump adds to start-up's overshoot, boundedly (cold: ~0.35 RTT over these 1.5 s).
    assert sim.forward.stats.mean_queue_delay < 0.6 * rtt


def test_a_stale_memory_of_a_faster_path_settles_to_the_slower_one() -> None:
    rate, rtt = 20e6, 0.05
    hint = PathEstimate(8 * rate / 8, rtt)  # remembered four times the capacity
    sim, received = run_for("fair", seconds=6, rate_bps=rate, rtt=rtt, hint=hint)
    assert goodput_bps(received, 2.0, 6.0) == pytest.approx(rate * PAYLOAD_SHARE, rel=0.10)
    assert sim.forward.stats.mean_queue_delay < 0.5 * rtt


def test_a_memory_from_another_rtt_is_ignored() -> None:
    rate, rtt = 50e6, 0.1
    _sim, cold = run_for("fair", seconds=1.0, rate_bps=rate, rtt=rtt)
    elsewhere = PathEstimate(rate / 8, rtt / 4)  # same rate, another path
    _sim, hinted = run_for("fair", seconds=1.0, rate_bps=rate, rtt=rtt, hint=elsewhere)
    assert _received_at(hinted, 0.6) == pytest.approx(_received_at(cold, 0.6), rel=0.05)


def test_low_never_jumps_on_a_memory() -> None:
    rate, rtt = 50e6, 0.1
    _sim, cold = run_for("low", seconds=1.0, rate_bps=rate, rtt=rtt)
    hint = PathEstimate(rate / 8, rtt)
    _sim, hinted = run_for("low", seconds=1.0, rate_bps=rate, rtt=rtt, hint=hint)
    assert _received_at(hinted, 0.6) == pytest.approx(_received_at(cold, 0.6), rel=0.05)


def test_a_session_reports_what_it_learned_of_the_path() -> None:
    rate, rtt = 30e6, 0.04
    sim, _received = run_for("fair", seconds=4, rate_bps=rate, rtt=rtt)
    estimate = sim.pair.sender.rate_controller.path_estimate()
    assert estimate is not None
    assert estimate.rate * 8 == pytest.approx(rate, rel=0.15)
    assert estimate.min_rtt == pytest.approx(rtt, rel=0.2)


def test_a_session_still_in_start_up_has_no_estimate() -> None:
    sim, _received = run_for("fair", seconds=0.25, rate_bps=50e6, rtt=0.1)
    assert sim.pair.sender.rate_controller.path_estimate() is None
