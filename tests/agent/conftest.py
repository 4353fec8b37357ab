"""Fixtures for the agent tests: the official SDK served from a loopback origin, headless
Debian chromium driven by Playwright, the agent as a real `slipstream agent` process, and
a quickstart server to transfer with."""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from slipstream.agent.sdk import ensure_sdk
from tests.conftest import ServerHandle, start_quickstart

WEB = Path(__file__).parent / "web"
CHROMIUM = "/usr/bin/chromium"
# Offline and honest: no background traffic, no CORS shortcuts (never --disable-web-security).
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@dataclass
class WebOrigin:
    url: str

    def page_url(self, app_id: str) -> str:
        return f"{self.url}/?app_id={app_id}"


def _handler(sdk: Path) -> type[http.server.BaseHTTPRequestHandler]:
    files = {"/": (WEB / "page.html", "text/html"), "/connect-sdk.js": (sdk, "text/javascript")}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            path, kind = files.get(self.path.split("?")[0], (None, ""))
            if path is None:
                self.send_error(404)
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_args: Any) -> None:
            pass

    return Handler


@pytest.fixture(scope="session")
def web_origin() -> Iterator[WebOrigin]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(ensure_sdk()))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield WebOrigin(f"http://127.0.0.1:{httpd.server_address[1]}")
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope: Playwright's sync API keeps an event loop running in this thread while it
    # is open, which would break every asyncio test that runs after it.
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class AgentHandle:
    process: subprocess.Popen[str]
    info: dict[str, Any]
    root: Path

    @property
    def url(self) -> str:
        return str(self.info["url"])

    @property
    def picks(self) -> Path:
        return self.root / "picks"

    @property
    def downloads(self) -> Path:
        return self.root / "downloads"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_agent(root: Path, origin: str | None, *extra: str) -> AgentHandle:
    """`slipstream agent` as a child, headless, answering only ``origin``'s pages (so a
    parallel run's agent in 33003-33022 never serves this run's browser, nor the reverse)."""
    (root / "picks").mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "slipstream",
        "agent",
        "--data-dir",
        str(root / "data"),
        "--download-dir",
        str(root / "downloads"),
        "--dialogs",
        "headless",
        "--headless-folder",
        str(root / "picks"),
        "--retry-interval",
        "0.5",
        *(["--allow-origin", origin] if origin else []),
        *extra,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["SLIPSTREAM_KNOWN_HOSTS"] = str(root / "known_hosts")
    with open(root / "agent.log", "a") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=30)
        raise RuntimeError(f"agent did not start:\n{(root / 'agent.log').read_text()}")
    return AgentHandle(process, json.loads(line), root)


@pytest.fixture(scope="module")
def qs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_quickstart(tmp_path_factory.mktemp("qs"))
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, web_origin: WebOrigin) -> Iterator[AgentHandle]:
    handle = start_agent(tmp_path_factory.mktemp("agent"), web_origin.url)
    try:
        yield handle
    finally:
        handle.stop()


def server_spec(server: ServerHandle, direction: str, **fields: Any) -> dict[str, Any]:
    """A transfer spec for the quickstart server, with the password (no token flow)."""
    info = server.info
    return {
        "direction": direction,
        "remote_host": info["host"],
        "remote_user": info["user"],
        "remote_password": info["password"],
        "ssh_port": info["ssh_port"],
        "fasp_port": info["fasp_port"],
        "sshfp": info["sshfp"],
        **fields,
    }
