"""Rate controllers: the pacing rate a sender may use, behind a registry of policy names.

Rates given to a controller (``target_bps``, ``min_bps``) are in **bits** per second, as in
the transfer spec; :attr:`RateController.pacing_rate` is in **bytes** per second, because
the sender's token bucket counts bytes. Every policy stays within ``[min, target]``; with
no target it is capped at :data:`UNLIMITED_BPS`.

The sender calls :meth:`RateController.on_report` once per receiver REPORT (about every
10 ms) while it has data to send; a controller never sees app-limited intervals.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from slipstream.errors import UnsupportedError

UNLIMITED_BPS = 10e9  # the ceiling when a transfer has no target rate
# No adaptive policy goes below this even with min 0: a zero rate would never send again,
# so it could never learn that the path cleared.
FLOOR_BPS = 64e3


class RateController(ABC):
    """Decides the pacing rate. Subclasses keep their own state; all inputs carry ``now``."""

    def __init__(self, *, target_bps: float | None, min_bps: float = 0) -> None:
        self._target_bps = UNLIMITED_BPS if target_bps is None else float(target_bps)
        self._min_bps = float(min_bps)
        if self._target_bps <= 0 or self._min_bps < 0:
            raise ValueError("target must be positive and min non-negative")
        # Wire bytes of one full DATA datagram; the sender sets it (additive steps use it).
        self.datagram_bytes = 1500
        # What the sender really put on the wire in [start, end] (bytes/s), if it can say:
        # a sender short of CPU sends less than its pacing rate, and judging delivery
        # against the pacing rate would read that as a congested path and cut.
        self.sent_meter: Callable[[float, float], float | None] | None = None

    # --- limits, in bits per second ----------------------------------------------------

    @property
    def target_bps(self) -> float:
        return self._target_bps

    @property
    def min_bps(self) -> float:
        return self._min_bps

    def set_target(self, bps: float | None) -> None:
        self._target_bps = UNLIMITED_BPS if bps is None else float(bps)
        self._on_limits_changed()

    def set_min(self, bps: float) -> None:
        self._min_bps = float(bps)
        self._on_limits_changed()

    def clamp(self, rate_bytes: float) -> float:
        """``rate_bytes`` held inside ``[min, target]`` (target wins if min exceeds it)."""
        ceiling = self._target_bps / 8
        return min(ceiling, max(self._min_bps / 8, FLOOR_BPS / 8, rate_bytes))

    def _on_limits_changed(self) -> None:  # noqa: B027 - optional hook, no-op default
        """Hook: re-clamp the current rate so a live change applies at once."""

    # --- the control loop ----------------------------------------------------------------

    @property
    @abstractmethod
    def pacing_rate(self) -> float:
        """Bytes per second the sender may put on the wire (IP datagrams, headers included)."""

    @abstractmethod
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
        """One receiver report: bytes delivered during ``interval`` seconds of receiver time,
        the RTT sample it gave, the path's minimum RTT, blocks newly declared lost, and
        blocks newly acknowledged."""

    def seed(self, pacing_rate: float) -> None:  # noqa: B027 - optional hook, no-op default
        """Start from ``pacing_rate`` bytes/s (used when the policy changes mid-transfer)."""

    def resume_path(self, pacing_rate: float, min_rtt: float) -> None:  # noqa: B027
        """A hint from an earlier session on this path: it delivered ``pacing_rate`` bytes/s
        at a minimum RTT of ``min_rtt`` s. Adaptive policies may start nearer to it."""

    def path_estimate(self) -> PathEstimate | None:
        """What this session learned of the path, for the next one (None: nothing sure)."""
        return None


@dataclass(frozen=True)
class PathEstimate:
    """A path's capacity as a finished session saw it (see engine/pathmemory.py)."""

    rate: float  # bytes/s the path delivered at its best
    min_rtt: float  # seconds


RateControllerFactory = Callable[..., RateController]
_REGISTRY: dict[str, RateControllerFactory] = {}


def register_rate_controller(name: str, factory: RateControllerFactory) -> None:
    """Make a policy selectable by name; ``factory(target_bps=..., min_bps=...)``."""
    _REGISTRY[name] = factory


def create_rate_controller(
    name: str, *, target_bps: float | None, min_bps: float = 0
) -> RateController:
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise UnsupportedError(f"Unknown rate policy {name!r}") from None
    return factory(target_bps=target_bps, min_bps=min_bps)


def rate_controller_names() -> list[str]:
    return sorted(_REGISTRY)


def _register_builtins() -> None:
    from .fair import FairRateController, HighRateController
    from .fixed import FixedRateController
    from .low import LowRateController

    register_rate_controller("fixed", FixedRateController)
    register_rate_controller("fair", FairRateController)
    register_rate_controller("high", HighRateController)
    register_rate_controller("low", LowRateController)


_register_builtins()
