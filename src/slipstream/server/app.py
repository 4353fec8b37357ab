"""`slipstream serve`: the SSH control port, the shared UDP data port, and the sessions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from slipstream.server.config import ServerConfig
from slipstream.server.hostkey import fingerprint, load_or_create_host_key
from slipstream.server.services import ServerServices
from slipstream.server.session import SessionManager
from slipstream.server.sshd import start_sshd
from slipstream.transport.endpoint import Endpoint, UdpDispatcher
from slipstream.transport.probe import PROBE_SESSION_ID, ProbeResponder
from slipstream.transport.udp import DatagramSocket

log = logging.getLogger("slipstream.server")


@dataclass
class RunningServer:
    """A started server; ``info`` is what clients need to reach it."""

    info: dict[str, Any]
    manager: SessionManager
    _sshd: Any
    _sock: DatagramSocket
    services: ServerServices | None = None
    _runners: list[Any] = field(default_factory=list)  # REST API, HTTPS fallback

    async def close(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._sshd.close()
        await self._sshd.wait_closed()
        self._sock.close()
        if self.services is not None:
            self.services.close()


async def start_server(config: ServerConfig) -> RunningServer:
    """Bind both ports and accept sessions; returns once the server is ready."""
    from slipstream.server.api import start_http_services

    host_key = load_or_create_host_key(config.host_key)
    services = ServerServices.create(config)  # token key, ops records, TLS certificate
    sock = DatagramSocket.bind(config.listen, config.fasp_port)
    try:
        dispatcher = UdpDispatcher(sock)
        # `slipstream doctor` probes the data port without logging in (transport/probe.py).
        dispatcher.register(PROBE_SESSION_ID, cast(Endpoint, ProbeResponder(sock)))
        manager = SessionManager(config, dispatcher, services.hooks, services.budget)
        sshd = await start_sshd(
            config, manager.handle, host_key=host_key, authenticator=services.authenticator
        )
    except BaseException:
        sock.close()
        services.close()
        raise
    info = {
        "host": config.listen,
        "ssh_port": sshd.port,
        "fasp_port": sock.local_address[1],
        "sshfp": fingerprint(host_key),
    }
    services.ports.update(ssh_port=sshd.port, fasp_port=sock.local_address[1])
    services.sshfp = fingerprint(host_key)
    try:
        runners, http_info = await start_http_services(services)
    except BaseException:
        await RunningServer(info, manager, sshd, sock, services).close()
        raise
    info.update(http_info)
    log.info(
        "listening host=%s ssh_port=%d fasp_port=%d sshfp=%s",
        info["host"],
        info["ssh_port"],
        info["fasp_port"],
        info["sshfp"],
    )
    if http_info:
        log.info("http services %s", " ".join(f"{k}={v}" for k, v in http_info.items()))
    return RunningServer(info, manager, sshd, sock, services, runners)


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
