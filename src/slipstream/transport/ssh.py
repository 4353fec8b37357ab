"""Client side of the SSH control channel: connect, check the host key, open the subsystem.

Host keys are checked the way OpenSSH's ``StrictHostKeyChecking=accept-new`` does, against
a known_hosts file of our own (so Slipstream's trust decisions never edit the user's
``~/.ssh/known_hosts``), or against a fingerprint pinned with ``sshfp``:

- pinned fingerprint given: the key must match it; known_hosts is not consulted;
- host known with this key: accepted;
- host known with another key: refused, always (that is what an impostor looks like);
- host unknown: refused with the fingerprint to verify, unless ``accept_new_host``, which
  records it once the server has proven it holds the private key.

The user's ``~/.ssh/config`` is not read: a ``Host *`` block there (ProxyCommand, User,
Port, ...) would silently change where a transfer goes.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import hmac
import logging
import os
import re
import socket
from base64 import b64decode
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import asyncssh

from slipstream.errors import (
    AuthenticationError,
    ConnectError,
    HostKeyError,
    SlipstreamError,
    UnsupportedError,
    UsageError,
)
from slipstream.transport.trustfile import default_known_hosts_path

log = logging.getLogger("slipstream.transport.ssh")

SUBSYSTEM = "slipstream"
# The control stream as a channel of its own: a direct-tcpip open naming this pseudo
# destination (never forwarded anywhere) is one round trip, where a session channel plus a
# subsystem request is two. Older servers refuse it; the client then opens the subsystem.
CONTROL_DESTINATION = ("slipstream-control", 1)
# Largest SSH packet either end sends on the control stream. A receiver decrypts nothing
# before a packet's last byte is in, and a new connection's TCP paces its first flights: a
# 32 KiB packet (asyncssh's default) holding 300 file announcements reached the server
# ~0.13 s after its first byte on a 100 ms path, delaying the first READY and so the
# first data. Small packets let the first messages act while the rest are on the wire.
CONTROL_MAX_PKTSIZE = 4096
# The control channel idles while the data flows over UDP; keepalives stop NAT boxes and
# firewalls from forgetting the TCP connection during a long transfer.
DEFAULT_CONNECT_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_COUNT_MAX = 4


class ControlChannel:
    """An open control stream (direct channel or ``slipstream`` subsystem): binary ``reader``
    and ``writer``."""

    def __init__(
        self,
        conn: asyncssh.SSHClientConnection,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        server_fingerprint: str,
    ) -> None:
        self._conn = conn
        self.reader = reader
        self.writer = writer
        self.server_fingerprint = server_fingerprint
        peer = conn.get_extra_info("peername")
        self.peer_address: tuple[str, int] = (str(peer[0]), int(peer[1]))

    @property
    def exit_status(self) -> int | None:
        """The server handler's return value, once the server has closed the channel; None
        on the direct control channel, which carries no status."""
        get_status = getattr(self.writer.channel, "get_exit_status", None)
        return get_status() if get_status is not None else None

    async def close(self) -> None:
        self.writer.channel.close()
        self._conn.close()
        await self._conn.wait_closed()

    async def __aenter__(self) -> ControlChannel:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.close()


async def open_control_channel(host: str, port: int, user: str, **options: Any) -> ControlChannel:
    """Log in (``options`` as :func:`ssh_login` takes them) and open the control stream.

    Raises ConnectError (nothing listening, unreachable, unknown name, timeout: retryable),
    AuthenticationError, HostKeyError, or UnsupportedError (an SSH server that is not a
    Slipstream server).
    """
    login = await ssh_login(host, port, user, **options)
    timeout = float(options.get("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
    try:
        reader, writer = await open_control_stream(login.conn, login.where, timeout)
    except BaseException:  # failed or cancelled: do not leak the connection
        login.conn.close()
        raise
    return ControlChannel(login.conn, reader, writer, login.fingerprint)


@dataclass
class SshLogin:
    """An authenticated SSH connection to a Slipstream server."""

    conn: asyncssh.SSHClientConnection
    where: str  # host:port, for messages
    fingerprint: str  # the server's host key, SHA256:...

    @property
    def peer_address(self) -> tuple[str, int]:
        peer = self.conn.get_extra_info("peername")
        return (str(peer[0]), int(peer[1]))


async def ssh_login(
    host: str,
    port: int,
    user: str,
    *,
    password: str | None = None,
    client_keys: Sequence[str | Path] | None = None,
    passphrase: str | None = None,
    known_hosts: Path | None = None,
    sshfp: str | None = None,
    accept_new_host: bool = False,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
) -> SshLogin:
    """Connect and authenticate (host key checked as the module says); errors as
    :func:`open_control_channel`."""
    trust = _HostTrust.load(
        host, port, known_hosts or default_known_hosts_path(), sshfp, accept_new_host
    )
    key_args = _client_key_args(client_keys, passphrase)
    where = _host_port(host, port)
    methods = _auth_order(bool(key_args.get("client_keys")), password is not None)
    try:
        conn = await asyncssh.connect(
            host,
            port,
            username=user,
            password=password,
            known_hosts=([], [], []),  # empty: every key goes through _Client's check
            client_factory=lambda: _Client(trust, methods),
            preferred_auth=methods or (),
            connect_timeout=connect_timeout,
            config=None,
            gss_auth=False,
            gss_kex=False,
            keepalive_interval=KEEPALIVE_INTERVAL,
            keepalive_count_max=KEEPALIVE_COUNT_MAX,
            **key_args,
        )
    except asyncssh.PermissionDenied:
        trust.commit()  # the key exchange succeeded, so the server proved its key
        raise _auth_error(user, where, password, key_args) from None
    except (OSError, asyncssh.Error, asyncssh.KeyImportError) as exc:
        raise _map_connect_error(exc, host, port, connect_timeout, trust) from None
    trust.commit()
    return SshLogin(conn, where, trust.fingerprint)


def _auth_order(has_keys: bool, has_password: bool) -> tuple[str, ...]:
    """Methods to try, best first: a password goes as ``password`` (one round trip), not
    as ``keyboard-interactive`` (two), and nothing is spent on a ``none`` probe."""
    keys = ("publickey",) if has_keys else ()
    secrets = ("password", "keyboard-interactive") if has_password else ()
    return keys + secrets


async def open_control_stream(
    conn: asyncssh.SSHClientConnection, where: str, timeout: float
) -> tuple[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]]:
    """A new control stream on a logged-in connection: the one-round-trip channel, else
    the ``slipstream`` subsystem. The connection stays open whatever happens."""
    try:
        try:
            reader, writer = await asyncio.wait_for(
                conn.open_connection(
                    *CONTROL_DESTINATION, encoding=None, max_pktsize=CONTROL_MAX_PKTSIZE
                ),
                timeout,
            )
        except asyncssh.ChannelOpenError:  # an older server: the subsystem
            writer, reader, _stderr = await asyncio.wait_for(
                conn.open_session(
                    subsystem=SUBSYSTEM, encoding=None, max_pktsize=CONTROL_MAX_PKTSIZE
                ),
                timeout,
            )
    except asyncssh.ChannelOpenError as exc:
        raise UnsupportedError(
            f"the SSH server at {where} refused the '{SUBSYSTEM}' subsystem "
            f"({exc.reason}): is it a Slipstream server?"
        ) from None
    except (OSError, asyncssh.Error) as exc:  # TimeoutError is an OSError
        reason = str(exc) or type(exc).__name__
        raise ConnectError(
            f"SSH connection to {where} failed opening the channel: {reason}"
        ) from None
    return cast(asyncssh.SSHReader[bytes], reader), cast(asyncssh.SSHWriter[bytes], writer)


# --- client keys ------------------------------------------------------------------------


def _client_key_args(
    client_keys: Sequence[str | Path] | None, passphrase: str | None
) -> dict[str, Any]:
    """asyncssh keyword arguments for public-key authentication."""
    if client_keys is not None:
        # Explicit keys only, like ssh's IdentitiesOnly: no agent keys on top.
        # An empty list means "no keys"; asyncssh would read [] as "load the defaults".
        return {"client_keys": _load_keys(client_keys, passphrase) or None, "agent_path": None}
    try:
        Path.home()
    except RuntimeError:
        # No home directory: asyncssh's default key lookup would raise, and password
        # authentication must still work, so switch public keys off entirely.
        return {"client_keys": None}
    # asyncssh's default: ~/.ssh/id_* if present (encrypted ones skipped without a
    # passphrase, a missing ~/.ssh ignored) plus the ssh-agent's keys.
    return {"client_keys": (), "passphrase": passphrase}


def _load_keys(paths: Sequence[str | Path], passphrase: str | None) -> list[asyncssh.SSHKeyPair]:
    pairs: list[asyncssh.SSHKeyPair] = []
    for path in paths:
        try:
            pairs.extend(asyncssh.load_keypairs([str(Path(path).expanduser())], passphrase))
        except OSError as exc:
            raise UsageError(f"cannot read SSH key {path}: {exc.strerror or exc}") from None
        except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError) as exc:
            raise AuthenticationError(f"cannot use SSH key {path}: {exc}") from None
    return pairs


# --- host key trust ---------------------------------------------------------------------


@dataclass
class _KnownEntry:
    patterns: str
    key: asyncssh.SSHKey
    revoked: bool


@dataclass
class _HostTrust:
    """The host key decision for one connection, and the reason when it says no."""

    host: str
    port: int
    path: Path
    sshfp: str | None
    accept_new: bool
    entries: list[_KnownEntry] = field(default_factory=list)
    problem: str = ""
    fingerprint: str = ""
    _to_record: asyncssh.SSHKey | None = None

    @classmethod
    def load(
        cls, host: str, port: int, path: Path, sshfp: str | None, accept_new: bool
    ) -> _HostTrust:
        trust = cls(host.lower(), port, path, _normalise_sshfp(sshfp), accept_new)
        if trust.sshfp is None:
            trust.entries = _read_known_hosts(path)
        return trust

    def check(self, key: asyncssh.SSHKey) -> bool:
        self.fingerprint = key.get_fingerprint("sha256")
        if self.sshfp is not None:
            return self._check_pin()
        known = [e for e in self.entries if _matches(e.patterns, self.host, self.port)]
        if any(e.revoked and e.key == key for e in known):
            return self._refuse(
                f"the host key of {self._name} ({self.fingerprint}) is revoked in {self.path}"
            )
        trusted = [e.key for e in known if not e.revoked]
        if key in trusted:
            return True
        if trusted:
            return self._refuse(self._changed_message(trusted))
        if self.accept_new:
            self._to_record = key
            return True
        return self._refuse(self._unknown_message())

    def commit(self) -> None:
        """Record a newly accepted key; called once the server has proven it holds it."""
        if self._to_record is None:
            return
        line = f"{_known_name(self.host, self.port)} {_openssh_public(self._to_record)}\n"
        try:
            _append_line(self.path, line)
            log.info("added %s (%s) to %s", self._name, self.fingerprint, self.path)
        except OSError as exc:
            # The connection itself is fine; we just cannot remember the key for next time.
            log.warning("cannot record the host key of %s in %s: %s", self._name, self.path, exc)
        self._to_record = None

    @property
    def _name(self) -> str:
        return _host_port(self.host, self.port)

    def _check_pin(self) -> bool:
        if self.fingerprint == self.sshfp:
            return True
        return self._refuse(
            f"the host key of {self._name} does not match the pinned fingerprint: "
            f"expected {self.sshfp}, got {self.fingerprint}"
        )

    def _refuse(self, problem: str) -> bool:
        self.problem = problem
        return False

    def _changed_message(self, trusted: list[asyncssh.SSHKey]) -> str:
        expected = ", ".join(k.get_fingerprint("sha256") for k in trusted)
        name = _known_name(self.host, self.port)
        return (
            f"WARNING: the host key of {self._name} has CHANGED: expected {expected}, got "
            f"{self.fingerprint}. Someone may be impersonating the server, or it was "
            f"reinstalled. If you know the change is legitimate, remove the old entry "
            f"(ssh-keygen -R '{name}' -f {self.path}) and connect again."
        )

    def _unknown_message(self) -> str:
        return (
            f"the host {self._name} is not known (not in {self.path}); its key fingerprint is "
            f"{self.fingerprint}. If that is the server's fingerprint, connect again accepting "
            f"new hosts (accept_new_host) or pin it with sshfp={self.fingerprint}"
        )


class _Client(asyncssh.SSHClient):
    def __init__(self, trust: _HostTrust, methods: tuple[str, ...]) -> None:
        self._trust = trust
        self._methods = [m.encode() for m in methods]

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        # asyncssh opens with a ``none`` request only to learn the server's methods: a
        # round trip we skip by trying ours at once (a refusal still lists the server's
        # methods, so nothing is lost). A private attribute: left alone if it changes.
        if self._methods and getattr(conn, "_auth_methods", None) == [b"none"]:
            conn._auth_methods = list(self._methods)  # type: ignore[attr-defined]

    def validate_host_public_key(
        self, host: str, addr: str, port: int, key: asyncssh.SSHKey
    ) -> bool:
        # Return False rather than raise: asyncssh then fails the connection with
        # HostKeyNotVerifiable, and the reason waits in self._trust.problem.
        return self._trust.check(key)


def _normalise_sshfp(sshfp: str | None) -> str | None:
    if sshfp is None:
        return None
    value = sshfp.strip().rstrip("=")
    if value.upper().startswith("SHA256:"):
        value = value[len("SHA256:") :]
    return f"SHA256:{value}"


def _read_known_hosts(path: Path) -> list[_KnownEntry]:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise HostKeyError(f"cannot read the known hosts file {path}: {exc.strerror}") from None
    entries = (_parse_known_line(line) for line in text.splitlines())
    return [e for e in entries if e is not None]


def _parse_known_line(line: str) -> _KnownEntry | None:
    """One OpenSSH known_hosts line; None for comments and lines we cannot use."""
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = fields.pop(0) if fields[0].startswith("@") else None
    if marker not in (None, "@revoked") or len(fields) < 3:
        return None  # @cert-authority: we do not do host certificates
    try:
        key = asyncssh.import_public_key(f"{fields[1]} {fields[2]}")
    except (asyncssh.KeyImportError, ValueError):
        return None
    return _KnownEntry(fields[0], key, marker == "@revoked")


def _matches(patterns: str, host: str, port: int) -> bool:
    """OpenSSH host matching: some pattern matches and no negated (``!``) one does.

    Unlike asyncssh, a ``[host]:port`` lookup never falls back to a plain ``host`` entry:
    two servers on one machine (different ports) have different keys.
    """
    name = _known_name(host, port)
    matched = False
    for pattern in patterns.split(","):
        if pattern.startswith("|1|"):
            matched = matched or _hashed_match(pattern, name)
        elif pattern.startswith("!"):
            if _wildcard_match(name, pattern[1:]):
                return False
        elif _wildcard_match(name, pattern):
            matched = True
    return matched


def _wildcard_match(name: str, pattern: str) -> bool:
    # OpenSSH patterns know only * and ?; fnmatch would read "[127.0.0.1]:22" as a
    # character class, so build the regex ourselves.
    regex = "".join(
        ".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower()
    )
    return re.fullmatch(regex, name) is not None


def _hashed_match(pattern: str, name: str) -> bool:
    try:
        _, _, salt, digest = pattern.split("|")
        mac = hmac.new(b64decode(salt), name.encode(), hashlib.sha1).digest()
        return hmac.compare_digest(mac, b64decode(digest))
    except ValueError:
        return False


def _known_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def _openssh_public(key: asyncssh.SSHKey) -> str:
    text = key.export_public_key("openssh").decode("ascii").split()
    return f"{text[0]} {text[1]}"


def _append_line(path: Path, line: str) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        # Start on a fresh line if someone left the file without a final newline.
        if f.tell() > 0 and not path.read_bytes().endswith(b"\n"):
            f.write("\n")
        f.write(line)


# --- error mapping ----------------------------------------------------------------------


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _auth_error(
    user: str, where: str, password: str | None, key_args: dict[str, Any]
) -> AuthenticationError:
    hint = "check the user name, password or key"
    if password is None and key_args.get("client_keys") in (None, []):
        hint = "no password and no SSH key was given"
    return AuthenticationError(f"authentication failed for user {user!r} on {where}: {hint}")


def _map_connect_error(
    exc: BaseException, host: str, port: int, timeout: float, trust: _HostTrust
) -> SlipstreamError:
    where = _host_port(host, port)
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        return HostKeyError(trust.problem or f"host key of {where} not accepted: {exc}")
    if isinstance(exc, (asyncssh.KeyImportError, asyncssh.KeyEncryptionError)):
        return AuthenticationError(f"cannot use the default SSH keys: {exc}")
    if isinstance(exc, socket.gaierror):
        return ConnectError(f"cannot resolve host name {host!r}: {exc.strerror}")
    if isinstance(exc, TimeoutError):
        return ConnectError(f"no answer from {where} within {timeout:g} s (SSH)")
    if isinstance(exc, OSError):
        return ConnectError(_os_error_message(exc, where))
    return ConnectError(f"SSH connection to {where} failed: {exc}")


def _os_error_message(exc: OSError, where: str) -> str:
    # A name with several addresses (localhost: ::1 and 127.0.0.1) fails with a plain
    # OSError("Multiple exceptions: [Errno 111] ...") rather than ConnectionRefusedError.
    refused = isinstance(exc, ConnectionRefusedError) or (
        exc.errno is None and f"[Errno {errno.ECONNREFUSED}]" in str(exc)
    )
    if refused:
        return f"nothing is listening on {where} (SSH)"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{where} is unreachable: {exc.strerror}"
    return f"cannot connect to {where} (SSH): {exc.strerror or exc}"
