"""The embedded SSH server that carries the control channel.

No system sshd and no system accounts: users come from the server config, and the only
thing a logged-in user can do is open a control stream, whose bytes are handed to a
:data:`SessionHandler`: either the ``slipstream`` subsystem or, one round trip quicker, a
direct channel to the pseudo destination ``CONTROL_DESTINATION`` (served here, never
forwarded). Shells, exec, real port forwarding, agent/X11 forwarding and SFTP are all
refused, so a transfer account is never a way into the machine.

Who may log in is decided by :class:`Authenticator`; subclass it (and pass it to
:func:`start_sshd`) to add other kinds of users, e.g. token users.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh
from asyncssh.stream import SSHServerStreamSession  # not re-exported at the top level

from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.passwords import verify_password
from slipstream.transport.ssh import CONTROL_DESTINATION, CONTROL_MAX_PKTSIZE

_StreamHandler = Callable[[asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes]], Awaitable[None]]

log = logging.getLogger("slipstream.server")

SUBSYSTEM = "slipstream"
LOGIN_TIMEOUT = 30.0
# Per connection, like OpenSSH's MaxAuthTries but roomier, because clients offer every key
# in their agent and each refused key counts.
MAX_AUTH_FAILURES = 10
# Keepalives find clients that vanished (laptop lid closed) so their session ends instead of
# holding a handler forever; ~2 minutes of silence is well above any real stall.
KEEPALIVE_INTERVAL = 30.0
KEEPALIVE_COUNT_MAX = 4

SessionHandler = Callable[
    [UserConfig, asyncssh.SSHReader[bytes], asyncssh.SSHWriter[bytes], tuple[str, int]],
    Awaitable[int],
]

# Same cost as a real check: an unknown user or a user without a password must take as
# long to refuse as a wrong password, or timing would tell which user names exist.
_DUMMY_HASH = "scrypt$n=16384,r=8,p=1$AAAAAAAAAAAAAAAAAAAAAA$" + "A" * 43


class Authenticator:
    """Decides whether a user name plus a credential may log in, and as whom.

    Each check returns the :class:`UserConfig` to run the session as, or None. The SSH
    layer never tells the client *why* a check failed.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._keys = {
            u.name: asyncssh.import_authorized_keys("\n".join(u.authorized_keys))
            for u in config.users
            if u.authorized_keys
        }
        # scrypt takes ~16 MiB and tens of ms: cap concurrent checks so a password spray
        # cannot exhaust memory or starve the default thread pool other code uses.
        self._scrypt_slots = asyncio.Semaphore(2)

    async def check_password(self, username: str, password: str) -> UserConfig | None:
        user = self.config.user(username)
        stored = user.password_hash if user and user.password_hash else _DUMMY_HASH
        async with self._scrypt_slots:
            ok = await asyncio.to_thread(verify_password, password, stored)
        return user if ok and user is not None and user.password_hash else None

    def check_public_key(
        self, username: str, key: asyncssh.SSHKey, peer_ip: str
    ) -> UserConfig | None:
        user = self.config.user(username)
        keys = self._keys.get(username)
        if user is None or keys is None:
            return None
        # validate() also enforces authorized_keys options such as from="10.0.0.*".
        options = keys.validate(key, peer_ip, peer_ip)
        return user if options is not None else None


class SshServer:
    """A running server: ``port`` is the port actually bound (useful with port 0)."""

    def __init__(self, acceptor: asyncssh.SSHAcceptor, state: _State) -> None:
        self._acceptor = acceptor
        self._state = state
        # get_port() is 0 when a name resolved to several sockets, each with its own
        # ephemeral port; report the first so callers always get a usable number.
        self.port: int = acceptor.get_port() or int(acceptor.get_addresses()[0][1])

    def close(self) -> None:
        """Stop listening and drop every open connection (their handlers see EOF)."""
        self._acceptor.close()
        for conn in list(self._state.connections):
            conn.close()

    async def wait_closed(self) -> None:
        await self._acceptor.wait_closed()
        for conn in list(self._state.connections):
            await conn.wait_closed()

    async def __aenter__(self) -> SshServer:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        self.close()
        await self.wait_closed()


