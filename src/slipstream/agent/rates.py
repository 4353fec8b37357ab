"""modifyTransfer's rules: what a page may change in a transfer's rate, and what it may not.

A field the spec locked (``lock_rate_policy``, ``lock_target_rate``, ``lock_min_rate``)
cannot change, a target or minimum above its cap is refused, and a policy more aggressive
than ``rate_policy_allowed`` is refused. Locks can be set, never lifted; caps only lowered.
"""

from __future__ import annotations

from typing import Any

from slipstream.errors import RateLocked, UsageError

POLICY_ORDER = ("low", "fair", "high", "fixed")  # least to most aggressive
LOCKS = {
    "rate_policy": "lock_rate_policy",
    "target_rate_kbps": "lock_target_rate",
    "min_rate_kbps": "lock_min_rate",
}


def _kbps(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise UsageError(f"{name} must be a non-negative number of kbit/s (got {value!r})")
    return int(value)


def _check_lock(spec: dict[str, Any], name: str, value: object) -> None:
    if spec.get(LOCKS[name]) and value != spec.get(name):
        raise RateLocked(f"{name} is locked for this transfer ({LOCKS[name]})")


def _check_policy(spec: dict[str, Any], policy: object) -> str:
    if policy not in POLICY_ORDER:
        raise UsageError(f"rate_policy must be one of {', '.join(POLICY_ORDER)} (got {policy!r})")
    _check_lock(spec, "rate_policy", policy)
    allowed = spec.get("rate_policy_allowed")
    if allowed in POLICY_ORDER and POLICY_ORDER.index(str(policy)) > POLICY_ORDER.index(allowed):
        raise RateLocked(f"rate_policy {policy!r} is above the allowed {allowed!r}")
    return str(policy)


def _cap(spec: dict[str, Any], name: str, agent_cap: int | None) -> int | None:
    caps = [c for c in (spec.get(name), agent_cap) if isinstance(c, int) and c > 0]
    return min(caps) if caps else None


def _lowered_caps(spec: dict[str, Any], body: dict[str, Any]) -> dict[str, int]:
    caps: dict[str, int] = {}
    for name in ("target_rate_cap_kbps", "min_rate_cap_kbps"):
        value = _kbps(body, name)
        if value is None:
            continue
        current = spec.get(name)
        if isinstance(current, int) and value > current:
            raise RateLocked(f"{name} can only be lowered (now {current})")
        caps[name] = value
    return caps


def _lock_changes(spec: dict[str, Any], body: dict[str, Any]) -> dict[str, bool]:
    locks: dict[str, bool] = {}
    for lock in LOCKS.values():
        if lock not in body:
            continue
        if spec.get(lock) and not body[lock]:
            raise RateLocked(f"{lock} cannot be lifted")
        locks[lock] = bool(body[lock])
    return locks


def plan_modify(
    spec: dict[str, Any], body: dict[str, Any], agent_cap: int | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(spec updates, live rate change)`` for a modify request; raises if refused."""
    updates: dict[str, Any] = dict(_lowered_caps(spec, body))
    capped = {**spec, **updates}
    live: dict[str, Any] = {}
    if body.get("rate_policy") is not None:
        live["rate_policy"] = _check_policy(spec, body["rate_policy"])
    target = _kbps(body, "target_rate_kbps")
    if target is not None:
        _check_lock(spec, "target_rate_kbps", target)
        cap = _cap(capped, "target_rate_cap_kbps", agent_cap)
        if cap is not None and target > cap:
            raise RateLocked(f"target_rate_kbps {target} is above the cap of {cap}")
        live["target_rate_kbps"] = target
    minimum = _kbps(body, "min_rate_kbps")
    if minimum is not None:
        _check_lock(spec, "min_rate_kbps", minimum)
        cap = _cap(capped, "min_rate_cap_kbps", None)
        ceiling = live.get("target_rate_kbps", spec.get("target_rate_kbps"))
        if (cap is not None and minimum > cap) or (ceiling and minimum > ceiling):
            raise RateLocked(f"min_rate_kbps {minimum} is above its cap or the target rate")
        live["min_rate_kbps"] = minimum
    updates.update(live)
    updates.update(_lock_changes(spec, body))
    return updates, live
