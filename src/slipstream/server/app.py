"""`slipstream serve`: the SSH control port, the shared UDP data port, and the sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slipstream.server.config import ServerConfig
from slipstream.server.hostkey import fingerprint, load_or_create_host_key
from slipstream.server.session import SessionManager
from slipstream.server.sshd import start_sshd
from slipstream.transport.endpoint import UdpDispatcher
from slipstream.transport.udp import DatagramSocket

log = logging.getLogger("slipstream.server")


@dataclass
class RunningServer:
    """A started server; ``info`` is what clients need to reach it."""

    info: dict[str, Any]
    manager: SessionManager
    _sshd: Any
    _sock: DatagramSocket

    async def close(self) -> None:
        self._sshd.close()
        await self._sshd.wait_closed()
        self._sock.close()


async def start_server(config: ServerConfig) -> RunningServer:
    """Bind both ports and accept sessions; returns once the server is ready."""
    host_key = load_or_create_host_key(config.host_key)
    sock = DatagramSocket.bind(config.listen, config.fasp_port)
    try:
        manager = SessionManager(config, UdpDispatcher(sock))
        sshd = await start_sshd(config, manager.handle, host_key=host_key)
    except BaseException:
        sock.close()
        raise
    info = {
        "host": config.listen,
        "ssh_port": sshd.port,
        "fasp_port": sock.local_address[1],
        "sshfp": fingerprint(host_key),
    }
    log.info(
        "listening host=%s ssh_port=%d fasp_port=%d sshfp=%s",
        info["host"],
        info["ssh_port"],
        info["fasp_port"],
        info["sshfp"],
    )
    return RunningServer(info, manager, sshd, sock)


async def serve_forever(
    config: ServerConfig, on_ready: Callable[[dict[str, Any]], None] | None = None
) -> None:
    server = await start_server(config)
    try:
        if on_ready is not None:
            on_ready(server.info)
        await asyncio.Event().wait()
    finally:
        await server.close()
