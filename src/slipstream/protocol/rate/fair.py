"""``fair`` and ``high``: a delivery-rate / minimum-RTT model with a queueing-delay guard.

The controller works in *rounds* of about one smoothed RTT. At the end of each round it
compares what the receiver got during the round with what we sent one RTT earlier (the
data those reports describe), and it watches the smoothed queueing delay
``q = RTT - min RTT``:

* ``q`` (the round's smallest RTT sample minus the path's minimum RTT, so one delayed
  report does not count as a queue) above the queue target: a queue is building at the
  bottleneck. Send at the measured delivery rate scaled the FAST-TCP way,
  ``delivered * (min_rtt + target) / (min_rtt + q)``, which settles with about ``target``
  seconds of queue. Basing it on the delivery rate, not on our own rate, means rounds in
  a row of the same standing queue do not compound into a collapse.
* delivery well below the send rate (after discounting the path's baseline loss): a
  shallow-buffered bottleneck is dropping the excess. Send at the delivery rate.
* otherwise, once the last change has been observed, grow: double per round in start-up,
  then ``growth`` per round.

Loss alone is never a congestion signal: random loss lowers delivery and send rate
alike, and the baseline loss (the lowest loss fraction of the last rounds) is divided out
before comparing them. That is what makes throughput independent of random loss.
"""

from __future__ import annotations

from collections import deque

from . import RateController

INITIAL_BPS = 10e6  # first round's rate; start-up doubles it every round
MIN_ROUND = 0.01  # seconds: rounds shorter than the report interval carry no information
MIN_ROUND_BYTES = 75_000  # about 50 datagrams
STARTUP_MIN_SAMPLE_BYTES = 30_000  # a report must carry ~20 datagrams to judge delivery
CALM_ROUNDS = 8  # rounds free of any congestion sign before start-up resumes
STARTUP_SHORTFALL = 0.7  # start-up doubles: a full pipe shows as about half delivered
RTT_GAIN = 1 / 8  # smoothing of the controller's own RTT (it sets the round length)