class _State:
    """What every connection of one server shares."""

    def __init__(self, auth: Authenticator, handler: SessionHandler) -> None:
        self.auth = auth
        self.handler = handler
        self.connections: set[asyncssh.SSHServerConnection] = set()


async def start_sshd(
    config: ServerConfig,
    handler: SessionHandler,
    *,
    host_key: asyncssh.SSHKey,
    authenticator: Authenticator | None = None,
    login_timeout: float = LOGIN_TIMEOUT,
) -> SshServer:
    """Listen on ``config.listen:config.ssh_port`` and serve the slipstream subsystem."""
    state = _State(authenticator or Authenticator(config), handler)
    acceptor = await asyncssh.create_server(
        lambda: _Connection(state),
        config.listen,
        config.ssh_port,
        server_host_keys=[host_key],
        encoding=None,  # binary channels: the session protocol frames its own bytes
        login_timeout=login_timeout,
        keepalive_interval=KEEPALIVE_INTERVAL,
        keepalive_count_max=KEEPALIVE_COUNT_MAX,
        allow_pty=False,
        agent_forwarding=False,
        x11_forwarding=False,
        gss_host=None,
        host_based_auth=False,
        line_editor=False,
    )
    server = SshServer(acceptor, state)
    log.info("SSH listening on %s:%d", config.listen, server.port)
    return server


class _Connection(asyncssh.SSHServer):
    """One client connection: authentication and channel policy."""

    def __init__(self, state: _State) -> None:
        self._state = state
        self._conn: asyncssh.SSHServerConnection | None = None
        self._peer: tuple[str, int] = ("?", 0)
        self._granted: dict[str, tuple[UserConfig, str]] = {}
        self._user: UserConfig | None = None
        self._failures = 0
        self._last_attempt = ""

    # --- connection life ---------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        peer = conn.get_extra_info("peername")
        self._peer = (str(peer[0]), int(peer[1])) if peer else ("?", 0)
        self._state.connections.add(conn)
        log.info("connection from %s", _fmt(self._peer))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._state.connections.discard(self._conn)
        if self._user is None and self._failures:
            log.warning(
                "auth failed from %s after %d attempt(s), last %s: %s",
                _fmt(self._peer),
                self._failures,
                self._last_attempt,
                _reason(exc),
            )
        elif self._user is None:
            log.info("connection from %s closed before login: %s", _fmt(self._peer), _reason(exc))
        else:
            log.info(
                "connection from %s user %r closed: %s",
                _fmt(self._peer),
                self._user.name,
                _reason(exc),
            )

    # --- authentication ----------------------------------------------------------------

    def begin_auth(self, username: str) -> bool:
        return True  # always require authentication, for known and unknown names alike

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        user = await self._state.auth.check_password(username, password)
        if user is None:
            return self._refuse(f"password for {username!r}")
        # A token login (server/tokens.py) says so, and whether the token was refused.
        return self._grant(username, user, getattr(user, "login_method", "password"))

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        user = self._state.auth.check_public_key(username, key, self._peer[0])
        method = f"key {key.get_fingerprint('sha256')}"
        if user is None:
            return self._refuse(f"{method} for {username!r}")
        # Called for the key query and again with the signature; asyncssh checks the
        # signature itself and only then calls auth_completed().
        return self._grant(username, user, method)

    def _refuse(self, attempt: str) -> bool:
        self._failures += 1
        self._last_attempt = attempt
        if self._failures >= MAX_AUTH_FAILURES and self._conn is not None:
            self._conn.disconnect(
                asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures"
            )
        return False

    def _grant(self, username: str, user: UserConfig, method: str) -> bool:
        # Keyed by the name asyncssh authenticates, so a later or cancelled attempt for
        # another name can never leave us running the session as the wrong user.
        self._granted[username] = (user, method)
        return True

    def auth_completed(self) -> None:
        assert self._conn is not None
        username = self._conn.get_extra_info("username")
        self._user, method = self._granted[username]
        log.info("auth ok from %s user %r by %s", _fmt(self._peer), self._user.name, method)

    # --- channels ----------------------------------------------------------------------

    def kbdint_auth_supported(self) -> bool:
        # Passwords are checked by ``password`` auth (one round trip); offering
        # keyboard-interactive too would let clients pick its two.
        return False

    def session_requested(self) -> asyncssh.SSHServerSession[bytes] | bool:
        if self._user is None:
            return False
        return _SubsystemOnlySession(self._state.handler, self._user, self._peer)

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> tuple[asyncssh.SSHTCPChannel[bytes], _StreamHandler]:
        """The direct control channel (transport/ssh.py); nothing is ever forwarded."""
        if self._user is None or (dest_host, dest_port) != CONTROL_DESTINATION:
            who = self._user.name if self._user else "?"
            log.warning(
                "refused port forwarding to %s:%d for user %r from %s",
                dest_host,
                dest_port,
                who,
                _fmt(self._peer),
            )
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "port forwarding is not offered"
            )
        user, peer, handler = self._user, self._peer, self._state.handler

        async def serve(
            reader: asyncssh.SSHReader[bytes], writer: asyncssh.SSHWriter[bytes]
        ) -> None:
            await _serve_control(handler, user, reader, writer, peer)
            writer.close()

        assert self._conn is not None  # a user is set only on a live connection
        return self._conn.create_tcp_channel(max_pktsize=CONTROL_MAX_PKTSIZE), serve


