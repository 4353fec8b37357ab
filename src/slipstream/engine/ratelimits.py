"""Rate settings of a session and the rules a live change must pass, shared by both ends.

Three sources of limits meet here:

* the **spec** locks a field (``lock_rate_policy``, ``lock_target_rate``, ``lock_min_rate``)
  and may cap it (``target_rate_cap_kbps``, ``min_rate_cap_kbps``, ``rate_policy_allowed``:
  the most aggressive policy allowed, in the order low < fair < high < fixed);
* the **server** caps a user (:class:`RateLimits`, sent to the client in ACCEPT): a target
  cap, a minimum cap and the policies the user may pick;
* the server's **aggregate** cap, shared by every session, lowers a session's ceiling as
  sessions come and go (:attr:`RateState.ceiling_kbps`).

Opening a session clamps the requested settings into the limits (Aspera does the same: a
too-high target is lowered, not refused). A *live* change that breaks a lock or a cap is
refused with :class:`~slipstream.errors.RateLocked` (code 55), so the caller learns it
asked for something it may not have.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from slipstream.errors import RateLocked, UsageError

POLICY_ORDER = ("low", "fair", "high", "fixed")  # least to most aggressive
# When a requested policy is not allowed, the closest allowed one in this order is used.
_FALLBACK_ORDER = ("fair", "low", "high", "fixed")


@dataclass(frozen=True)
class RateLimits:
    """What a server allows one session: caps in kbit/s (None: no cap), allowed policies."""

    target_cap_kbps: int | None = None
    min_cap_kbps: int | None = None
    policies: tuple[str, ...] | None = None  # None: all of them

    def to_wire(self) -> dict[str, Any]:
        return {
            "target_cap_kbps": self.target_cap_kbps,
            "min_cap_kbps": self.min_cap_kbps,
            "policies": list(self.policies) if self.policies is not None else None,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any] | None) -> RateLimits:
        body = body or {}
        policies = body.get("policies")
        return cls(
            target_cap_kbps=_opt_int(body.get("target_cap_kbps")),
            min_cap_kbps=_opt_int(body.get("min_cap_kbps")),
            policies=tuple(str(p) for p in policies) if policies is not None else None,
        )


@dataclass(frozen=True)
class RateState:
    """The settings in force: what was asked (within limits) and the aggregate ceiling."""

    policy: str = "fair"
    target_kbps: int | None = None  # None: no target (the controller's own ceiling)
    min_kbps: int = 0
    ceiling_kbps: int | None = None  # the server's aggregate share; None: no ceiling

    @property
    def effective_target_kbps(self) -> int | None:
        """What the sender paces at most: the target under the aggregate ceiling."""
        values = [v for v in (self.target_kbps, self.ceiling_kbps) if v is not None]
        return min(values) if values else None

    @property
    def effective_min_kbps(self) -> int:
        target = self.effective_target_kbps
        return self.min_kbps if target is None else min(self.min_kbps, target)

    def sender_kwargs(self) -> dict[str, Any]:
        """Arguments for ``SenderSession.set_rate`` (bits per second)."""
        target = self.effective_target_kbps
        return {
            "target_bps": None if target is None else target * 1000.0,
            "min_bps": self.effective_min_kbps * 1000.0,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "rate_policy": self.policy,
            "target_rate_kbps": self.target_kbps,
            "min_rate_kbps": self.min_kbps,
            "ceiling_kbps": self.ceiling_kbps,
        }

    @classmethod
    def from_wire(cls, body: dict[str, Any]) -> RateState:
        return cls(
            policy=str(body.get("rate_policy") or "fair"),
            target_kbps=_opt_int(body.get("target_rate_kbps")),
            min_kbps=_opt_int(body.get("min_rate_kbps")) or 0,
            ceiling_kbps=_opt_int(body.get("ceiling_kbps")),
        )


def _opt_int(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"a rate must be a non-negative number of kbit/s (got {value!r})")
    return int(value)


def _spec_get(spec: Any, name: str) -> Any:
    return spec.get(name) if isinstance(spec, dict) else getattr(spec, name, None)


def _caps(spec: Any, limits: RateLimits) -> tuple[int | None, int | None]:
    """The tighter of the spec's and the server's caps (a cap of 0 means none)."""

    def tighter(*values: Any) -> int | None:
        caps = [int(v) for v in values if isinstance(v, int | float) and v > 0]
        return min(caps) if caps else None

    target_cap = tighter(_spec_get(spec, "target_rate_cap_kbps"), limits.target_cap_kbps)
    min_cap = tighter(_spec_get(spec, "min_rate_cap_kbps"), limits.min_cap_kbps)
    return target_cap, min_cap


def allowed_policies(spec: Any, limits: RateLimits) -> tuple[str, ...]:
    allowed = limits.policies if limits.policies is not None else POLICY_ORDER
    ceiling = _spec_get(spec, "rate_policy_allowed")
    if ceiling in POLICY_ORDER:
        allowed = tuple(p for p in allowed if POLICY_ORDER.index(p) <= POLICY_ORDER.index(ceiling))
    return tuple(p for p in POLICY_ORDER if p in allowed)


def initial_state(
    spec: Any, limits: RateLimits, default_target_kbps: int | None = None
) -> RateState:
    """The settings a session opens with: the spec's, clamped into every limit."""
    target_cap, min_cap = _caps(spec, limits)
    target = _opt_int(_spec_get(spec, "target_rate_kbps")) or default_target_kbps
    if target_cap is not None:
        target = target_cap if target is None else min(target, target_cap)
    minimum = _opt_int(_spec_get(spec, "min_rate_kbps")) or 0
    if min_cap is not None:
        minimum = min(minimum, min_cap)
    if target is not None:
        minimum = min(minimum, target)
    policy = str(_spec_get(spec, "rate_policy") or "fair")
    allowed = allowed_policies(spec, limits)
    if policy not in allowed:
        if not allowed:
            raise RateLocked("No rate policy is allowed for this user")
        policy = next(p for p in _FALLBACK_ORDER if p in allowed)
    return RateState(policy=policy, target_kbps=target, min_kbps=minimum)


