"""The server's rate policy: per-user caps and defaults, and one aggregate cap for everyone.

Config keys (all optional; rates in kbit/s, as in the transfer spec)::

    [server]
    aggregate_rate_kbps = 500000        # every session of this server together

    [[users]]
    target_rate_cap_kbps = 100000       # a user's transfer never paces above this
    target_rate_default_kbps = 50000    # the target when the spec names none
    min_rate_cap_kbps = 10000           # a spec's min_rate is lowered to this
    allowed_policies = ["fair", "low"]  # e.g. forbid "fixed" (and "high")

At session start the spec's settings are clamped into these limits (a policy that is not
allowed falls back to the closest allowed one); live changes beyond them are refused with
RateLocked (code 55). The aggregate cap is split evenly between the sessions running at
the moment, and re-split whenever one starts or ends (like Aspera's virtual links, but
without borrowing: a session that uses less than its share leaves the rest unused).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from slipstream.engine.ratelimits import POLICY_ORDER, RateLimits

log = logging.getLogger("slipstream.server")

USER_RATE_KEYS = frozenset(
    {"target_rate_cap_kbps", "target_rate_default_kbps", "min_rate_cap_kbps", "allowed_policies"}
)
SERVER_RATE_KEYS = frozenset({"aggregate_rate_kbps"})
MIN_SHARE_KBPS = 100  # a share never drops below this, however many sessions run


@dataclass(frozen=True)
class UserRatePolicy:
    target_rate_cap_kbps: int | None = None
    target_rate_default_kbps: int | None = None
    min_rate_cap_kbps: int | None = None
    allowed_policies: tuple[str, ...] | None = None

    def limits(self) -> RateLimits:
        return RateLimits(
            target_cap_kbps=self.target_rate_cap_kbps,
            min_cap_kbps=self.min_rate_cap_kbps,
            policies=self.allowed_policies,
        )


def _rate(ctx: Any, table: Mapping[str, Any], key: str, where: str) -> int | None:
    value = table.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ctx.error(f"{where}{key}", f"must be a positive number of kbit/s, got {value!r}")
    return value


def parse_user_rate(ctx: Any, entry: Mapping[str, Any], where: str) -> UserRatePolicy:
    """The rate keys of one ``[[users]]`` table (``ctx`` is the config parser's context)."""
    policies = entry.get("allowed_policies")
    if policies is not None:
        if not isinstance(policies, list) or not policies:
            raise ctx.error(f"{where}allowed_policies", "must be a non-empty array of names")
        unknown = [p for p in policies if p not in POLICY_ORDER]
        if unknown:
            raise ctx.error(
                f"{where}allowed_policies",
                f"unknown policy {unknown[0]!r} (known: {', '.join(POLICY_ORDER)})",
            )
    policy = UserRatePolicy(
        target_rate_cap_kbps=_rate(ctx, entry, "target_rate_cap_kbps", where),
        target_rate_default_kbps=_rate(ctx, entry, "target_rate_default_kbps", where),
        min_rate_cap_kbps=_rate(ctx, entry, "min_rate_cap_kbps", where),
        allowed_policies=tuple(policies) if policies is not None else None,
    )
    cap, default = policy.target_rate_cap_kbps, policy.target_rate_default_kbps
    if cap is not None and default is not None and default > cap:
        raise ctx.error(f"{where}target_rate_default_kbps", f"is above the cap ({cap})")
    return policy


def parse_aggregate_rate(ctx: Any, server: Mapping[str, Any]) -> int | None:
    return _rate(ctx, server, "aggregate_rate_kbps", "server.")


ShareCallback = Callable[[int | None], None]


class AggregateBudget:
    """Splits one server-wide cap evenly between the running sessions."""

    def __init__(self, total_kbps: int | None) -> None:
        self.total_kbps = total_kbps
        self._members: dict[int, ShareCallback] = {}
        self._next_id = 0

    def share_kbps(self, extra: int = 0) -> int | None:
        """Each session's share now (``extra``: count sessions about to join)."""
        count = len(self._members) + extra
        if self.total_kbps is None or count == 0:
            return self.total_kbps
        return max(MIN_SHARE_KBPS, self.total_kbps // count)

    def join(self, on_share: ShareCallback) -> int:
        """Add a session; every member (this one included) is told its new share."""
        handle = self._next_id
        self._next_id += 1
        self._members[handle] = on_share
        self._rebalance()
        return handle

    def leave(self, handle: int) -> None:
        if self._members.pop(handle, None) is not None:
            self._rebalance()

    def _rebalance(self) -> None:
        if self.total_kbps is None:
            return
        share = self.share_kbps()
        for callback in list(self._members.values()):
            try:
                callback(share)
            except Exception:  # noqa: BLE001 - one broken session must not stop the others
                log.exception("applying the aggregate rate share failed")
