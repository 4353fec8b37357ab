"""`slipstream demo`: a quickstart server, the agent and the demo web application, until
Ctrl-C (or ``--exit-after`` seconds). It prints the URL to open in a browser."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from slipstream.agent.sdk import ensure_sdk, find_sdk
from slipstream.demo import make_samples, parse_size, start_server
from slipstream.errors import ConnectError
from slipstream.webdemo import DemoApp, ServerApi

AGENT_START_TIMEOUT = 30.0


async def _start_agent(root: Path, samples: Path, origin: str) -> tuple[Any, dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "slipstream",
        "agent",
        "--data-dir",
        str(root / "agent"),
        "--download-dir",
        str(root / "downloads"),
        "--headless-folder",
        str(samples),
        "--allow-origin",
        origin,
    ]
    log = open(root / "agent.log", "w")  # noqa: SIM115 - the child keeps writing to it
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=log, stdin=asyncio.subprocess.DEVNULL
    )
    assert process.stdout is not None
    try:
        line = await asyncio.wait_for(process.stdout.readline(), AGENT_START_TIMEOUT)
    except TimeoutError:
        line = b""
    if not line:
        process.terminate()
        raise ConnectError(f"the agent did not start; see {root / 'agent.log'}")
    return process, json.loads(line)


async def _serve_web(app: DemoApp, port: int) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    return stop


async def _run(root: Path, size: int, port: int, exit_after: float | None) -> None:
    samples = make_samples(root, size)
    if find_sdk() is None:
        print("installing the Connect SDK with npm (once)...", flush=True)
    sdk = ensure_sdk()
    server, info = start_server(root)
    agent: Any = None
    runner: web.AppRunner | None = None
    try:
        app = DemoApp(ServerApi(info), sdk, "")
        runner, url = await _serve_web(app, port)
        agent, agent_info = await _start_agent(root, samples, url)
        app.agent_url = str(agent_info["url"])
        print(f"server: ssh {info['host']}:{info['ssh_port']}, REST API {info['api_url']}")
        print(f"agent: {agent_info['url']} (activity window: {agent_info['activity_url']})")
        print(f"files to pick: {samples}; downloads land in {root / 'downloads'}")
        print(f"open {url}/ in a browser (Ctrl-C to stop)", flush=True)
        stop = _stop_event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), exit_after)
    finally:
        if agent is not None and agent.returncode is None:
            agent.terminate()
            await agent.wait()
        if runner is not None:
            await runner.cleanup()
        server.terminate()
        server.wait(timeout=10)


def run_web_demo(work_dir: Path | None, size: str, port: int, exit_after: float | None) -> None:
    root = work_dir or Path(tempfile.mkdtemp(prefix="slipstream-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo folder: {root}", flush=True)
    asyncio.run(_run(root, parse_size(size), port, exit_after))
