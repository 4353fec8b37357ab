"""Live rate changes of a running transfer: the Python handle and the local control socket.

:class:`RateControl` is the one API for changing a running transfer's target rate, minimum
rate and policy: the agent's modifyTransfer calls it, ``slipstream modify`` reaches it
through a Unix socket (:func:`serve_control_socket`), and a Python user passes one in
``ClientOptions.rate_control``. Every change is checked against the spec's locks and caps
and the server's limits (engine/ratelimits.py) before it is applied; a refused change
raises :class:`~slipstream.errors.RateLocked` (code 55) and changes nothing.

Where it applies: in an upload the local sender changes at once (the pacer reads the rate
on its next batch, well within one RTT). In a download the server holds the sender: a RATE
control message carries the change, the server checks it against its own limits too and
answers with the settings in force. The server may also send RATE on its own in an upload,
to lower the session's ceiling when its aggregate bandwidth cap is re-shared.

Control socket protocol: one JSON object per line each way. Requests are
``{"op": "status"}`` or ``{"op": "set", "target_rate_kbps": ..., "min_rate_kbps": ...,
"rate_policy": ...}``; replies are ``{"ok": true, "rate": {...}}`` or
``{"ok": false, "error": {code, user_message, ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from slipstream.engine.ratelimits import RateLimits, RateState, apply_change, initial_state
from slipstream.errors import RateLocked, SlipstreamError, UsageError, error_from_dict
from slipstream.protocol import control
from slipstream.transport.rundir import user_runtime_dir

log = logging.getLogger("slipstream.engine")

SOCKET_SUFFIX = ".sock"
MAX_REQUEST = 4096


class RateControl:
    """A live handle on a running transfer's rate (what the agent's modifyTransfer uses).

    Call :meth:`set_rate` on the transfer's own event loop. Outside the data phase nothing
    happens (False). A change that a lock or a cap forbids raises RateLocked.
    """

    def __init__(self) -> None:
        self._apply: Callable[[RateState, dict[str, Any]], None] | None = None
        self._spec: Any = None
        self._limits = RateLimits()
        self.state: RateState | None = None
        self.direction: str | None = None
        self.last_refusal: dict[str, Any] | None = None  # the server's last "no", if any

    @property
    def active(self) -> bool:
        return self._apply is not None

    def set_rate(
        self,
        *,
        target_rate_kbps: int | None = None,
        min_rate_kbps: int | None = None,
        rate_policy: str | None = None,
    ) -> bool:
        change = {
            "target_rate_kbps": target_rate_kbps,
            "min_rate_kbps": min_rate_kbps,
            "rate_policy": rate_policy,
        }
        change = {key: value for key, value in change.items() if value is not None}
        if self._apply is None or self.state is None or not change:
            return False
        new = apply_change(self.state, change, self._spec, self._limits)
        self._apply(new, change)
        self.state = new
        return True

    def status(self) -> dict[str, Any]:
        """The settings in force (or ``{"active": false}`` outside the data phase)."""
        if self.state is None or self._apply is None:
            return {"active": False}
        state = self.state
        return {
            "active": True,
            "direction": self.direction,
            **state.to_wire(),
            "effective_target_kbps": state.effective_target_kbps,
            "limits": self._limits.to_wire(),
            "last_refusal": self.last_refusal,
        }

    # --- wiring (engine/job.py) ----------------------------------------------------------

    def _attach(
        self,
        direction: str,
        core: Any,
        ctl: Any,
        *,
        spec: Any = None,
        limits: RateLimits | None = None,
        state: RateState | None = None,
        peer_features: tuple[str, ...] = (),
    ) -> None:
        self._spec = spec if spec is not None else {}
        self._limits = limits or RateLimits()
        self.state = state or initial_state(self._spec, self._limits)
        self.direction = direction
        if direction == "send":

            def apply(new: RateState, change: dict[str, Any]) -> None:
                _apply_to_sender(core, self.state, new)

        else:

            def apply(new: RateState, change: dict[str, Any]) -> None:
                ctl.send_nowait(control.RATE, **change)

        self._apply = apply

    def _detach(self) -> None:
        self._apply = None

    def on_peer_rate(self, msg: dict[str, Any], core: Any = None) -> None:
        """A RATE from the server: a new aggregate ceiling (upload), or its answer to our
        change (download: the settings it applied, and the refusal if it refused)."""
        if self.state is None:
            return
        if "refused" in msg:
            self.last_refusal = msg["refused"]
            log.warning("server refused a rate change: %s", msg["refused"])
        if "state" in msg:
            self.state = RateState.from_wire(msg["state"])
            return
        if "ceiling_kbps" in msg:
            new = replace(self.state, ceiling_kbps=msg.get("ceiling_kbps"))
            if core is not None:
                _apply_to_sender(core, self.state, new)
            self.state = new


def _apply_to_sender(core: Any, old: RateState | None, new: RateState) -> None:
    kwargs = new.sender_kwargs()
    if old is None or new.policy != old.policy:
        kwargs["policy"] = new.policy
    core.set_rate(**kwargs)


class ClientLive:
    """Wires a client transfer's live control: the handle, the server's RATE messages and
    the optional control socket. ``start`` at the data phase, ``stop`` after it."""

    def __init__(self, rate_control: RateControl | None, socket_path: Path | None) -> None:
        self.rate_control = rate_control or RateControl()
        self.socket_path = socket_path
        self._server: asyncio.AbstractServer | None = None

    async def start(
        self, direction: str, spec: Any, params: Any, core: Any, ctl: Any, driver: Any
    ) -> None:
        limits = RateLimits.from_wire(params.rate_limits)
        if params.rate is not None:
            state = RateState.from_wire(params.rate)
        else:  # an old server: it granted what we asked
            state = initial_state(spec, limits)
        rc = self.rate_control
        rc._attach(direction, core, ctl, spec=spec, limits=limits, state=state)
        sender = core if direction == "send" else None
        driver.rate_handler = lambda msg: rc.on_peer_rate(msg, sender)
        if self.socket_path is not None:
            try:
                self._server = await serve_control_socket(self.socket_path, rc)
            except OSError as exc:  # a control socket is a convenience, never a failure
                log.warning("no control socket at %s: %s", self.socket_path, exc)

    async def stop(self) -> None:
        self.rate_control._detach()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        if self.socket_path is not None:
            with contextlib.suppress(OSError):
                self.socket_path.unlink()


# --- the server's side ---------------------------------------------------------------------


class ServerRate:
    """One server session's rate settings: opened within the user's limits, changed live
    only within them, and kept under the server's aggregate share."""

    def __init__(
        self, spec: Any, limits: RateLimits, default_target_kbps: int | None, share: int | None
    ) -> None:
        self.spec = spec
        self.limits = limits
        self.state = replace(initial_state(spec, limits, default_target_kbps), ceiling_kbps=share)
        self._core: Any = None
        self._ctl: Any = None
        self._direction = ""
        self._client_features: tuple[str, ...] = ()

    def attach(self, direction: str, core: Any, ctl: Any, client_features: tuple[str, ...]) -> None:
        """``direction`` is the server's side: "send" (a download) or "receive"."""
        self._direction = direction
        self._core = core
        self._ctl = ctl
        self._client_features = client_features

    def on_client_rate(self, msg: dict[str, Any]) -> None:
        """A download client's live change: check it, apply it, say what is in force."""
        try:
            new = apply_change(self.state, msg, self.spec, self.limits)
        except SlipstreamError as exc:
            log.warning("rate change refused: %s", exc.internal_message)
            self._answer({"refused": exc.to_dict(), "state": self.state.to_wire()})
            return
        if self._core is not None:
            _apply_to_sender(self._core, self.state, new)
        self.state = new
        self._answer({"state": new.to_wire()})

    def on_share(self, share: int | None) -> None:
        """The aggregate cap was re-split: lower (or raise) this session's ceiling."""
        if share == self.state.ceiling_kbps:
            return
        new = replace(self.state, ceiling_kbps=share)
        if self._direction == "send" and self._core is not None:
            _apply_to_sender(self._core, self.state, new)
        elif self._ctl is not None and "rate" in self._client_features:
            with contextlib.suppress(SlipstreamError):
                self._ctl.send_nowait(control.RATE, ceiling_kbps=share)
        self.state = new

    def _answer(self, body: dict[str, Any]) -> None:
        if self._ctl is not None and "rate" in self._client_features:
            with contextlib.suppress(SlipstreamError):
                self._ctl.send_nowait(control.RATE, **body)


