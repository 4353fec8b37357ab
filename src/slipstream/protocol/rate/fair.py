"""``fair`` and ``high``: a delivery-rate / minimum-RTT model with a queueing-delay guard.

The controller works in *rounds* of about one smoothed RTT. At the end of each round it
compares what the receiver got during the round with what we sent one RTT earlier (the
data those reports describe), and it watches the queueing delay ``q`` (the round's smallest
RTT sample minus the path's minimum RTT, so one delayed report does not count as a queue).

It has two modes.

**delay** (the normal one, FAST-TCP / FASP style):

* ``q`` above the queue target: a queue is building at the bottleneck. Send at the
  measured delivery rate scaled the FAST-TCP way,
  ``delivered * (min_rtt + target) / (min_rtt + q)``, which settles with about ``target``
  seconds of queue. Basing it on the delivery rate, not on our own rate, means rounds in a
  row of the same standing queue do not compound into a collapse (on loopback the "queue"
  is the receiver's socket buffer while its CPU catches up: the same rule holds the sender
  at what the receiver can take).
* delivery well below the send rate (after discounting the path's baseline loss): a
  shallow-buffered bottleneck is dropping the excess. Send at the delivery rate.
* otherwise, once the last change has been observed, grow: double per round in start-up,
  then ``growth`` per round.

The queue target is a quarter of the minimum RTT, between 5 and 30 ms, so a lone flow adds
little delay on short paths and still rides out scheduler noise.

**compete**: a delay-based flow starves next to a loss-based one (TCP CUBIC fills any
drop-tail buffer, so the queue never drains however far we cut). When the queue stays
above the target for several rounds in a row although we cut, someone else holds it; the
controller then stops reacting to delay and runs a TCP-like AIMD on the rate: add a few
datagrams per RTT each round, and cut by ``compete_beta`` on a round whose loss is clearly
above the path's random-loss baseline (at most once per RTT, as TCP does per loss event).
Random loss alone is still never a congestion signal. Once the queue drains, the
competitor is gone and the delay mode resumes.

Loss alone is never a congestion signal in the delay mode: random loss lowers delivery and
send rate alike, and the baseline loss is divided out before comparing them. That is what
makes throughput independent of random loss.
"""

from __future__ import annotations

import math
from collections import deque

from . import PathEstimate, RateController

INITIAL_BPS = 10e6  # first round's rate; start-up doubles it every round
MIN_ROUND = 0.01  # seconds: rounds shorter than the report interval carry no information
MIN_ROUND_BYTES = 75_000  # about 50 datagrams
STARTUP_MIN_SAMPLE_BYTES = 30_000  # a report must carry ~20 datagrams to judge delivery
CALM_ROUNDS = 8  # rounds free of any congestion sign before start-up resumes
STARTUP_SHORTFALL = 0.7  # start-up doubles: a full pipe shows as about half delivered
RTT_GAIN = 1 / 8  # smoothing of the controller's own RTT (it sets the round length)
QUEUE_RTT_FRACTION = 0.25  # queue target as a share of the minimum RTT...
MIN_QUEUE_TARGET = 0.005  # ...but at least this (scheduler noise on a busy host)...
MAX_QUEUE_TARGET = 0.030  # ...and at most this (FASP's order of magnitude)
COMPETE_AFTER_ROUNDS = 6  # rounds in a row with a standing queue despite our cuts
COMPETE_LOSS_EVENTS = 2  # congestion-loss rounds within COMPETE_WINDOW: someone fills it
COMPETE_WINDOW = 40  # rounds
COMPETE_CALM_ROUNDS = 40  # compete mode ends after this many rounds without congestion...
CONGESTION_SIGMAS = 3.0  # losses this many standard deviations above the random baseline
NEAR_CEILING = 0.9  # within this share of the recent best delivery rate, probe gently...
GENTLE_PROBE = 0.25  # ...with this fraction of the growth step (less overshoot, less queue)
CEILING_ROUNDS = 10  # rounds the best delivery rate is remembered
STALL_SHARE = 0.7  # a round delivering less than this share of the recent best: a stall?
LOSS_ANCHOR_WINDOW = 30.0  # seconds: the lowest loss seen this long ago still bounds...
LOSS_ANCHOR_SLACK = 0.01  # ...the baseline, to twice that plus this
RESUME_SHARE = 0.5  # a remembered path: start-up jumps to this share of its old rate...
RESUME_RTT_RANGE = (0.67, 1.5)  # ...if the RTT says it is still the same path
ESTIMATE_AFTER_ROUNDS = 5  # rounds past start-up before a session's estimate means much


