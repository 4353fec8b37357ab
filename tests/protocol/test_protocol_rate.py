"""Rate controllers against a toy closed-loop path (one report per 10 ms)."""

from __future__ import annotations

import pytest

from slipstream.errors import UnsupportedError
from slipstream.protocol.rate import (
    UNLIMITED_BPS,
    RateController,
    create_rate_controller,
    rate_controller_names,
    register_rate_controller,
)
from slipstream.protocol.rate.fixed import FixedRateController


def test_registry() -> None:
    assert {"fixed", "fair", "high", "low"} <= set(rate_controller_names())
    with pytest.raises(UnsupportedError):
        create_rate_controller("warp", target_bps=1e6)

    class Half(FixedRateController):
        @property
        def pacing_rate(self) -> float:
            return super().pacing_rate / 2

    register_rate_controller("half-test", Half)
    assert create_rate_controller("half-test", target_bps=8e6).pacing_rate == 5e5


def test_fixed_ignores_everything() -> None:
    fixed = create_rate_controller("fixed", target_bps=100e6)
    assert fixed.pacing_rate == 100e6 / 8
    fixed.on_report(1.0, delivered_bytes=1, interval=0.01, rtt=5.0, min_rtt=0.01, lost=99, acked=1)
    assert fixed.pacing_rate == 100e6 / 8
    fixed.set_target(None)
    assert fixed.pacing_rate == UNLIMITED_BPS / 8
    fixed.set_target(20e6)
    assert fixed.pacing_rate == 20e6 / 8


def drive(
    controller: RateController,
    *,
    seconds: float,
    capacity_bps: float,
    base_rtt: float,
    loss: float = 0.0,
    buffer_s: float = 0.2,
    start: float = 0.0,
) -> list[tuple[float, float, float]]:
    """A fluid bottleneck: queue grows when the rate exceeds capacity; random loss thins
    delivery. Returns (time, rate bytes/s, queue seconds) per report."""
    capacity = capacity_bps / 8
    queue, now, trace = 0.0, start, []
    history: list[float] = []
    while now < start + seconds:
        now += 0.01
        history.append(controller.pacing_rate)
        # What arrives now was sent one base RTT ago (coarse, but enough for a loop).
        sent = history[max(0, len(history) - 1 - round(base_rtt / 0.01))]
        queue = min(buffer_s, max(0.0, queue + (sent - capacity) * 0.01 / capacity))
        delivered = min(sent, capacity) * 0.01 * (1 - loss)
        blocks = max(1, round(sent * 0.01 / 1500))
        lost = round(blocks * loss)
        controller.on_report(
            now,
            delivered_bytes=round(delivered),
            interval=0.01,
            rtt=base_rtt + queue,
            min_rtt=base_rtt,
            lost=lost,
            acked=blocks - lost,
        )
        trace.append((now, controller.pacing_rate, queue))
    return trace


@pytest.mark.parametrize("policy", ["fair", "high", "low"])
def test_grows_to_target_on_a_free_path_even_with_random_loss(policy: str) -> None:
    controller = create_rate_controller(policy, target_bps=400e6, min_bps=1e6)
    trace = drive(controller, seconds=3, capacity_bps=10e9, base_rtt=0.05, loss=0.05)
    assert trace[-1][1] == pytest.approx(400e6 / 8)
    reached = next(t for t, rate, _ in trace if rate == pytest.approx(400e6 / 8))
    assert reached < 1.5
    assert all(rate <= 400e6 / 8 + 1e-6 for _, rate, _ in trace)


@pytest.mark.parametrize("policy", ["fair", "high", "low"])
def test_backs_off_at_a_bottleneck_but_not_below_min(policy: str) -> None:
    controller = create_rate_controller(policy, target_bps=1e9, min_bps=5e6)
    trace = drive(controller, seconds=6, capacity_bps=100e6, base_rtt=0.04)
    late = trace[len(trace) // 2 :]
    mean_rate = sum(rate for _, rate, _ in late) / len(late)
    assert 0.6 * 100e6 / 8 < mean_rate < 1.3 * 100e6 / 8
    mean_queue = sum(queue for _, _, queue in late) / len(late)
    assert mean_queue < 0.1
    assert all(rate >= 5e6 / 8 for _, rate, _ in trace)


def test_low_yields_more_queue_than_high_accepts() -> None:
    queues = {}
    for policy in ("low", "fair", "high"):
        controller = create_rate_controller(policy, target_bps=1e9)
        trace = drive(controller, seconds=6, capacity_bps=100e6, base_rtt=0.04)
        late = trace[len(trace) // 2 :]
        queues[policy] = sum(queue for _, _, queue in late) / len(late)
    assert queues["high"] > queues["fair"]


def test_min_above_path_and_live_limits() -> None:
    controller = create_rate_controller("fair", target_bps=200e6, min_bps=150e6)
    drive(controller, seconds=2, capacity_bps=50e6, base_rtt=0.04)
    assert controller.pacing_rate >= 150e6 / 8  # min floors every policy
    controller.set_min(0)
    controller.set_target(100e6)
    assert controller.pacing_rate <= 100e6 / 8  # a lowered target applies at once


def test_fair_start_up_first_doubling_counts_from_when_the_data_left() -> None:
    # Data leaves at t=0; reports arrive from t=RTT, each describing what left one RTT
    # earlier. The first round therefore began at 0, not at the first report: its doubling
    # comes once the round holds enough bytes, not a whole RTT after the first report.
    controller = create_rate_controller("fair", target_bps=1e9, min_bps=1e6)
    initial = controller.pacing_rate
    rtt, now, doubled_at = 0.1, 0.1, None
    while now < 0.5 and doubled_at is None:
        controller.on_report(
            now,
            delivered_bytes=round(initial * 0.01),
            interval=0.01,
            rtt=rtt,
            min_rtt=rtt,
            lost=0,
            acked=max(1, round(initial * 0.01 / 1500)),
        )
        if controller.pacing_rate > 1.5 * initial:
            doubled_at = now
        now += 0.01
    assert doubled_at is not None
    assert doubled_at < rtt + 0.08, f"first doubling at {doubled_at:.2f} s"
