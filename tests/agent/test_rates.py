"""modifyTransfer's rules, without a transfer."""

from __future__ import annotations

import pytest

from slipstream.agent.rates import plan_modify
from slipstream.errors import RateLocked, UsageError

SPEC = {"rate_policy": "fair", "target_rate_kbps": 1000, "lock_rate_policy": False}


def test_a_plain_change_is_applied_live() -> None:
    updates, live = plan_modify(SPEC, {"target_rate_kbps": 5000, "rate_policy": "high"})
    assert live == updates == {"target_rate_kbps": 5000, "rate_policy": "high"}


@pytest.mark.parametrize(
    ("spec", "body"),
    [
        ({**SPEC, "lock_rate_policy": True}, {"rate_policy": "fixed"}),
        ({**SPEC, "lock_target_rate": True}, {"target_rate_kbps": 10}),
        ({**SPEC, "lock_min_rate": True, "min_rate_kbps": 0}, {"min_rate_kbps": 5}),
        ({**SPEC, "target_rate_cap_kbps": 2000}, {"target_rate_kbps": 2001}),
        ({**SPEC, "min_rate_cap_kbps": 100}, {"min_rate_kbps": 101}),
        (SPEC, {"min_rate_kbps": 1001}),  # above the target
        ({**SPEC, "rate_policy_allowed": "fair"}, {"rate_policy": "fixed"}),
        ({**SPEC, "lock_target_rate": True}, {"lock_target_rate": False}),
        ({**SPEC, "target_rate_cap_kbps": 2000}, {"target_rate_cap_kbps": 3000}),
    ],
)
def test_locked_or_capped_changes_are_refused(spec: dict, body: dict) -> None:
    with pytest.raises(RateLocked):
        plan_modify(spec, body)


def test_the_agent_cap_and_bad_values() -> None:
    with pytest.raises(RateLocked):
        plan_modify(SPEC, {"target_rate_kbps": 9000}, agent_cap=8000)
    with pytest.raises(UsageError):
        plan_modify(SPEC, {"rate_policy": "warp"})
    with pytest.raises(UsageError):
        plan_modify(SPEC, {"target_rate_kbps": -1})


def test_locks_can_be_set_and_caps_lowered() -> None:
    updates, live = plan_modify(
        {**SPEC, "target_rate_cap_kbps": 2000},
        {"lock_target_rate": True, "target_rate_cap_kbps": 1500},
    )
    assert updates == {"lock_target_rate": True, "target_rate_cap_kbps": 1500} and live == {}