# --- the local control socket ----------------------------------------------------------------


def default_socket_dir() -> Path:
    """Per-user folder of running transfers' control sockets (mode 0700)."""
    return user_runtime_dir()


def default_socket_path() -> Path:
    return default_socket_dir() / f"{os.getpid()}{SOCKET_SUFFIX}"


async def serve_control_socket(path: Path, rate_control: RateControl) -> asyncio.AbstractServer:
    """Listen on ``path`` for ``slipstream modify``; only this user can connect (0700)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), 5.0)
            reply = _handle_request(line, rate_control)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_unix_server(handle, path=str(path))
    os.chmod(path, 0o600)
    return server


def _handle_request(line: bytes, rate_control: RateControl) -> dict[str, Any]:
    try:
        if len(line) > MAX_REQUEST:
            raise UsageError("request too long")
        request = json.loads(line)
        if not isinstance(request, dict):
            raise UsageError("a request is a JSON object")
        op = request.get("op", "status")
        if op == "set":
            change = {
                key: request.get(key)
                for key in ("target_rate_kbps", "min_rate_kbps", "rate_policy")
            }
            if not rate_control.set_rate(**change):
                raise UsageError("the transfer is not in its data phase (or nothing to change)")
        elif op != "status":
            raise UsageError(f"unknown op {op!r}")
        return {"ok": True, "rate": rate_control.status()}
    except json.JSONDecodeError:
        return {"ok": False, "error": UsageError("the request is not JSON").to_dict()}
    except SlipstreamError as exc:
        return {"ok": False, "error": exc.to_dict()}


def running_sockets(folder: Path | None = None) -> list[Path]:
    """Control sockets of this user's running transfers (stale ones are skipped)."""
    folder = folder or default_socket_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.glob(f"*{SOCKET_SUFFIX}")):
        pid = path.stem
        if pid.isdigit() and not _pid_alive(int(pid)):
            with contextlib.suppress(OSError):
                path.unlink()  # the transfer died without cleaning up
            continue
        found.append(path)
    return found


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def request(path: Path, body: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to a running transfer's control socket; returns its rate status.

    Raises the transfer's error (e.g. RateLocked) if it refused.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise UsageError(f"no running transfer at {path}: {exc.strerror or exc}") from None
        sock.sendall(json.dumps(body).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    reply = json.loads(data or b"{}")
    if not reply.get("ok"):
        raise error_from_dict(reply.get("error") or {})
    return dict(reply.get("rate") or {})


__all__ = [
    "RateControl",
    "RateLocked",
    "ServerRate",
    "default_socket_path",
    "request",
    "running_sockets",
    "serve_control_socket",
]
