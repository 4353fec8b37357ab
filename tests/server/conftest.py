"""An in-process server with the REST API and the HTTPS fallback on, and a client for it."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from slipstream.server.app import RunningServer, start_server
from slipstream.server.config import ServerConfig, load_server_config
from slipstream.server.passwords import hash_password
from slipstream.server.tls import fingerprint_digest

PASSWORD = "alice-secret"
API_PASSWORD = "webapp-secret"
KEY_SECRET = "key-secret"
_HASHES: dict[str, str] = {}


def _hash(secret: str) -> str:
    # scrypt is slow on purpose; the tests reuse one hash per secret.
    if secret not in _HASHES:
        _HASHES[secret] = hash_password(secret)
    return _HASHES[secret]


def write_server_config(root: Path, *, fallback: bool = True) -> Path:
    for folder in ("alice", "web/projects/p1", "web/private"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    text = f"""
[server]
listen = "127.0.0.1"
ssh_port = 0
fasp_port = 0
host_key = "host_key"
state_dir = "state"

[api]
https_port = 0
http_port = 0

{"[http_fallback]" if fallback else ""}
{"port = 0" if fallback else ""}

[tokens]
life_seconds = 3600

[[users]]
name = "alice"
password_hash = "{_hash(PASSWORD)}"
docroot = "alice"

[[users]]
name = "xfer"
token_only = true
docroot = "web"
target_rate_cap_kbps = 900000

[[api_users]]
name = "webapp"
password_hash = "{_hash(API_PASSWORD)}"
transfer_user = "xfer"

[[access_keys]]
id = "ak-projects"
secret_hash = "{_hash(KEY_SECRET)}"
transfer_user = "xfer"
root = "/projects"
"""
    path = root / "server.toml"
    path.write_text(text)
    return path


@dataclass
class Api:
    """A REST API client: ``call`` returns ``(status, json body)``."""

    url: str
    fingerprint: str
    user: str = "webapp"
    password: str = API_PASSWORD

    async def call(
        self, method: str, path: str, body: dict[str, Any] | None = None, **auth: str
    ) -> tuple[int, Any]:
        user, password = auth.get("user", self.user), auth.get("password", self.password)
        headers = {"Authorization": aiohttp.encode_basic_auth(user, password)}
        ssl: Any = aiohttp.Fingerprint(fingerprint_digest(self.fingerprint))
        if self.url.startswith("http://"):
            ssl = None
        async with (
            aiohttp.ClientSession() as http,
            http.request(method, self.url + path, json=body, headers=headers, ssl=ssl) as resp,
        ):
            text = await resp.text()
            return resp.status, json.loads(text) if text else None

    async def setup(self, kind: str, **request: Any) -> dict[str, Any]:
        """One transfer spec from upload_setup/download_setup (fails the test on error)."""
        status, body = await self.call(
            "POST", f"/files/{kind}_setup", {"transfer_requests": [{"transfer_request": request}]}
        )
        assert status == 200, body
        entry = body["transfer_specs"][0]
        assert "transfer_spec" in entry, entry
        return dict(entry["transfer_spec"])


@dataclass
class Stack:
    server: RunningServer
    config: ServerConfig
    root: Path
    api: Api

    @property
    def info(self) -> dict[str, Any]:
        return self.server.info

    @property
    def web(self) -> Path:
        return self.root / "web"

    @property
    def alice(self) -> Path:
        return self.root / "alice"


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    root = tmp_path / "srv"
    root.mkdir()
    config = load_server_config(write_server_config(root))
    server = await start_server(config)
    try:
        api = Api(server.info["api_url"], server.info["api_fingerprint"])
        yield Stack(server, config, root, api)
    finally:
        await server.close()
