"""``fixed``: pace at the target whatever the network does (FASP's "not recommended" mode)."""

from __future__ import annotations

from . import UNLIMITED_BPS, RateController


class FixedRateController(RateController):
    @property
    def pacing_rate(self) -> float:
        # min only matters if someone sets it above the target: the target wins.
        return min(self.target_bps, UNLIMITED_BPS) / 8

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
        """Loss and delay are deliberately ignored."""