def apply_change(
    state: RateState, change: dict[str, Any], spec: Any, limits: RateLimits
) -> RateState:
    """The settings after a live ``change`` (spec field names, kbit/s); raises RateLocked.

    ``change`` may hold ``rate_policy``, ``target_rate_kbps``, ``min_rate_kbps``; a field
    that is absent (or None) keeps its value.
    """
    target_cap, min_cap = _caps(spec, limits)
    new = state
    policy = change.get("rate_policy")
    if policy is not None and policy != state.policy:
        if policy not in POLICY_ORDER:
            raise UsageError(f"rate_policy must be one of {', '.join(POLICY_ORDER)}")
        if _spec_get(spec, "lock_rate_policy"):
            raise RateLocked("rate_policy is locked for this transfer (lock_rate_policy)")
        if policy not in allowed_policies(spec, limits):
            raise RateLocked(f"rate_policy {policy!r} is not allowed here")
        new = replace(new, policy=str(policy))
    target = _opt_int(change.get("target_rate_kbps"))
    if target is not None and target != state.target_kbps:
        if _spec_get(spec, "lock_target_rate"):
            raise RateLocked("target_rate_kbps is locked for this transfer (lock_target_rate)")
        if target_cap is not None and target > target_cap:
            raise RateLocked(f"target_rate_kbps {target} is above the cap of {target_cap}")
        if target <= 0:
            raise UsageError("target_rate_kbps must be above 0")
        new = replace(new, target_kbps=target)
    minimum = _opt_int(change.get("min_rate_kbps"))
    if minimum is not None and minimum != state.min_kbps:
        if _spec_get(spec, "lock_min_rate"):
            raise RateLocked("min_rate_kbps is locked for this transfer (lock_min_rate)")
        if min_cap is not None and minimum > min_cap:
            raise RateLocked(f"min_rate_kbps {minimum} is above the cap of {min_cap}")
        new = replace(new, min_kbps=minimum)
    if new.target_kbps is not None and new.min_kbps > new.target_kbps:
        raise RateLocked(f"min_rate_kbps {new.min_kbps} is above the target rate {new.target_kbps}")
    return new