class _SubsystemOnlySession(SSHServerStreamSession[bytes]):
    """A session channel that accepts the slipstream subsystem and nothing else."""

    def __init__(self, handler: SessionHandler, user: UserConfig, peer: tuple[str, int]) -> None:
        super().__init__(self._run)
        self._handler = handler
        self._user = user
        self._peer = peer

    def pty_requested(self, *_args: object) -> bool:
        return False

    def shell_requested(self) -> bool:
        log.warning("refused shell for user %r from %s", self._user.name, _fmt(self._peer))
        return False

    def exec_requested(self, command: str) -> bool:
        log.warning("refused exec for user %r from %s", self._user.name, _fmt(self._peer))
        return False

    def subsystem_requested(self, subsystem: str) -> bool:
        if subsystem == SUBSYSTEM:
            return True
        log.warning(
            "refused subsystem %r for user %r from %s", subsystem, self._user.name, _fmt(self._peer)
        )
        return False

    async def _run(
        self,
        reader: asyncssh.SSHReader[bytes],
        writer: asyncssh.SSHWriter[bytes],
        _stderr: asyncssh.SSHWriter[bytes],
    ) -> None:
        status = await _serve_control(self._handler, self._user, reader, writer, self._peer)
        channel = cast(asyncssh.SSHServerChannel[bytes], writer.channel)
        with contextlib.suppress(OSError):  # the client may already be gone
            channel.exit(status)


async def _serve_control(
    handler: SessionHandler,
    user: UserConfig,
    reader: asyncssh.SSHReader[bytes],
    writer: asyncssh.SSHWriter[bytes],
    peer: tuple[str, int],
) -> int:
    """Run the session handler on one control stream; its status, or 255 / 1 on failure."""
    try:
        return await handler(user, reader, writer, peer)
    except (BrokenPipeError, ConnectionError, asyncssh.DisconnectError) as exc:
        # The client vanished mid-session: expected on a network, not a server bug.
        log.info("user %r from %s went away: %s", user.name, _fmt(peer), exc)
        return 255
    except Exception:
        # The handler owns error reporting to the client; anything else escaping it is
        # a bug, so log it and end this channel only, never the whole server.
        log.exception("session handler failed for user %r", user.name)
        return 1


def _fmt(peer: tuple[str, int]) -> str:
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _reason(exc: Exception | None) -> str:
    return "closed normally" if exc is None else str(exc) or type(exc).__name__
