"""``low``: a LEDBAT-like scavenger that uses only idle capacity (RFC 6817 in spirit).

It is ``fair``'s delay mode with three changes that make it the one that yields:

* its queue target is half of ``fair``'s, so next to a ``fair`` flow it backs off first;
* it never switches to ``fair``'s compete mode, so a TCP flow that fills the bottleneck
  buffer pushes it down (by up to half the delivery rate per round) to its minimum and
  keeps it there;
* it probes by 10 % per round, and does not restart its doubling start-up after calm
  rounds, so it never overshoots into someone else's traffic.

Alone on a path it still fills it: the first start-up finds the ceiling, and the FAST-style
rule (``delivered * (min_rtt + target) / (min_rtt + q)``) holds it there with a small queue.
``min`` floors it, as every policy.
"""

from __future__ import annotations

from .fair import FairRateController

LEDBAT_GAIN = 0.1  # per-round increase at an empty queue (fair probes by 25 %)


class LowRateController(FairRateController):
    queue_share = 0.5
    growth = LEDBAT_GAIN
    may_compete = False
    resumes_path = False

    def _grow(self, through: float, sent_rate: float) -> float:
        if self._qdelay >= self.queue_target / 2 or through < self.keeping_up * sent_rate:
            return self._rate
        if self._startup:
            return self._rate * 2  # only the first start-up: it ends at the first queue
        if sent_rate < 0.95 * self._rate:
            return self._rate  # the last increase is not visible in the reports yet
        return self._rate * (1 + self.growth)
