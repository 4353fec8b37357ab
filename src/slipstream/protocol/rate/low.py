"""``low``: a LEDBAT-like scavenger that yields to other traffic (RFC 6817 in spirit).

Per round it moves the rate in proportion to how far the smoothed queueing delay is from a
25 ms target: up to +25 % when the queue is empty, down as the queue grows past the target.
It keeps ``fair``'s delivery-shortfall guard and start-up, and ``min`` still floors it.
"""

from __future__ import annotations

from .fair import FairRateController

LEDBAT_TARGET = 0.025
LEDBAT_GAIN = 0.25


class LowRateController(FairRateController):
    queue_target = LEDBAT_TARGET
    growth = LEDBAT_GAIN

    def _next_rate(self, delivered_rate: float, sent_rate: float) -> float:
        if self._startup and self._qdelay < self.queue_target / 2:
            return super()._next_rate(delivered_rate, sent_rate)
        self._startup = False
        through = delivered_rate / (1.0 - self._baseline_loss())
        if through < self.shortfall * sent_rate:
            return max(through, self._rate * self.max_cut)
        off_target = (self.queue_target - self._qdelay) / self.queue_target
        factor = 1 + LEDBAT_GAIN * max(-2.0, min(1.0, off_target))
        if factor > 1 and sent_rate < 0.95 * self._rate:
            return self._rate  # wait to see the last increase before probing further
        return self._rate * factor