class FairRateController(RateController):
    queue_target = 0.030  # seconds of queueing delay we accept (low, the scavenger, takes 25)
    growth = 0.25  # per-round multiplicative probe once out of start-up
    shortfall = 0.85  # delivered / sent below this (after baseline loss) means a bottleneck
    keeping_up = 0.95  # ...and at or above this, the path takes all we send: we may grow
    max_cut = 0.5  # never below half the delivery rate on a delay signal alone
    min_round_blocks = 100  # loss fractions from fewer blocks are too noisy for the baseline

    def __init__(self, *, target_bps: float | None, min_bps: float = 0) -> None:
        super().__init__(target_bps=target_bps, min_bps=min_bps)
        self._rate = self.clamp(INITIAL_BPS / 8)
        self._startup = True
        self._calm_rounds = 0  # consecutive rounds without a sign of congestion
        self._startup_shortfalls = 0
        self._qdelay = 0.0  # the last round's queueing delay
        self._round_min_rtt: float | None = None
        self._srtt: float | None = None
        self._min_rtt: float | None = None
        self._round_start: float | None = None
        self._round_delivered = 0
        self._round_interval = 0.0
        self._round_lost = 0
        self._round_acked = 0
        # Baseline (random) loss: the lowest loss fraction among the last samples. Congestion
        # loss comes and goes with our rate; random loss is there in every sample.
        self._loss_history: deque[float] = deque(maxlen=10)
        self._loss_lost = 0
        self._loss_observed = 0
        # (time, rate) change points, enough to average the rate sent one RTT ago.
        self._rate_history: deque[tuple[float, float]] = deque(maxlen=64)

    @property
    def pacing_rate(self) -> float:
        return self._rate

    @property
    def in_startup(self) -> bool:
        return self._startup

    @property
    def queueing_delay(self) -> float:
        return self._qdelay

    def seed(self, pacing_rate: float) -> None:
        self._rate = self.clamp(pacing_rate)

    def _on_limits_changed(self) -> None:
        previous = self._rate
        self._rate = self.clamp(self._rate)
        if self._rate >= previous and self._rate < self.target_bps / 8:
            self._startup = True  # a raised target is reached fast, until congestion shows

    # --- the control loop ----------------------------------------------------------------

    def on_report(
        self,
        now: float,
        *,
        delivered_bytes: int,
        interval: float,
        rtt: float | None,
        min_rtt: float | None,
        lost: int,
        acked: int,
    ) -> None:
        if not self._rate_history:
            self._rate_history.append((now, self._rate))
        self._update_delay(rtt, min_rtt)
        if self._startup:
            self._check_startup_exit(now, delivered_bytes, interval, rtt)
        if self._round_start is None:
            self._round_start = now
        self._round_delivered += delivered_bytes
        self._round_interval += interval
        self._round_lost += lost
        self._round_acked += acked
        round_length = max(MIN_ROUND, self._srtt or MIN_ROUND)
        elapsed = now - self._round_start
        # A round also waits for enough datagrams: ratios of a dozen packets are noise.
        enough = self._round_delivered >= MIN_ROUND_BYTES or elapsed >= 4 * round_length
        if elapsed >= round_length and enough:
            self._end_round(now)

    def _update_delay(self, rtt: float | None, min_rtt: float | None) -> None:
        if rtt is None:
            return
        self._srtt = rtt if self._srtt is None else self._srtt + RTT_GAIN * (rtt - self._srtt)
        if min_rtt is not None:
            self._min_rtt = min_rtt
        if self._round_min_rtt is None or rtt < self._round_min_rtt:
            self._round_min_rtt = rtt

    def _check_startup_exit(
        self, now: float, delivered_bytes: int, interval: float, rtt: float | None
    ) -> None:
        """Start-up doubles every round, so waiting for the round's end to notice a full
        pipe doubles the overshoot: look at every report instead."""
        if (
            rtt is not None
            and self._min_rtt is not None
            and rtt - self._min_rtt > self.queue_target
        ):
            self._startup = False
            return
        if interval <= 0 or delivered_bytes < STARTUP_MIN_SAMPLE_BYTES:
            return
        through = delivered_bytes / interval / (1.0 - self._baseline_loss())
        shift = self._srtt or 0.0
        sent_rate = self._mean_rate_sent(now - interval - shift, now - shift)
        if through >= STARTUP_SHORTFALL * sent_rate:
            self._startup_shortfalls = 0
            return
        # Two reports in a row: one report's window may straddle a rate change.
        self._startup_shortfalls += 1
        if self._startup_shortfalls >= 2:
            self._startup = False
            self._rate = self.clamp(through)
            self._rate_history.append((now, self._rate))

    def _baseline_loss(self) -> float:
        return min(0.5, min(self._loss_history, default=0.0))

    def _end_round(self, now: float) -> None:
        assert self._round_start is not None
        if self._round_min_rtt is not None:
            base = self._min_rtt if self._min_rtt is not None else self._round_min_rtt
            self._qdelay = max(0.0, self._round_min_rtt - base)
        self._round_min_rtt = None
        self._loss_lost += self._round_lost
        self._loss_observed += self._round_lost + self._round_acked
        if self._loss_observed >= self.min_round_blocks:
            self._loss_history.append(self._loss_lost / self._loss_observed)
            self._loss_lost = self._loss_observed = 0
        # The reports of this round describe what we sent one RTT earlier.
        shift = self._srtt or 0.0
        sent_rate = self._mean_rate_sent(self._round_start - shift, now - shift)
        delivered_rate = (
            self._round_delivered / self._round_interval if self._round_interval > 0 else 0.0
        )
        previous = self._rate
        if sent_rate > 0 and delivered_rate > 0:
            self._rate = self.clamp(self._next_rate(delivered_rate, sent_rate))
        if self._rate != previous:
            self._rate_history.append((now, self._rate))
        self._round_start = now
        self._round_delivered = self._round_lost = self._round_acked = 0
        self._round_interval = 0.0

    def _next_rate(self, delivered_rate: float, sent_rate: float) -> float:
        # What the bottleneck passed, as if the random loss after it had not happened.
        through = delivered_rate / (1.0 - self._baseline_loss())
        base_rtt = self._min_rtt or 0.0
        if self._qdelay > self.queue_target:
            self._startup = False
            self._calm_rounds = 0
            scale = (base_rtt + self.queue_target) / (base_rtt + self._qdelay)
            return through * max(self.max_cut, scale)
        # Until the baseline loss is known, a shortfall may be random loss: hold, not cut.
        if through < self.shortfall * sent_rate and self._loss_history:
            self._startup = False
            self._calm_rounds = 0
            return through  # a full shallow-buffered bottleneck: send what gets through
        return self._grow(through, sent_rate)

    def _grow(self, through: float, sent_rate: float) -> float:
        if self._qdelay >= self.queue_target / 2 or through < self.keeping_up * sent_rate:
            self._calm_rounds = 0
            return self._rate  # near the target queue, or not all of it gets through: hold
        self._calm_rounds += 1
        if self._calm_rounds >= CALM_ROUNDS:
            self._startup = True  # long free of congestion: the path has room, ramp fast
        if self._startup:
            return self._rate * 2  # like BBR's start-up: find the ceiling in a few RTTs
        if sent_rate < 0.95 * self._rate:
            return self._rate  # the last increase is not visible in the reports yet
        return self._rate * (1 + self.growth)

    def _mean_rate_sent(self, start: float, end: float) -> float:
        """Mean pacing rate over ``[start, end]``."""
        if end <= start:
            return self._rate
        total = 0.0
        points = list(self._rate_history)
        for index, (since, rate) in enumerate(points):
            until = points[index + 1][0] if index + 1 < len(points) else end
            overlap = min(until, end) - max(since, start)
            if overlap > 0:
                total += overlap * rate
        # Before the first change point the rate was the first recorded one.
        first_time, first_rate = points[0]
        if start < first_time:
            total += (min(first_time, end) - start) * first_rate
        return total / (end - start)


class HighRateController(FairRateController):
    """``high``: about twice as aggressive as ``fair`` under congestion."""

    queue_target = 0.060  # twice the queue fair accepts...
    growth = 0.5  # ...and twice its probing step
