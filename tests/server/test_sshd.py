"""The embedded SSH server, driven by a plain asyncssh client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import cast

import asyncssh
import pytest

from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.hostkey import load_or_create_host_key
from slipstream.server.passwords import check_password_hash, hash_password
from slipstream.server.sshd import _DUMMY_HASH, MAX_AUTH_FAILURES, SshServer, start_sshd

PASSWORD = "s3cret"
PASSWORD_HASH = hash_password(PASSWORD)
CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")
OTHER_KEY = asyncssh.generate_private_key("ssh-ed25519")


async def echo_handler(
    user: UserConfig,
    reader: asyncssh.SSHReader[bytes],
    writer: asyncssh.SSHWriter[bytes],
    peer: tuple[str, int],
) -> int:
    """Answers one line with ``user:line``; ``boom`` makes it raise."""
    line = await reader.readline()
    if line == b"boom\n":
        raise RuntimeError("handler bug")
    writer.write(user.name.encode() + b":" + line)
    await writer.drain()
    return 7


def make_config(tmp_path: Path) -> ServerConfig:
    pub = CLIENT_KEY.export_public_key().decode()
    users = (
        UserConfig(name="alice", docroot=tmp_path, password_hash=PASSWORD_HASH),
        UserConfig(name="bob", docroot=tmp_path, authorized_keys=(pub,)),
    )
    return ServerConfig(
        path=tmp_path / "server.toml",
        listen="127.0.0.1",
        ssh_port=0,
        fasp_port=0,
        host_key=tmp_path / "host_key",
        state_dir=tmp_path / "state",
        users=users,
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SshServer]:
    config = make_config(tmp_path)
    key = load_or_create_host_key(config.host_key)
    async with await start_sshd(config, echo_handler, host_key=key) as srv:
        yield srv


def connect(
    port: int, user: str, **kwargs: object
) -> AbstractAsyncContextManager[asyncssh.SSHClientConnection]:
    options: dict[str, object] = {
        "known_hosts": None,
        "config": None,
        "client_keys": None,
        "agent_path": None,
        "connect_timeout": 10,
    }
    options.update(kwargs)
    return asyncssh.connect("127.0.0.1", port, username=user, **options)


async def roundtrip(conn: asyncssh.SSHClientConnection, data: bytes) -> tuple[bytes, int | None]:
    writer, reader, _ = await conn.open_session(subsystem="slipstream", encoding=None)
    writer.write(data)
    reply = await reader.read()
    channel = cast(asyncssh.SSHClientChannel[bytes], writer.channel)
    await channel.wait_closed()
    return reply, channel.get_exit_status()


async def test_password_login_runs_handler(server: SshServer) -> None:
    assert server.port > 0
    async with connect(server.port, "alice", password=PASSWORD) as conn:
        assert await roundtrip(conn, b"hello\n") == (b"alice:hello\n", 7)


async def test_wrong_password_and_unknown_user_look_the_same(server: SshServer) -> None:
    errors = []
    for user, password in (("alice", "wrong"), ("mallory", PASSWORD), ("bob", PASSWORD)):
        with pytest.raises(asyncssh.PermissionDenied) as info:
            async with connect(server.port, user, password=password):
                pass
        errors.append((type(info.value), info.value.code, info.value.reason.replace(user, "U")))
    assert len(set(errors)) == 1, errors


def test_dummy_hash_costs_a_real_check() -> None:
    # If the dummy were malformed, verify_password would return at once and the time
    # taken would tell unknown users from known ones.
    check_password_hash(_DUMMY_HASH)


async def test_key_login(server: SshServer) -> None:
    async with connect(server.port, "bob", client_keys=[CLIENT_KEY]) as conn:
        assert await roundtrip(conn, b"k\n") == (b"bob:k\n", 7)


async def test_unauthorized_key_refused(server: SshServer) -> None:
    for user in ("bob", "alice", "mallory"):
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(server.port, user, client_keys=[OTHER_KEY]):
                pass
    with pytest.raises(asyncssh.PermissionDenied):  # bob's key is not alice's
        async with connect(server.port, "alice", client_keys=[CLIENT_KEY]):
            pass


async def test_authorized_keys_options_enforced(tmp_path: Path) -> None:
    pub = CLIENT_KEY.export_public_key().decode()
    config = make_config(tmp_path)
    carol = UserConfig(name="carol", docroot=tmp_path, authorized_keys=(f'from="10.9.9.9" {pub}',))
    config = ServerConfig(**{**config.__dict__, "users": (carol,)})
    key = load_or_create_host_key(config.host_key)
    async with await start_sshd(config, echo_handler, host_key=key) as srv:
        with pytest.raises(asyncssh.PermissionDenied):
            async with connect(srv.port, "carol", client_keys=[CLIENT_KEY]):
                pass


async def test_only_the_subsystem_is_allowed(server: SshServer) -> None:
    async with connect(server.port, "alice", password=PASSWORD) as conn:
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.run("id")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process()  # a shell
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.create_process(term_type="xterm")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.start_sftp_client()
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_session(subsystem="other")
        with pytest.raises(asyncssh.ChannelOpenError):
            await conn.open_connection("127.0.0.1", server.port)
        with pytest.raises(asyncssh.ChannelListenError):
            await conn.forward_remote_port("127.0.0.1", 0, "127.0.0.1", 9)
        # The connection survives refusals and still serves the subsystem.
        assert await roundtrip(conn, b"still\n") == (b"alice:still\n", 7)


async def test_handler_crash_ends_only_that_channel(server: SshServer) -> None:
    async with connect(server.port, "alice", password=PASSWORD) as conn:
        assert await roundtrip(conn, b"boom\n") == (b"", 1)
        assert await roundtrip(conn, b"ok\n") == (b"alice:ok\n", 7)


class _Guesser(asyncssh.SSHClient):
    def __init__(self) -> None:
        self.tries = 0

    def password_auth_requested(self) -> str:
        self.tries += 1
        return f"guess{self.tries}"


async def test_too_many_failures_disconnect(server: SshServer) -> None:
    guesser = _Guesser()
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(server.port, "alice", client_factory=lambda: guesser):
            pass
    assert guesser.tries == MAX_AUTH_FAILURES


async def test_login_timeout(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    key = load_or_create_host_key(config.host_key)
    async with await start_sshd(config, echo_handler, host_key=key, login_timeout=0.5) as srv:
        reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
        try:
            data = await asyncio.wait_for(reader.read(), 10)  # until the server hangs up
        finally:
            writer.close()
        assert data.startswith(b"SSH-2.0-")


async def test_logs_one_line_per_result(
    server: SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="slipstream.server")
    async with connect(server.port, "alice", password=PASSWORD) as conn:
        await roundtrip(conn, b"x\n")
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(server.port, "alice", password="nope"):
            pass
    await asyncio.sleep(0.1)  # connection_lost runs after the client is gone
    messages = [r.getMessage() for r in caplog.records if r.name == "slipstream.server"]
    assert sum("auth ok" in m and "'alice' by password" in m for m in messages) == 1
    assert sum("auth failed" in m and "password for 'alice'" in m for m in messages) == 1
    assert all("nope" not in m for m in messages)  # never log a password


async def test_close_drops_open_connections(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    key = load_or_create_host_key(config.host_key)
    srv = await start_sshd(config, echo_handler, host_key=key)
    async with connect(srv.port, "alice", password=PASSWORD) as conn:
        writer, reader, _ = await conn.open_session(subsystem="slipstream", encoding=None)
        srv.close()
        await asyncio.wait_for(srv.wait_closed(), 10)
        assert await asyncio.wait_for(reader.read(), 10) == b""
