"""One SSH login shared by the transfers of a user to one server (``--persist SECONDS``).

Logging in costs six round trips (0.6 s at 100 ms), as much as the data of a 7 MB transfer
at 100 Mbit/s. With ``persist`` set, the first transfer logs in itself as usual and starts
a background process (transport/master.py) that logs in once more and keeps that
connection for later transfers, until it has been idle ``persist`` seconds. A later
transfer asks it over a Unix socket for a new control stream on that connection: one round
trip instead of six, and the master relays the stream's bytes. This is what OpenSSH's
ControlMaster/ControlPersist do for ssh.

Who may use a master: only this user (the socket's folder is 0700, the socket 0600 and the
master checks the peer's uid). Which master: one per server address, port, user, host key
pin and known_hosts file; the password or key is not part of the choice, as with OpenSSH: a
transfer that finds a master does not authenticate again. Token logins are never shared (a
token is bound to one transfer's paths and lifetime).

Anything wrong with a master (none running, stale socket, its connection gone) only means
the transfer logs in itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from slipstream.errors import UsageError
from slipstream.transport.rundir import UnsafeRunDir, private_runtime_dir

log = logging.getLogger("slipstream.transport.shared")

PERSIST_ENV = "SLIPSTREAM_PERSIST"
CONNECT_TIMEOUT = 2.0  # a master answers its socket at once, or is not there
OPEN_TIMEOUT = 20.0  # the master opens a channel: one round trip, plus a slow server


@dataclass(frozen=True)
class SharedLogin:
    """How to log in, and for how long a master keeps the connection idle."""

    host: str
    port: int
    user: str
    persist: float
    password: str | None = None
    client_keys: tuple[str, ...] | None = None
    passphrase: str | None = None
    known_hosts: str | None = None
    sshfp: str | None = None
    accept_new_host: bool = False

    def ssh_options(self) -> dict[str, Any]:
        """Keyword arguments for transport/ssh.py's ``ssh_login`` / ``open_control_channel``."""
        return {
            "password": self.password,
            "client_keys": list(self.client_keys) if self.client_keys is not None else None,
            "passphrase": self.passphrase,
            "known_hosts": Path(self.known_hosts) if self.known_hosts else None,
            "sshfp": self.sshfp,
            "accept_new_host": self.accept_new_host,
        }

    def key(self) -> str:
        """Names the master: the server, the user and how its host key is trusted."""
        who = [self.host.lower(), self.port, self.user, self.known_hosts, self.sshfp]
        return hashlib.sha256(json.dumps(who).encode()).hexdigest()[:20]

    def socket_path(self) -> Path:
        return private_runtime_dir() / f"ssh-{self.key()}.sock"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SharedLogin:
        fields = json.loads(text)
        keys = fields.get("client_keys")
        fields["client_keys"] = tuple(keys) if keys is not None else None
        return cls(**fields)


class SharedControl:
    """A control stream relayed by a master: what ControlChannel offers the engine."""

    exit_status = None  # like the direct channel, which carries no status

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_address: tuple[str, int],
        server_fingerprint: str,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.peer_address = peer_address
        self.server_fingerprint = server_fingerprint

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


async def open_shared_control(login: SharedLogin) -> SharedControl | None:
    """A control stream from this login's master; None when there is no usable master."""
    try:
        path = login.socket_path()
    except (OSError, UnsafeRunDir):
        return None
    answer = await _request(path, "open", OPEN_TIMEOUT)
    if answer is None:
        return None  # none running (or a stale socket: the next master replaces it)
    reader, writer, reply = answer
    if not reply.get("ok"):
        log.info("the shared login at %s refused (%s): logging in", path, reply)
        writer.close()
        return None
    peer = reply["peer"]
    return SharedControl(reader, writer, (str(peer[0]), int(peer[1])), str(reply["fingerprint"]))


async def _request(
    path: Path, op: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]] | None:
    """Send one request to the master on ``path``; its reply and the open connection, or
    None (nothing listening, no answer, not a reply)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_unix_connection(str(path)), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError):
        return None
    try:
        writer.write(json.dumps({"op": op}).encode() + b"\n")
        reply = json.loads(await asyncio.wait_for(reader.readline(), timeout))
    except (OSError, TimeoutError, ValueError) as exc:
        log.info("the shared login at %s did not answer %r: %s", path, op, exc)
        reply = None
    if not isinstance(reply, dict):
        writer.close()
        return None
    return reader, writer, reply


def start_master(login: SharedLogin) -> None:
    """Start a master for ``login`` in the background; returns once it is detached.

    The started process only reads the login from its stdin and forks: the master itself
    runs on in the child, outside this process's life. Best effort: a failure to start one
    costs later transfers their login, never this one.
    """
    try:
        starter = subprocess.Popen(
            [sys.executable, "-m", "slipstream.transport.master"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C in this terminal must not stop it
            cwd="/",
        )
    except OSError as exc:
        log.warning("cannot start the shared SSH connection: %s", exc)
        return
    try:
        assert starter.stdin is not None
        starter.stdin.write(login.to_json().encode())
        starter.stdin.close()
        starter.wait(timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("the shared SSH connection did not start: %s", exc)
        starter.kill()
        starter.wait()


def start_master_in_background(login: SharedLogin) -> asyncio.Future[None]:
    """:func:`start_master` in a worker thread, so the transfer does not wait for it."""
    return asyncio.get_running_loop().run_in_executor(None, start_master, login)


async def stop_master(path: Path) -> bool:
    """Ask the master listening on ``path`` to close its connection and exit."""
    reply = await ask_master(path, "exit")
    return bool(reply and reply.get("ok"))


async def ask_master(path: Path, op: str) -> dict[str, Any] | None:
    """One request (``info`` or ``exit``) to the master on ``path``; None if none answers."""
    answer = await _request(path, op, CONNECT_TIMEOUT)
    if answer is None:
        return None
    _reader, writer, reply = answer
    writer.close()
    return reply


def master_sockets() -> list[Path]:
    """The sockets of this user's masters (some may be stale)."""
    try:
        return sorted(private_runtime_dir().glob("ssh-*.sock"))
    except (OSError, UnsafeRunDir):
        return []


def persist_from_env(default: float = 0.0) -> float:
    """``$SLIPSTREAM_PERSIST`` in seconds; ``default`` when unset."""
    text = os.environ.get(PERSIST_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{PERSIST_ENV}={text!r}: expected seconds, e.g. 60") from None
    return max(value, 0.0)