class FairRateController(RateController):
    queue_share = 1.0  # multiplies the queue target (high accepts twice the queue)
    growth = 0.25  # per-round multiplicative probe once out of start-up
    shortfall = 0.85  # delivered / sent below this (after baseline loss) means a bottleneck
    keeping_up = 0.95  # ...and at or above this, the path takes all we send: we may grow
    max_cut = 0.5  # never below half the delivery rate on a delay signal alone
    min_round_blocks = 100  # loss fractions from fewer blocks are too noisy for the baseline
    compete_beta = 0.7  # compete mode: multiplicative decrease per loss event (CUBIC's)
    compete_step = 1.0  # compete mode: datagrams added per RTT (Reno's, about CUBIC's here)
    may_compete = True  # low never competes: it yields instead
    resumes_path = True  # low never jumps ahead on an old session's word

    def __init__(self, *, target_bps: float | None, min_bps: float = 0) -> None:
        super().__init__(target_bps=target_bps, min_bps=min_bps)
        self._rate = self.clamp(INITIAL_BPS / 8)
        self._startup = True
        self._compete = False
        self._standing_rounds = 0  # consecutive rounds with q above the target
        self._round_index = 0
        self._startup_left_at = 0  # round index when start-up last ended
        self._congestion_rounds: deque[int] = deque(maxlen=COMPETE_LOSS_EVENTS)
        self._cut_guard_until = 0.0  # compete mode: one cut per loss event (one RTT)
        self._calm_rounds = 0  # consecutive rounds without a sign of congestion
        self._startup_shortfalls = 0
        self._shortfall_rounds = 0  # consecutive rounds delivering clearly less than sent
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
        # (time, loss fraction) of the last LOSS_ANCHOR_WINDOW: when a shallow buffer drops
        # our excess in every round, the short history alone would mistake that congestion
        # loss for random loss, believe it delivers more than it does, and never back off.
        self._loss_anchor: deque[tuple[float, float]] = deque()
        self._loss_lost = 0
        self._loss_observed = 0
        # (time, rate) change points, enough to average the rate sent one RTT ago.
        self._rate_history: deque[tuple[float, float]] = deque(maxlen=64)
        # The best delivery rates of the last rounds: where the path's ceiling was.
        self._recent_through: deque[float] = deque(maxlen=CEILING_ROUNDS)
        self._resume_hint: PathEstimate | None = None
        self._rounds_past_startup = 0

    @property
    def pacing_rate(self) -> float:
        return self._rate

    @property
    def in_startup(self) -> bool:
        return self._startup

    @property
    def competing(self) -> bool:
        """True while the controller runs its TCP-like mode next to a queue-filling flow."""
        return self._compete

    @property
    def queueing_delay(self) -> float:
        return self._qdelay

    @property
    def queue_target(self) -> float:
        """Seconds of standing queue the delay mode aims for (scaled by ``queue_share``)."""
        base = self._min_rtt if self._min_rtt is not None else MAX_QUEUE_TARGET / QUEUE_RTT_FRACTION
        target = min(MAX_QUEUE_TARGET, max(MIN_QUEUE_TARGET, QUEUE_RTT_FRACTION * base))
        return target * self.queue_share

    def seed(self, pacing_rate: float) -> None:
        self._rate = self.clamp(pacing_rate)

    # --- memory of the path between sessions (careful resume) ------------------------------

    def resume_path(self, pacing_rate: float, min_rtt: float) -> None:
        if self.resumes_path and pacing_rate > 0 and min_rtt > 0:
            self._resume_hint = PathEstimate(pacing_rate, min_rtt)

    def path_estimate(self) -> PathEstimate | None:
        """The best recent delivery rate, once start-up has found the ceiling; a session
        that never left start-up (too short, or app-limited) has not seen the path."""
        if self._rounds_past_startup < ESTIMATE_AFTER_ROUNDS or self._min_rtt is None:
            return None
        if not self._recent_through:
            return None
        return PathEstimate(max(self._recent_through), self._min_rtt)

    def _maybe_resume(self, now: float, rtt: float) -> None:
        """Like the IETF's careful resume: the first RTT sample must match the remembered
        path; then start-up jumps to half the rate that path delivered, and goes on from
        there (its queue and shortfall checks catch a path that has become slower)."""
        hint, self._resume_hint = self._resume_hint, None
        assert hint is not None
        low, high = RESUME_RTT_RANGE
        base = self._min_rtt if self._min_rtt is not None else rtt
        if not self._startup or not low * hint.min_rtt <= base <= high * hint.min_rtt:
            return
        jump = self.clamp(hint.rate * RESUME_SHARE)
        if jump > self._rate:
            self._rate = jump
            self._rate_history.append((now, jump))

    def _on_limits_changed(self) -> None:
        previous = self._rate
        self._rate = self.clamp(self._rate)
        if self._rate >= previous and self._rate < self.target_bps / 8 and not self._compete:
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
        if self._resume_hint is not None and rtt is not None:
            self._maybe_resume(now, rtt)
        if self._startup:
            self._check_startup_exit(now, delivered_bytes, interval, rtt)
        if self._round_start is None:
            # The first report describes data sent one RTT ago: start-up's first round
            # began then. Counting from this report made the first doubling wait two RTTs.
            self._round_start = now - (rtt or 0.0) if self._startup else now
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
        sent_rate = self._sent_rate(now - interval - shift, now - shift)
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
        recent = min(self._loss_history, default=0.0)
        anchor = min((frac for _t, frac in self._loss_anchor), default=recent)
        return min(0.5, recent, 2 * anchor + LOSS_ANCHOR_SLACK)

    def _random_loss(self) -> float:
        """The typical (median) loss fraction of the last samples: the random-loss level."""
        if not self._loss_history:
            return 0.0
        ordered = sorted(self._loss_history)
        return min(0.5, ordered[len(ordered) // 2])

    def _congested(self) -> bool:
        """This round lost clearly more than random loss explains (a binomial 3-sigma test)."""
        observed = self._round_lost + self._round_acked
        if observed <= 0:
            return False
        expected = self._random_loss() * observed
        return self._round_lost > expected + CONGESTION_SIGMAS * math.sqrt(expected) + 2

    def _end_round(self, now: float) -> None:
        assert self._round_start is not None
        if self._round_min_rtt is not None:
            base = self._min_rtt if self._min_rtt is not None else self._round_min_rtt
            self._qdelay = max(0.0, self._round_min_rtt - base)
        self._round_min_rtt = None
        congested = self._congested()
        self._round_index += 1
        if not self._startup:
            self._rounds_past_startup += 1
        if self._startup:
            self._startup_left_at = self._round_index
        elif congested and self._round_index - self._startup_left_at > 4:
            # (a start-up overshoot's drops are ours, not a competitor's)
            self._congestion_rounds.append(self._round_index)
        self._loss_lost += self._round_lost
        self._loss_observed += self._round_lost + self._round_acked
        if self._loss_observed >= self.min_round_blocks:
            fraction = self._loss_lost / self._loss_observed
            self._loss_history.append(fraction)
            self._loss_anchor.append((now, fraction))
            while now - self._loss_anchor[0][0] > LOSS_ANCHOR_WINDOW:
                self._loss_anchor.popleft()
            self._loss_lost = self._loss_observed = 0
        # The reports of this round describe what we sent one RTT earlier.
        shift = self._srtt or 0.0
        sent_rate = self._sent_rate(self._round_start - shift, now - shift)
        delivered_rate = (
            self._round_delivered / self._round_interval if self._round_interval > 0 else 0.0
        )
        previous = self._rate
        if sent_rate > 0 and delivered_rate > 0:
            if self._compete:
                rate = self._compete_rate(now, delivered_rate, sent_rate, congested)
            else:
                rate = self._next_rate(delivered_rate, sent_rate)
                self._watch_competition(delivered_rate)
            self._rate = self.clamp(rate)
        if self._rate != previous:
            self._rate_history.append((now, self._rate))
        self._round_start = now
        self._round_delivered = self._round_lost = self._round_acked = 0
        self._round_interval = 0.0

    # --- delay mode ------------------------------------------------------------------------

    def _next_rate(self, delivered_rate: float, sent_rate: float) -> float:
        # What the bottleneck passed, as if the random loss after it had not happened.
        through = delivered_rate / (1.0 - self._baseline_loss())
        self._recent_through.append(through)
        base_rtt = self._min_rtt or 0.0
        target = self.queue_target
        if self._qdelay > target:
            self._startup = False
            self._calm_rounds = 0
            scale = (base_rtt + target) / (base_rtt + self._qdelay)
            return through * max(self.max_cut, scale)
        # Until the baseline loss is known, a shortfall may be random loss: hold, not cut.
        if through < self.shortfall * sent_rate and self._loss_history:
            self._startup = False
            self._calm_rounds = 0
            self._shortfall_rounds += 1
            if through >= STALL_SHARE * max(self._recent_through):
                return through  # a full shallow-buffered bottleneck: send what gets through
            # Far below what the path delivered moments ago: more likely a receiver that lost
            # the CPU for a while than a path that shrank. Hold a round, then at most halve.
            if self._shortfall_rounds < 2:
                return self._rate
            return max(through, self._rate * self.max_cut)
        self._shortfall_rounds = 0
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
        if self._rate >= NEAR_CEILING * max(self._recent_through):
            return self._rate * (1 + self.growth * GENTLE_PROBE)  # near the known ceiling
        return self._rate * (1 + self.growth)

    def _watch_competition(self, delivered_rate: float) -> None:
        """Signs of a loss-based flow next to us: compete with it.

        Alone, the delay mode keeps the queue near its target and a buffer of at least that
        size never overflows. So (a) a queue that stands for several rounds although we cut
        (our cuts drain our own queue within a round or two), or (b) repeated congestion
        loss outside start-up, means someone else fills the buffer.
        """
        if not self.may_compete:
            return
        if self._qdelay <= self.queue_target:
            self._standing_rounds = 0
        else:
            self._standing_rounds += 1
        events = self._congestion_rounds
        lossy = (
            len(events) >= COMPETE_LOSS_EVENTS and self._round_index - events[0] <= COMPETE_WINDOW
        )
        if self._standing_rounds >= COMPETE_AFTER_ROUNDS or lossy:
            self._compete = True
            self._startup = False
            self._standing_rounds = 0
            self._rate = max(self._rate, delivered_rate)  # start from the share we hold

    # --- compete mode ----------------------------------------------------------------------

    def _compete_rate(
        self, now: float, delivered_rate: float, sent_rate: float, congested: bool
    ) -> float:
        last_event = self._congestion_rounds[-1] if self._congestion_rounds else 0
        calm = self._round_index - last_event >= COMPETE_CALM_ROUNDS
        if calm and self._qdelay < self.queue_target / 2:
            # No overflow for a while and the queue drained: nobody fills it any more.
            self._compete = False
            self._congestion_rounds.clear()
            return self._next_rate(delivered_rate, sent_rate)
        srtt = self._srtt or MIN_ROUND
        if congested and now >= self._cut_guard_until:
            # The reports describe data sent one RTT ago: the next round still shows the
            # same loss event, so cut once per event as TCP does.
            self._cut_guard_until = now + 2 * srtt
            through = delivered_rate / (1.0 - self._random_loss())
            return min(self._rate, through) * self.compete_beta
        return self._rate + self.compete_step * self.datagram_bytes / max(srtt, MIN_ROUND)

    def _sent_rate(self, start: float, end: float) -> float:
        """What we sent in ``[start, end]``: the sender's own count if it keeps one (it may
        have sent less than the pacing rate allowed), else the mean pacing rate."""
        paced = self._mean_rate_sent(start, end)
        measured = self.sent_meter(start, end) if self.sent_meter is not None else None
        return paced if measured is None else min(paced, measured)

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

    queue_share = 2.0  # twice the queue fair accepts...
    growth = 0.5  # ...twice its probing step...
    compete_step = 2.0  # ...and in compete mode twice the additive step with a gentler cut
    compete_beta = 0.85
