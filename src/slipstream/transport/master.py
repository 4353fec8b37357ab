"""The background process behind ``--persist``: one SSH login, shared by later transfers.

Started by transport/shared.py with the login as JSON on stdin. It forks at once (its
parent exits, so the starter never waits on it), takes the lock for its login, logs in, and
listens on ``ssh-KEY.sock`` in the user's private run folder. Each client connection sends
one JSON line:

- ``{"op": "open"}``: the master hands over a control stream on its connection (opened
  ahead of time for the next client, so usually at once) and answers
  ``{"ok": true, "peer": [ip, port], "fingerprint": "SHA256:..."}`` (or ``{"ok": false,
  "error": {...}}``); from then on the socket carries the stream's bytes both ways.
- ``{"op": "info"}``: answers ``{"ok": true, "user", "server", "fingerprint", "pid",
  "streams", "persist_s"}`` (``slipstream logins``).
- ``{"op": "exit"}``: answers ``{"ok": true}``, then closes the connection and exits.

It exits when it has had no stream for ``persist`` seconds, when its SSH connection ends,
or when asked; it removes its socket then. Its log is ``ssh-KEY.log`` next to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from slipstream.errors import SlipstreamError
from slipstream.transport.shared import SharedLogin
from slipstream.transport.ssh import SshLogin, open_control_stream, ssh_login
from slipstream.transport.tcp_tuning import corked, prefer_loss_tolerant_tcp

log = logging.getLogger("slipstream.transport.master")

REQUEST_TIMEOUT = 10.0
RELAY_CHUNK = 65536


class Master:
    """Serves control streams on one logged-in connection until idle, asked, or cut."""

    def __init__(self, login: SharedLogin, ssh: SshLogin) -> None:
        self.login = login
        self.ssh = ssh
        self.active = 0
        self.done = asyncio.Event()
        self._idle: asyncio.TimerHandle | None = None
        self._tcp = ssh.conn.get_extra_info("socket")
        prefer_loss_tolerant_tcp(self._tcp)
        self._spare: asyncio.Future[tuple[Any, Any]] | None = None

    def prepare_spare(self) -> None:
        """Open the next client's stream ahead of time: a transfer that finds it waiting
        starts one round trip sooner. The server waits for OPEN on it as long as need be."""
        self._spare = asyncio.ensure_future(
            open_control_stream(self.ssh.conn, self.ssh.where, REQUEST_TIMEOUT)
        )
        # A spare that fails is simply not used (_take_stream opens another): its error is
        # read here so asyncio does not report it as never retrieved.
        self._spare.add_done_callback(lambda f: f.cancelled() or f.exception())

    def close_spare(self) -> None:
        if self._spare is not None:
            self._spare.cancel()
            self._spare = None

    async def _take_stream(self) -> tuple[Any, Any]:
        spare, self._spare = self._spare, None
        self.prepare_spare()  # the one after, while this one serves
        if spare is not None:
            with contextlib.suppress(SlipstreamError):
                reader, writer = await spare
                if not reader.at_eof():
                    return reader, writer
                writer.close()
        return await open_control_stream(self.ssh.conn, self.ssh.where, REQUEST_TIMEOUT)

    def info(self) -> dict[str, Any]:
        """What ``slipstream logins`` shows."""
        return {
            "user": self.login.user,
            "server": self.ssh.where,
            "fingerprint": self.ssh.fingerprint,
            "pid": os.getpid(),
            "streams": self.active,
            "persist_s": self.login.persist,
        }

    def start_idle_timer(self) -> None:
        self._cancel_idle_timer()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self.login.persist, self._expire)

    def _cancel_idle_timer(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def _expire(self) -> None:
        if self.active == 0:
            log.info("idle for %g s: closing", self.login.persist)
            self.done.set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if not _same_user(writer):
                log.warning("refused a client of another user")
                return
            line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT)
            request = json.loads(line or b"{}")
            if not isinstance(request, dict):
                request = {}
            if request.get("op") == "info":
                await _reply(writer, {"ok": True, **self.info()})
            elif request.get("op") == "exit":
                await _reply(writer, {"ok": True})
                self.done.set()
            elif request.get("op") == "open":
                await self._serve_stream(reader, writer)
            else:
                await _reply(writer, {"ok": False, "error": {"message": "unknown request"}})
        except (OSError, TimeoutError, ValueError) as exc:
            log.info("client went away: %s", exc)
        finally:
            writer.close()

    async def _serve_stream(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.active += 1
        self._cancel_idle_timer()
        try:
            try:
                ch_reader, ch_writer = await self._take_stream()
            except SlipstreamError as exc:
                await _reply(writer, {"ok": False, "error": exc.to_dict()})
                if exc.retryable:  # the connection itself is failing: let the next log in
                    self.done.set()
                return
            peer = list(self.ssh.peer_address)
            await _reply(writer, {"ok": True, "peer": peer, "fingerprint": self.ssh.fingerprint})
            await self._relay(reader, writer, ch_reader, ch_writer)
        finally:
            self.active -= 1
            if self.active == 0:
                self.start_idle_timer()

    async def _relay(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ch_reader: Any,
        ch_writer: Any,
    ) -> None:
        upstream = asyncio.ensure_future(self._to_server(reader, ch_writer))
        downstream = asyncio.ensure_future(_to_client(ch_reader, writer))
        try:
            await asyncio.wait({upstream, downstream}, return_when=asyncio.FIRST_COMPLETED)
            if upstream.done() and upstream.exception() is None:
                # The client finished sending; what the server still says goes to it.
                await asyncio.wait({downstream})
        finally:
            for task in (upstream, downstream):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            ch_writer.close()

    async def _to_server(self, reader: asyncio.StreamReader, ch_writer: Any) -> None:
        while data := await reader.read(RELAY_CHUNK):
            with corked(self._tcp):  # as the control stream does on a direct connection
                ch_writer.write(data)
            await ch_writer.drain()
        ch_writer.write_eof()


async def _to_client(ch_reader: Any, writer: asyncio.StreamWriter) -> None:
    while data := await ch_reader.read(RELAY_CHUNK):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def _reply(writer: asyncio.StreamWriter, body: dict[str, Any]) -> None:
    writer.write(json.dumps(body).encode() + b"\n")
    await writer.drain()


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return bool(uid == os.getuid())


async def serve(login: SharedLogin) -> None:
    path = login.socket_path()
    lock = _take_lock(path.with_suffix(".lock"))
    if lock is None:
        log.info("another master serves %s", path)
        return
    try:
        ssh = await ssh_login(login.host, login.port, login.user, **login.ssh_options())
    except SlipstreamError as exc:
        log.warning("login failed: %s", exc.user_message)
        return
    master = Master(login, ssh)
    server, inode = await _listen(path, master)
    log.info("serving %s@%s on %s for %g s idle", login.user, ssh.where, path, login.persist)
    master.start_idle_timer()
    master.prepare_spare()
    closed = asyncio.ensure_future(ssh.conn.wait_closed())
    asked = asyncio.ensure_future(master.done.wait())
    try:
        await asyncio.wait({closed, asked}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        _remove_if_ours(path, inode)
        master.close_spare()
        server.close()
        ssh.conn.close()
        closed.cancel()
        asked.cancel()
    log.info("closed")


async def _listen(path: Path, master: Master) -> tuple[asyncio.AbstractServer, int]:
    # Bound under a temporary name and renamed: a client never finds a socket that does not
    # answer yet, and a stale socket of a dead master is replaced in one step.
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    server = await asyncio.start_unix_server(master.handle, path=str(temporary))
    os.chmod(temporary, 0o600)
    inode = temporary.stat().st_ino
    os.replace(temporary, path)
    return server, inode


def _remove_if_ours(path: Path, inode: int) -> None:
    """Remove the socket unless a newer master has already put its own there."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


def _take_lock(path: Path) -> int | None:
    """The login's lock, held for the master's life: one master per login."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def main() -> None:
    login = SharedLogin.from_json(sys.stdin.read())
    if os.fork() > 0:
        os._exit(0)  # the starter waits for this parent only; the master lives on
    path = login.socket_path()
    logging.basicConfig(
        filename=str(path.with_suffix(".log")),
        level=logging.INFO,
        format="%(asctime)s %(process)d %(message)s",
    )
    try:
        asyncio.run(serve(login))
    except Exception:  # nobody sees this process's stderr: the log must say why it ended
        log.exception("the master failed")


if __name__ == "__main__":
    main()
