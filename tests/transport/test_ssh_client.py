"""open_control_channel against the real embedded server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncssh
import pytest

from slipstream.errors import (
    AuthenticationError,
    ConnectError,
    HostKeyError,
    UnsupportedError,
    UsageError,
)
from slipstream.server.config import ServerConfig, UserConfig
from slipstream.server.hostkey import fingerprint, load_or_create_host_key
from slipstream.server.passwords import hash_password
from slipstream.server.sshd import SshServer, start_sshd
from slipstream.transport import ssh as ssh_client
from slipstream.transport.ssh import (
    ControlChannel,
    _os_error_message,
    default_known_hosts_path,
    open_control_channel,
)

PASSWORD = "pa55word"
PASSWORD_HASH = hash_password(PASSWORD)
CLIENT_KEY = asyncssh.generate_private_key("ssh-ed25519")
OTHER_KEY = asyncssh.generate_private_key("ssh-ed25519")


async def echo_handler(
    user: UserConfig,
    reader: asyncssh.SSHReader[bytes],
    writer: asyncssh.SSHWriter[bytes],
    peer: tuple[str, int],
) -> int:
    line = await reader.readline()
    if not line:
        return 0  # the client connected and left without a word
    writer.write(user.name.encode() + b":" + line)
    await writer.drain()
    return 3


@pytest.fixture(autouse=True)
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Never touch the real ~/.ssh, agent or user config dir."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("SLIPSTREAM_KNOWN_HOSTS", str(tmp_path / "env_known_hosts"))
    yield home


def make_config(tmp_path: Path, port: int = 0) -> ServerConfig:
    pub = CLIENT_KEY.export_public_key().decode()
    return ServerConfig(
        path=tmp_path / "server.toml",
        listen="127.0.0.1",
        ssh_port=port,
        fasp_port=0,
        host_key=tmp_path / "host_key",
        state_dir=tmp_path / "state",
        users=(
            UserConfig(name="alice", docroot=tmp_path, password_hash=PASSWORD_HASH),
            UserConfig(name="bob", docroot=tmp_path, authorized_keys=(pub,)),
        ),
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[SshServer]:
    config = make_config(tmp_path)
    async with await start_sshd(
        config, echo_handler, host_key=load_or_create_host_key(config.host_key)
    ) as srv:
        yield srv


@pytest.fixture
def server_fp(tmp_path: Path, server: SshServer) -> str:
    return fingerprint(load_or_create_host_key(tmp_path / "host_key"))


@pytest.fixture
def known_hosts(tmp_path: Path) -> Path:
    return tmp_path / "cfg" / "known_hosts"


async def exchange(channel: ControlChannel, data: bytes) -> bytes:
    async with channel:
        channel.writer.write(data)
        reply = await channel.reader.read()
        await channel.writer.channel.wait_closed()
    return reply


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def key_file(tmp_path: Path, key: asyncssh.SSHKey, passphrase: str | None = None) -> Path:
    path = tmp_path / f"id_{fingerprint(key)[7:15].replace('/', '_')}"
    # PKCS#8 because encrypted OpenSSH-format keys need bcrypt, which is not installed.
    path.write_bytes(key.export_private_key("pkcs8-pem", passphrase))
    path.chmod(0o600)
    return path


# --- authentication ---------------------------------------------------------------------


async def test_password_login(server: SshServer, server_fp: str, known_hosts: Path) -> None:
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=server_fp
    )
    assert channel.server_fingerprint == server_fp
    assert channel.peer_address == ("127.0.0.1", server.port)
    assert await exchange(channel, b"hi\n") == b"alice:hi\n"


@pytest.mark.parametrize(("user", "password"), [("alice", "wrong"), ("nobody", PASSWORD)])
async def test_bad_credentials(server: SshServer, server_fp: str, user: str, password: str) -> None:
    with pytest.raises(AuthenticationError) as info:
        await open_control_channel(
            "127.0.0.1", server.port, user, password=password, sshfp=server_fp
        )
    assert not info.value.retryable
    assert f"authentication failed for user {user!r}" in info.value.user_message


async def test_key_login(server: SshServer, server_fp: str, tmp_path: Path) -> None:
    path = key_file(tmp_path, CLIENT_KEY)
    channel = await open_control_channel(
        "127.0.0.1", server.port, "bob", client_keys=[path], sshfp=server_fp
    )
    assert await exchange(channel, b"k\n") == b"bob:k\n"


async def test_encrypted_key_login(server: SshServer, server_fp: str, tmp_path: Path) -> None:
    path = key_file(tmp_path, CLIENT_KEY, passphrase="pp")
    channel = await open_control_channel(
        "127.0.0.1", server.port, "bob", client_keys=[str(path)], passphrase="pp", sshfp=server_fp
    )
    assert await exchange(channel, b"e\n") == b"bob:e\n"
    with pytest.raises(AuthenticationError, match="cannot use SSH key"):
        await open_control_channel(
            "127.0.0.1", server.port, "bob", client_keys=[path], passphrase="no", sshfp=server_fp
        )


async def test_missing_key_file(server: SshServer, server_fp: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read SSH key"):
        await open_control_channel(
            "127.0.0.1", server.port, "bob", client_keys=[tmp_path / "nope"], sshfp=server_fp
        )


async def test_unauthorized_key(server: SshServer, server_fp: str, tmp_path: Path) -> None:
    path = key_file(tmp_path, OTHER_KEY)
    with pytest.raises(AuthenticationError):
        await open_control_channel(
            "127.0.0.1", server.port, "bob", client_keys=[path], sshfp=server_fp
        )


async def test_default_keys_from_home(
    server: SshServer, server_fp: str, isolated_home: Path
) -> None:
    ssh_dir = isolated_home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "id_ed25519").write_bytes(CLIENT_KEY.export_private_key())
    (ssh_dir / "id_ed25519").chmod(0o600)
    channel = await open_control_channel("127.0.0.1", server.port, "bob", sshfp=server_fp)
    assert await exchange(channel, b"d\n") == b"bob:d\n"


async def test_empty_key_list_means_no_keys(
    server: SshServer, server_fp: str, isolated_home: Path
) -> None:
    ssh_dir = isolated_home / ".ssh"
    ssh_dir.mkdir()
    (ssh_dir / "id_ed25519").write_bytes(CLIENT_KEY.export_private_key())
    (ssh_dir / "id_ed25519").chmod(0o600)
    with pytest.raises(AuthenticationError, match="no password and no SSH key"):
        await open_control_channel("127.0.0.1", server.port, "bob", client_keys=[], sshfp=server_fp)


@pytest.mark.parametrize("home", ["missing", "unresolvable"])
async def test_password_works_without_home(
    server: SshServer, server_fp: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, home: str
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "does-not-exist"))
    if home == "unresolvable":

        def no_home() -> Path:
            raise RuntimeError("Could not determine home directory.")

        monkeypatch.setattr(Path, "home", staticmethod(no_home))
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=server_fp
    )
    assert await exchange(channel, b"h\n") == b"alice:h\n"


# --- host keys --------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["exact", "bare"])
async def test_sshfp_pin_match(
    server: SshServer, server_fp: str, known_hosts: Path, form: str
) -> None:
    pin = server_fp if form == "exact" else server_fp.removeprefix("SHA256:") + "="
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=pin, known_hosts=known_hosts
    )
    assert await exchange(channel, b"p\n") == b"alice:p\n"
    assert not known_hosts.exists()  # a pin does not touch known_hosts


async def test_sshfp_pin_mismatch(server: SshServer, server_fp: str) -> None:
    wrong = fingerprint(OTHER_KEY)
    with pytest.raises(HostKeyError) as info:
        await open_control_channel(
            "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=wrong
        )
    message = info.value.user_message
    assert f"expected {wrong}, got {server_fp}" in message
    assert not info.value.retryable


async def test_unknown_host_then_accept_new_then_remembered(
    server: SshServer, server_fp: str, known_hosts: Path
) -> None:
    args = ("127.0.0.1", server.port, "alice")
    with pytest.raises(HostKeyError) as info:
        await open_control_channel(*args, password=PASSWORD, known_hosts=known_hosts)
    assert server_fp in info.value.user_message
    assert "accept_new_host" in info.value.user_message
    assert not known_hosts.exists()

    channel = await open_control_channel(
        *args, password=PASSWORD, known_hosts=known_hosts, accept_new_host=True
    )
    assert await exchange(channel, b"1\n") == b"alice:1\n"
    line = known_hosts.read_text()
    assert line.startswith(f"[127.0.0.1]:{server.port} ssh-ed25519 ")
    assert oct(known_hosts.stat().st_mode & 0o777) == "0o600"

    channel = await open_control_channel(*args, password=PASSWORD, known_hosts=known_hosts)
    assert await exchange(channel, b"2\n") == b"alice:2\n"
    assert known_hosts.read_text() == line  # recorded once


async def test_accept_new_records_even_if_auth_fails(server: SshServer, known_hosts: Path) -> None:
    with pytest.raises(AuthenticationError):
        await open_control_channel(
            "127.0.0.1",
            server.port,
            "alice",
            password="bad",
            known_hosts=known_hosts,
            accept_new_host=True,
        )
    assert known_hosts.read_text().startswith(f"[127.0.0.1]:{server.port} ")


async def test_changed_host_key_refused(
    server: SshServer, server_fp: str, known_hosts: Path
) -> None:
    known_hosts.parent.mkdir(parents=True)
    impostor = OTHER_KEY.export_public_key().decode().strip()
    known_hosts.write_text(f"[127.0.0.1]:{server.port} {impostor}\n")
    for accept_new in (False, True):
        with pytest.raises(HostKeyError) as info:
            await open_control_channel(
                "127.0.0.1",
                server.port,
                "alice",
                password=PASSWORD,
                known_hosts=known_hosts,
                accept_new_host=accept_new,
            )
        message = info.value.user_message
        assert "CHANGED" in message and fingerprint(OTHER_KEY) in message and server_fp in message
    assert known_hosts.read_text() == f"[127.0.0.1]:{server.port} {impostor}\n"


async def test_revoked_key_refused(server: SshServer, tmp_path: Path, known_hosts: Path) -> None:
    known_hosts.parent.mkdir(parents=True)
    pub = load_or_create_host_key(tmp_path / "host_key").export_public_key().decode().strip()
    known_hosts.write_text(f"@revoked * {pub}\n[127.0.0.1]:{server.port} {pub}\n")
    with pytest.raises(HostKeyError, match="revoked"):
        await open_control_channel(
            "127.0.0.1", server.port, "alice", password=PASSWORD, known_hosts=known_hosts
        )


async def test_hashed_entry_and_other_port_entries(
    server: SshServer, tmp_path: Path, known_hosts: Path
) -> None:
    known_hosts.parent.mkdir(parents=True)
    pub = load_or_create_host_key(tmp_path / "host_key").export_public_key().decode().strip()
    impostor = OTHER_KEY.export_public_key().decode().strip()
    salt = os.urandom(20)
    digest = hmac.new(salt, f"[127.0.0.1]:{server.port}".encode(), hashlib.sha1).digest()
    hashed = f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"
    # Entries for the same address on other ports are other servers, not a changed key.
    known_hosts.write_text(
        f"# comment\n127.0.0.1 {impostor}\n[127.0.0.1]:1 {impostor}\nnot a valid line\n"
        f"{hashed} {pub}\n"
    )
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, known_hosts=known_hosts
    )
    assert await exchange(channel, b"h\n") == b"alice:h\n"


async def test_env_known_hosts_is_the_default(
    server: SshServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "from_env"
    monkeypatch.setenv("SLIPSTREAM_KNOWN_HOSTS", str(path))
    assert default_known_hosts_path() == path
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, accept_new_host=True
    )
    await channel.close()
    assert path.read_text().startswith(f"[127.0.0.1]:{server.port} ")


def test_default_known_hosts_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SLIPSTREAM_KNOWN_HOSTS")
    path = default_known_hosts_path()
    assert path.name == "known_hosts" and path.parent.name == "slipstream"


async def test_host_key_persists_across_restarts(tmp_path: Path, known_hosts: Path) -> None:
    config = make_config(tmp_path)
    first_key = load_or_create_host_key(config.host_key)
    async with await start_sshd(config, echo_handler, host_key=first_key) as srv:
        port = srv.port
        channel = await open_control_channel(
            "127.0.0.1",
            port,
            "alice",
            password=PASSWORD,
            known_hosts=known_hosts,
            accept_new_host=True,
        )
        await channel.close()
    second_key = load_or_create_host_key(config.host_key)
    assert fingerprint(second_key) == fingerprint(first_key)
    restarted = make_config(tmp_path, port=port)
    async with await start_sshd(restarted, echo_handler, host_key=second_key):
        channel = await open_control_channel(
            "127.0.0.1", port, "alice", password=PASSWORD, known_hosts=known_hosts
        )
        assert await exchange(channel, b"r\n") == b"alice:r\n"


# --- connection errors ------------------------------------------------------------------


async def test_nothing_listening() -> None:
    port = free_port()
    with pytest.raises(ConnectError) as info:
        await open_control_channel("127.0.0.1", port, "alice", password=PASSWORD)
    assert info.value.user_message == f"nothing is listening on 127.0.0.1:{port} (SSH)"
    assert info.value.retryable


def test_refused_on_every_address_is_nothing_listening() -> None:
    # A name with several addresses fails with a plain OSError listing each refusal.
    exc = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 9), "
        "[Errno 111] Connect call failed ('127.0.0.1', 9)"
    )
    assert _os_error_message(exc, "localhost:9") == "nothing is listening on localhost:9 (SSH)"


async def test_silent_server_times_out() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_server(mute, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ConnectError, match="no answer from 127.0.0.1:.* within 0.5 s"):
            await open_control_channel(
                "127.0.0.1", port, "alice", password=PASSWORD, connect_timeout=0.5
            )
    finally:
        silent.close()
        await silent.wait_closed()


async def test_ssh_server_without_the_subsystem(tmp_path: Path) -> None:
    class _Open(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return False  # no authentication at all

    key = load_or_create_host_key(tmp_path / "other_key")
    plain = await asyncssh.create_server(
        _Open, "127.0.0.1", 0, server_host_keys=[key], sftp_factory=True
    )
    try:
        with pytest.raises(UnsupportedError, match="refused the 'slipstream' subsystem"):
            await open_control_channel("127.0.0.1", plain.get_port(), "x", sshfp=fingerprint(key))
    finally:
        plain.close()
        await plain.wait_closed()


# --- the control stream and its round trips -------------------------------------------


async def test_old_server_without_the_direct_channel_gets_the_subsystem(
    server: SshServer, server_fp: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A destination this server does not serve looks, to the client, like an older server.
    monkeypatch.setattr(ssh_client, "CONTROL_DESTINATION", ("elsewhere", 1))
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=server_fp
    )
    assert await exchange(channel, b"hi\n") == b"alice:hi\n"
    assert channel.exit_status == 3  # a subsystem channel carries the handler's status


async def test_real_port_forwarding_is_refused(server: SshServer, server_fp: str) -> None:
    listener = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    conn = await asyncssh.connect(
        "127.0.0.1", server.port, username="alice", password=PASSWORD, known_hosts=None
    )
    try:
        with pytest.raises(asyncssh.ChannelOpenError, match="not offered"):
            await conn.open_connection("127.0.0.1", port)
    finally:
        conn.close()
        listener.close()


class _DelayProxy:
    """A TCP relay on 127.0.0.1 that holds every chunk ``one_way`` seconds, each way: a long
    path for counting round trips. ``flights`` counts client-to-server bursts that follow
    a server reply (a new round trip)."""

    def __init__(self, target_port: int, one_way: float) -> None:
        self.target_port, self.one_way = target_port, one_way
        self.round_trips = 0
        self._last = "server"

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        self._server.close()

    async def _relay(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        await asyncio.sleep(self.one_way * 2)  # the TCP handshake's round trip
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pump(client_r, server_w, "client"), self._pump(server_r, client_w, "server")
        )

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, side: str) -> None:
        loop = asyncio.get_running_loop()
        while data := await src.read(65536):
            if side == "client" and self._last == "server":
                self.round_trips += 1
            self._last = side
            loop.call_later(self.one_way, dst.write, data)  # call_later keeps the order
        loop.call_later(self.one_way, dst.close)


async def test_control_channel_opens_in_few_round_trips(server: SshServer, server_fp: str) -> None:
    # TCP, key exchange init, key exchange, service, password, channel: six. (Before: a
    # "none" probe, keyboard-interactive's two and a subsystem request made ten.)
    proxy = _DelayProxy(server.port, one_way=0.05)
    port = await proxy.start()
    try:
        started = asyncio.get_running_loop().time()
        channel = await open_control_channel(
            "127.0.0.1", port, "alice", password=PASSWORD, sshfp=server_fp
        )
        elapsed = asyncio.get_running_loop().time() - started
        assert await exchange(channel, b"hi\n") == b"alice:hi\n"
    finally:
        proxy.close()
    # Seven client flights: the six above plus the exchange itself (ten before).
    assert proxy.round_trips <= 7
    assert elapsed < 8 * 0.1, f"{elapsed:.2f} s for six round trips of 0.1 s"


async def test_control_channel_packets_are_small_both_ways(
    server: SshServer, server_fp: str
) -> None:
    # A big batch of announcements in one 32 KiB packet reaches the server only when its
    # last byte does; small packets let the first messages act at once (ssh.py).
    channel = await open_control_channel(
        "127.0.0.1", server.port, "alice", password=PASSWORD, sshfp=server_fp
    )
    chan = channel.writer.channel
    assert chan._send_pktsize == ssh_client.CONTROL_MAX_PKTSIZE  # what the server accepts
    assert chan._recv_pktsize == ssh_client.CONTROL_MAX_PKTSIZE  # what we asked it to send
    assert await exchange(channel, b"x" * 20_000 + b"\n") == b"alice:" + b"x" * 20_000 + b"\n"
