"""Live rate changes: limits, locks, server caps, the aggregate share and the control socket."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.livecontrol import (
    RateControl,
    ServerRate,
    request,
    serve_control_socket,
)
from slipstream.engine.ratelimits import RateLimits, RateState, apply_change, initial_state
from slipstream.errors import ConfigError, RateLocked, UsageError
from slipstream.server.config import load_server_config
from slipstream.server.passwords import hash_password
from slipstream.server.rate_policy import AggregateBudget


class FakeSender:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def set_rate(self, **kwargs: Any) -> None:
        self.calls.append(kwargs)


class FakeControl:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def send_nowait(self, msg_type: str, **fields: Any) -> None:
        self.sent.append((msg_type, fields))


# --- opening a session within the limits -------------------------------------------------


def test_initial_state_clamps_into_caps_and_allowed_policies() -> None:
    spec = {"target_rate_kbps": 500_000, "min_rate_kbps": 90_000, "rate_policy": "fixed"}
    limits = RateLimits(target_cap_kbps=100_000, min_cap_kbps=20_000, policies=("fair", "low"))
    state = initial_state(spec, limits)
    assert state == RateState(policy="fair", target_kbps=100_000, min_kbps=20_000)


def test_initial_state_default_target_and_spec_caps() -> None:
    state = initial_state(
        {"target_rate_cap_kbps": 30_000}, RateLimits(), default_target_kbps=50_000
    )
    assert state.target_kbps == 30_000  # the spec's own cap is tighter than the default
    assert initial_state({}, RateLimits(), default_target_kbps=50_000).target_kbps == 50_000
    assert initial_state({}, RateLimits()).target_kbps is None


# --- live changes ----------------------------------------------------------------------------


def test_live_change_respects_locks() -> None:
    state = RateState(policy="fair", target_kbps=10_000)
    spec = {"lock_target_rate": True, "lock_rate_policy": True, "lock_min_rate": True}
    for change in (
        {"target_rate_kbps": 20_000},
        {"rate_policy": "low"},
        {"min_rate_kbps": 1_000},
    ):
        with pytest.raises(RateLocked) as caught:
            apply_change(state, change, spec, RateLimits())
        assert caught.value.code == 55
    # Re-stating the locked value is not a change.
    assert apply_change(state, {"target_rate_kbps": 10_000}, spec, RateLimits()) == state


def test_live_change_respects_caps_and_policies() -> None:
    limits = RateLimits(target_cap_kbps=100_000, min_cap_kbps=5_000, policies=("fair", "low"))
    state = RateState(policy="fair", target_kbps=50_000)
    with pytest.raises(RateLocked):
        apply_change(state, {"target_rate_kbps": 200_000}, {}, limits)
    with pytest.raises(RateLocked):
        apply_change(state, {"min_rate_kbps": 6_000}, {}, limits)
    with pytest.raises(RateLocked):
        apply_change(state, {"rate_policy": "fixed"}, {}, limits)
    with pytest.raises(RateLocked):  # the spec's rate_policy_allowed ceiling
        apply_change(state, {"rate_policy": "high"}, {"rate_policy_allowed": "fair"}, RateLimits())
    with pytest.raises(RateLocked):
        apply_change(state, {"min_rate_kbps": 60_000}, {}, RateLimits())  # above the target
    with pytest.raises(UsageError):
        apply_change(state, {"rate_policy": "warp"}, {}, RateLimits())
    new = apply_change(
        state,
        {"target_rate_kbps": 80_000, "min_rate_kbps": 5_000, "rate_policy": "low"},
        {},
        limits,
    )
    assert new == RateState(policy="low", target_kbps=80_000, min_kbps=5_000)


def test_rate_control_upload_applies_to_the_local_sender() -> None:
    control, sender = RateControl(), FakeSender()
    assert control.set_rate(target_rate_kbps=1_000) is False  # not attached yet
    control._attach(
        "send",
        sender,
        FakeControl(),
        spec={"lock_min_rate": True},
        limits=RateLimits(target_cap_kbps=50_000),
        state=RateState(policy="fair", target_kbps=10_000),
    )
    assert control.set_rate(target_rate_kbps=40_000)
    assert sender.calls[-1] == {"target_bps": 40e6, "min_bps": 0.0}
    assert control.set_rate(rate_policy="low")
    assert sender.calls[-1]["policy"] == "low"
    with pytest.raises(RateLocked):
        control.set_rate(target_rate_kbps=60_000)
    with pytest.raises(RateLocked):
        control.set_rate(min_rate_kbps=1_000)
    assert control.status()["target_rate_kbps"] == 40_000
    # The server re-split its aggregate cap: the ceiling lowers the pacing, not the target.
    control.on_peer_rate({"ceiling_kbps": 25_000}, sender)
    assert sender.calls[-1]["target_bps"] == 25e6
    assert control.status()["effective_target_kbps"] == 25_000
    control._detach()
    assert control.set_rate(target_rate_kbps=1_000) is False


def test_rate_control_download_asks_the_server() -> None:
    control, ctl = RateControl(), FakeControl()
    control._attach("receive", None, ctl, spec={}, state=RateState(target_kbps=10_000))
    assert control.set_rate(target_rate_kbps=20_000, rate_policy="high")
    assert ctl.sent == [("rate", {"target_rate_kbps": 20_000, "rate_policy": "high"})]
    refusal = {"code": 55, "user_message": "no"}
    control.on_peer_rate({"refused": refusal, "state": RateState(target_kbps=10_000).to_wire()})
    assert control.status()["last_refusal"] == refusal
    assert control.status()["target_rate_kbps"] == 10_000


def test_server_checks_a_download_clients_change() -> None:
    limits = RateLimits(target_cap_kbps=100_000, policies=("fair", "low"))
    rate = ServerRate({"target_rate_kbps": 20_000}, limits, None, share=None)
    sender, ctl = FakeSender(), FakeControl()
    rate.attach("send", sender, ctl, ("rate",))
    rate.on_client_rate({"target_rate_kbps": 90_000})
    assert sender.calls[-1]["target_bps"] == 90e6
    assert ctl.sent[-1][1]["state"]["target_rate_kbps"] == 90_000
    rate.on_client_rate({"rate_policy": "fixed"})  # forbidden here: refused, nothing changes
    assert len(sender.calls) == 1
    assert ctl.sent[-1][1]["refused"]["code"] == 55
    # An old client (no "rate" feature) gets no answer it could not parse.
    quiet = FakeControl()
    rate.attach("send", sender, quiet, ())
    rate.on_client_rate({"target_rate_kbps": 200_000})
    assert quiet.sent == []


def test_aggregate_budget_is_shared_and_reshared() -> None:
    budget = AggregateBudget(90_000)
    first = ServerRate({}, RateLimits(), None, share=budget.share_kbps(extra=1))
    sender_one = FakeSender()
    first.attach("send", sender_one, FakeControl(), ())
    handle_one = budget.join(first.on_share)
    assert first.state.effective_target_kbps == 90_000
    second = ServerRate({"target_rate_kbps": 20_000}, RateLimits(), None, budget.share_kbps(1))
    upload_ctl = FakeControl()
    second.attach("receive", None, upload_ctl, ("rate",))
    handle_two = budget.join(second.on_share)
    assert sender_one.calls[-1]["target_bps"] == 45e6  # the download's sender is re-capped
    assert upload_ctl.sent == []  # the upload's target (20M) is below its share already
    assert second.state.effective_target_kbps == 20_000
    budget.leave(handle_one)
    assert second.state.ceiling_kbps == 90_000
    assert upload_ctl.sent[-1] == ("rate", {"ceiling_kbps": 90_000})
    budget.leave(handle_two)
    assert AggregateBudget(None).share_kbps() is None


# --- the server config -------------------------------------------------------------------------


def _config(tmp_path: Path, server: str, user: str) -> Path:
    (tmp_path / "data").mkdir(exist_ok=True)
    path = tmp_path / "server.toml"
    path.write_text(
        f'[server]\n{server}\n[[users]]\nname = "alice"\ndocroot = "data"\n'
        f"password_hash = {json.dumps(hash_password('pw'))}\n{user}\n"
    )
    return path


def test_config_rate_keys(tmp_path: Path) -> None:
    path = _config(
        tmp_path,
        "aggregate_rate_kbps = 500000",
        "target_rate_cap_kbps = 100000\ntarget_rate_default_kbps = 50000\n"
        'min_rate_cap_kbps = 10000\nallowed_policies = ["fair", "low"]',
    )
    config = load_server_config(path)
    assert config.aggregate_rate_kbps == 500_000
    limits = config.users[0].rate.limits()
    assert limits == RateLimits(100_000, 10_000, ("fair", "low"))
    assert config.users[0].rate.target_rate_default_kbps == 50_000


@pytest.mark.parametrize(
    "user",
    [
        'allowed_policies = ["warp"]',
        "allowed_policies = []",
        "target_rate_cap_kbps = -1",
        "target_rate_cap_kbps = 10\ntarget_rate_default_kbps = 20",
    ],
)
def test_config_rate_errors(tmp_path: Path, user: str) -> None:
    with pytest.raises(ConfigError):
        load_server_config(_config(tmp_path, "", user))


# --- the control socket --------------------------------------------------------------------


def test_control_socket_round_trip(tmp_path: Path) -> None:
    async def scenario() -> None:
        control, sender = RateControl(), FakeSender()
        control._attach(
            "send",
            sender,
            FakeControl(),
            spec={"lock_rate_policy": True},
            state=RateState(target_kbps=10_000),
        )
        path = tmp_path / "ctl.sock"
        server = await serve_control_socket(path, control)
        try:
            status = await asyncio.to_thread(request, path, {"op": "status"})
            assert status["target_rate_kbps"] == 10_000
            changed = await asyncio.to_thread(
                request, path, {"op": "set", "target_rate_kbps": 30_000}
            )
            assert changed["target_rate_kbps"] == 30_000
            assert sender.calls[-1]["target_bps"] == 30e6
            with pytest.raises(RateLocked):
                await asyncio.to_thread(request, path, {"op": "set", "rate_policy": "low"})
        finally:
            server.close()
            await server.wait_closed()
        with pytest.raises(UsageError):
            await asyncio.to_thread(request, path, {"op": "status"})

    asyncio.run(scenario())


def test_one_aggregate_budget_for_udp_and_https_sessions(tmp_path: Path) -> None:
    """A UDP session and an HTTPS fallback session split the server's one cap."""
    from slipstream.server.fallback import FallbackServer
    from slipstream.server.services import ServerServices
    from slipstream.server.session import SessionManager

    config = load_server_config(_config(tmp_path, "aggregate_rate_kbps = 100000", ""))
    services = ServerServices.create(config)
    try:
        udp = SessionManager(config, dispatcher=None, budget=services.budget)  # type: ignore[arg-type]
        https = FallbackServer(services)
        shares: list[int | None] = []
        handle = udp.budget.join(shares.append)
        assert https.budget.share_kbps(extra=1) == 50_000  # the UDP session holds half
        https.budget.join(shares.append)
        assert shares[-1] == 50_000
        udp.budget.leave(handle)
        assert https.budget.share_kbps() == 100_000
    finally:
        services.close()
