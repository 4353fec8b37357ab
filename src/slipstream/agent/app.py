"""The agent process: binds the first free port of 33003-33022 on loopback and serves the
Connect API, the activity page, and the transfer queue behind them."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
from collections.abc import Callable
from typing import Any

from aiohttp import web

from slipstream.agent.activity import ActivityPage
from slipstream.agent.api import ConnectApi, json_response
from slipstream.agent.config import AgentConfig
from slipstream.agent.consent import Consent
from slipstream.agent.dialogs import Dialogs
from slipstream.agent.manager import TransferManager
from slipstream.agent.record import TransferRecord
from slipstream.agent.store import AgentStore
from slipstream.agent.windows import Windows
from slipstream.errors import ConfigError

log = logging.getLogger("slipstream.agent")


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.store = AgentStore(config.db_path)
        self.consent = Consent(self.store, config)
        self.dialogs = Dialogs(config)
        self.windows = Windows(config)
        self.manager = TransferManager(config, self.store)
        self.manager.password_prompt = self._ask_password
        self.manager.passphrase_prompt = self._ask_passphrase
        self.api = ConnectApi(config, self.manager, self.consent, self.dialogs, self.windows)
        self.activity = ActivityPage(self.manager)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[_always_json])
        self.activity.add_routes(app)
        app.router.add_route("*", "/{tail:.*}", self.api.handle)
        return app

    async def start(self) -> str:
        self._runner = web.AppRunner(self.make_app(), access_log=None)
        await self._runner.setup()
        self.port = await self._bind(self._runner)
        self.activity.port = self.port
        self.windows.base_url = self.url
        self.manager.open()
        log.info("agent listening on %s", self.url)
        return self.url

    async def _bind(self, runner: web.AppRunner) -> int:
        first, last = self.config.ports
        for port in range(first, last + 1):
            site = web.TCPSite(runner, self.config.host, port, reuse_address=False)
            try:
                await site.start()
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    continue
                raise
            return port or int(runner.addresses[-1][1])  # port 0: an ephemeral one (tests)
        raise ConfigError(f"No free port between {first} and {last} on {self.config.host}")

    async def stop(self) -> None:
        await self.manager.close()
        if self._runner is not None:
            await self._runner.cleanup()
        self.store.close()

    async def _ask_password(self, record: TransferRecord) -> str | None:
        spec = record.spec
        prompt = (
            f"Password for {spec.get('remote_user') or 'the transfer user'} "
            f"on {spec.get('remote_host')}:"
        )
        return await self._ask_secret(prompt)

    async def _ask_passphrase(self, record: TransferRecord) -> str | None:
        mode = record.spec.get("content_protection")
        what = "encrypt the files sent to" if mode == "encrypt" else "decrypt the files from"
        return await self._ask_secret(f"Passphrase to {what} {record.spec.get('remote_host')}:")

    async def _ask_secret(self, prompt: str) -> str | None:
        answer = await self.dialogs.ask(
            {"kind": "password", "title": "Slipstream", "prompt": prompt}
        )
        text = answer.get("text")
        return str(text) if text else None


@web.middleware
async def _always_json(request: web.Request, handler: Any) -> web.StreamResponse:
    """Whatever fails below still answers JSON with CORS headers (the SDK needs both)."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        body = {
            "error": {
                "code": exc.status,
                "internal_message": exc.reason,
                "user_message": exc.reason,
            }
        }
        return json_response(request, body, exc.status)


async def run_agent(config: AgentConfig, ready: Callable[[dict[str, Any]], None]) -> None:
    """Serve until SIGINT / SIGTERM; ``ready`` gets ``{url, port, ...}`` once listening."""
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        url = await agent.start()
        ready(
            {
                "url": url,
                "port": agent.port,
                "activity_url": url + "/",
                "db": str(config.db_path),
                "download_dir": str(config.download_dir),
            }
        )
        await stop.wait()
    finally:
        await agent.stop()
