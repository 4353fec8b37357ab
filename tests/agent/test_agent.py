"""The agent without a browser: its HTTP contract, queue, retries, persistence, consent."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from slipstream.agent.app import Agent
from slipstream.agent.config import AgentConfig
from slipstream.server.quickstart import create_quickstart
from tests.agent.conftest import server_spec
from tests.conftest import ServerHandle, start_quickstart

APP = {"aspera_connect_settings": {"app_id": "python-app"}}


class Client:
    def __init__(self, agent: Agent, session: aiohttp.ClientSession) -> None:
        self.agent = agent
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
        url = f"{self.agent.url}{path}"
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, url, data=data) as response:
            return response.status, json.loads(await response.text()), response.headers

    async def post(self, path: str, body: dict[str, Any] | None = None, app: str = "python-app"):
        settings = {"aspera_connect_settings": {"app_id": app}}
        status, answer, _ = await self.call(
            "POST", f"/v5/connect/{path}", {**(body or {}), **settings}
        )
        return status, answer

    async def pick(self, app: str = "python-app") -> list[str]:
        status, answer = await self.post("windows/select-open-file-dialog/", app=app)
        assert status == 200, answer
        return [f["name"] for f in answer["dataTransfer"]["files"]]

    async def start(self, spec: dict[str, Any], app: str = "python-app") -> str:
        status, answer = await self.post(
            "transfers/start", {"transfer_specs": [{"transfer_spec": spec}]}, app
        )
        assert status == 200, answer
        return str(answer["transfer_specs"][0]["uuid"])

    async def info(self, uuid: str) -> dict[str, Any]:
        status, answer = await self.post(f"transfers/info/{uuid}")
        assert status == 200, answer
        return dict(answer["transfer_info"])

    async def wait(self, uuid: str, check: Callable[[dict[str, Any]], bool], timeout: float = 60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = await self.info(uuid)
            if check(current):
                return current
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out: {await self.info(uuid)}")


def make_config(root: Path, **changes: Any) -> AgentConfig:
    (root / "picks").mkdir(parents=True, exist_ok=True)
    config = AgentConfig(
        data_dir=root / "data",
        download_dir=root / "downloads",
        ports=(0, 0),
        dialogs="headless",
        headless_folder=root / "picks",
        retry_interval=0.2,
        known_hosts=root / "known_hosts",
        open_windows=False,
    )
    for name, value in changes.items():
        setattr(config, name, value)
    return config


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[Client]:
    agent = Agent(make_config(tmp_path / "agent"))
    await agent.start()
    async with aiohttp.ClientSession() as session:
        yield Client(agent, session)
    await agent.stop()


ENDPOINTS = [
    ("GET", "info/ping"),
    ("GET", "info/version"),
    ("POST", "update/require"),
    ("POST", "transfers/start"),
    ("POST", "transfers/activity"),
    ("POST", "transfers/info/nope"),
    ("POST", "transfers/stop/nope"),
    ("POST", "transfers/resume/nope"),
    ("POST", "transfers/remove/nope"),
    ("POST", "transfers/modify/nope"),
    ("POST", "info/authenticate"),
    ("POST", "info/ports"),
    ("POST", "windows/select-open-file-dialog/"),
    ("POST", "windows/select-open-folder-dialog/"),
    ("POST", "windows/select-save-file-dialog/"),
    ("GET", "windows/about"),
    ("GET", "windows/preferences"),
    ("GET", "windows/preferences/general"),
    ("GET", "windows/transfer-manager"),
    ("GET", "windows/transfer-monitor/nope"),
    ("GET", "windows/finder/nope"),
    ("POST", "file/read-as-array-buffer/"),
    ("POST", "file/read-chunk-as-array-buffer/"),
    ("POST", "file/checksum/"),
    ("GET", "file/initialize-drag-drop"),
    ("POST", "file/dropped-files"),
]


async def test_every_endpoint_answers_json_with_cors(client: Client) -> None:
    assert len(ENDPOINTS) == 26
    statuses = {}
    for method, path in ENDPOINTS:
        body = APP if method == "POST" else None
        headers = {"Origin": "http://127.0.0.1:8000"}
        url = f"{client.agent.url}/v5/connect/{path}"
        async with client.session.request(
            method, url, data=json.dumps(body) if body else None, headers=headers
        ) as response:
            text = await response.text()
            assert response.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8000"
            answer = json.loads(text)  # JSON on every answer, errors included
            statuses[path] = response.status
            if response.status >= 400:
                assert set(answer["error"]) >= {"code", "internal_message", "user_message"}
    assert statuses["info/ping"] == statuses["info/version"] == 200
    assert statuses["transfers/info/nope"] == 404
    assert statuses["transfers/start"] == 400
    assert statuses["file/checksum/"] == 406  # no path: nothing the user picked


async def test_prefixes_methods_errors_and_preflight(client: Client) -> None:
    for path in ("/v6/connect/info/version", "/connect/info/version/", "/v5/connect/info/version/"):
        status, answer, _ = await client.call("GET", path)
        assert status == 200 and answer["version"]
    status, answer, headers = await client.call("GET", "/v5/connect/transfers/start")
    assert status == 405 and answer["error"] and headers["Access-Control-Allow-Origin"] == "*"
    status, answer, _ = await client.call("POST", "/v5/connect/transfers/activity", [1])
    assert status == 400 and answer["error"]["code"] == 53
    status, answer, _ = await client.call("POST", "/v5/connect/transfers/activity", {})
    assert status == 404 and answer["error"]["code"] == 73  # no app_id
    preflight = {
        "Origin": "https://app.example.com",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Private-Network": "true",
    }
    url = f"{client.agent.url}/v5/connect/transfers/start"
    async with client.session.options(url, headers=preflight) as response:
        assert response.status == 200 and json.loads(await response.text()) == {}
        assert response.headers["Access-Control-Allow-Private-Network"] == "true"
        assert response.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
        assert "POST" in response.headers["Access-Control-Allow-Methods"]


async def test_origin_allow_list(tmp_path: Path) -> None:
    agent = Agent(make_config(tmp_path, allowed_origins=["http://127.0.0.1:9000"]))
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{agent.url}/v5/connect/info/ping"
            async with session.get(url, headers={"Origin": "http://evil.example"}) as response:
                assert response.status == 403 and "Access-Control-Allow-Origin" in response.headers
                assert (await response.json())["error"]["code"] == 74
            async with session.get(url, headers={"Origin": "http://127.0.0.1:9000"}) as response:
                assert response.status == 200
    finally:
        await agent.stop()


async def test_the_agent_takes_the_first_free_port_of_its_range(tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    agent = Agent(make_config(tmp_path, ports=(taken, taken + 1)))
    try:
        await agent.start()
        assert agent.port == taken + 1 or agent.port == 0
    except Exception as exc:  # the next port may be taken too on a busy machine
        assert "No free port" in str(exc)
    finally:
        blocker.close()
        await agent.stop()


async def test_activity_api_is_same_origin_and_keyed(client: Client) -> None:
    agent = client.agent
    async with client.session.get(f"{agent.url}/") as response:
        page = await response.text()
        assert agent.activity.key in page
    api = f"{agent.url}/activity/api/transfers"
    async with client.session.get(api) as response:
        assert response.status == 403  # no key
    key = {"X-Slipstream-Key": agent.activity.key}
    async with client.session.get(api, headers=key) as response:
        assert response.status == 200 and (await response.json())["transfers"] == []
    evil = {**key, "Origin": "http://evil.example"}
    async with client.session.get(api, headers=evil) as response:
        assert response.status == 403
    rebind = {**key, "Host": f"evil.example:{agent.port}"}
    async with client.session.get(api, headers=rebind) as response:
        assert response.status == 403


async def test_queue_stop_resume_and_history(client: Client, server: ServerHandle) -> None:
    client.agent.config.max_concurrent = 1
    picks = client.agent.config.headless_folder
    assert picks is not None
    for name in ("one.bin", "two.bin"):
        (picks / name).write_bytes(os.urandom(1 << 20))
    await client.pick()
    spec = server_spec(server, "send", target_rate_kbps=1000, destination_root="/")
    first = await client.start({**spec, "paths": [{"source": str(picks / "one.bin")}]})
    second = await client.start({**spec, "paths": [{"source": str(picks / "two.bin")}]})
    await client.wait(first, lambda t: t["status"] == "running")
    assert (await client.info(second))["status"] == "queued"
    status, _ = await client.post(f"transfers/stop/{first}")
    assert status == 200
    await client.wait(second, lambda t: t["status"] == "running")
    status, _ = await client.post(f"transfers/stop/{second}")
    done = await client.info(first)
    assert done["status"] == "cancelled" and done["previous_status"] == "running"
    status, answer = await client.post(f"transfers/resume/{first}", {"remote_password": "x"})
    assert status == 200 and answer["transfer_spec"]["uuid"] == first
    failed = await client.wait(first, lambda t: t["status"] == "failed")
    assert failed["error_code"] == 19 and "remote_password" not in failed["transfer_spec"]


async def test_retryable_failures_retry_then_succeed(client: Client, tmp_path: Path) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client.agent.config.retry_attempts = 20
    picks = client.agent.config.headless_folder
    assert picks is not None
    (picks / "later.txt").write_text("eventually\n")
    await client.pick()
    # The server's account exists already; the server itself starts only later.
    account = create_quickstart(tmp_path / "late" / "qs", listen="127.0.0.1")
    spec = {
        "direction": "send",
        "remote_host": "127.0.0.1",
        "remote_user": account.user,
        "remote_password": account.password,
        "ssh_port": port,
        "paths": [{"source": str(picks / "later.txt")}],
    }
    uuid = await client.start(spec)
    waiting = await client.wait(uuid, lambda t: t["status"] == "willretry")
    assert waiting["error_code"] == 13
    server = start_quickstart(tmp_path / "late", ["--ssh-port", str(port)])
    try:
        await client.wait(uuid, lambda t: t["status"] == "completed")
        assert (server.docroot / "later.txt").read_text() == "eventually\n"
    finally:
        server.stop()


async def test_retries_give_up_and_bad_passwords_fail_at_once(
    client: Client, server: ServerHandle
) -> None:
    client.agent.config.retry_attempts = 2
    picks = client.agent.config.headless_folder
    assert picks is not None
    (picks / "f.txt").write_text("f\n")
    await client.pick()
    source = [{"source": str(picks / "f.txt")}]
    unreachable = {
        "direction": "send",
        "remote_host": "127.0.0.1",
        "remote_user": "x",
        "remote_password": "x",
        "ssh_port": 1,
        "paths": source,
    }
    seen: list[str] = []

    def track(info: dict[str, Any]) -> bool:
        if not seen or seen[-1] != info["status"]:
            seen.append(info["status"])
        return info["status"] == "failed"

    uuid = await client.start(unreachable)
    failed = await client.wait(uuid, track)
    assert client.agent.manager.records[uuid].attempts == 3
    assert seen.count("willretry") >= 1 and failed["error_code"] == 13
    wrong = server_spec(server, "send", paths=source, remote_password="wrong")
    uuid = await client.start(wrong)
    failed = await client.wait(uuid, lambda t: t["status"] == "failed")
    assert failed["error_code"] == 19 and client.agent.manager.records[uuid].attempts == 1


async def test_history_and_interrupted_transfers_survive_a_restart(
    tmp_path: Path, server: ServerHandle
) -> None:
    config = make_config(tmp_path / "agent")
    assert config.headless_folder is not None
    source = config.headless_folder / "restart.bin"
    source.write_bytes(os.urandom(1 << 20))
    agent = Agent(config)
    await agent.start()
    async with aiohttp.ClientSession() as session:
        client = Client(agent, session)
        await client.pick()
        spec = server_spec(server, "send", paths=[{"source": str(source)}], target_rate_kbps=1500)
        uuid = await client.start(spec)
        await client.wait(uuid, lambda t: t["status"] == "running" and t["bytes_written"] > 0)
        before = (await client.post("transfers/activity", {"iteration_token": 0}))[1]
    await agent.stop()  # as if the agent were closed mid-transfer

    agent = Agent(config)
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = Client(agent, session)
            status, after = await client.post("transfers/activity", {"iteration_token": 0})
            assert [t["uuid"] for t in after["transfers"]] == [uuid]
            assert after["iteration_token"] > before["iteration_token"]
            agent.manager.modify(agent.manager.records[uuid], {"target_rate_kbps": 200000})
            done = await client.wait(uuid, lambda t: t["status"] == "completed")
            assert done["bytes_written"] == source.stat().st_size
            assert (server.docroot / "restart.bin").read_bytes() == source.read_bytes()
    finally:
        await agent.stop()


async def test_download_destinations(client: Client, server: ServerHandle) -> None:
    (server.docroot / "d.txt").write_text("down\n")
    spec = server_spec(server, "receive", paths=[{"source": "/d.txt"}])
    nested = await client.start({**spec, "destination_root": "/inbox/today", "create_dir": True})
    done = await client.wait(nested, lambda t: t["status"] == "completed")
    landed = client.agent.config.download_dir / "inbox" / "today" / "d.txt"
    assert landed.read_text() == "down\n" and done["explorer_path"] == str(landed.parent)
    status, answer = await client.post(
        "transfers/start",
        {"transfer_specs": [{"transfer_spec": {**spec, "destination_root": "/../../etc"}}]},
    )
    assert status == 403 and answer["error"]["code"] == 41
    absolute = {
        "transfer_spec": {**spec, "destination_root": str(server.root)},
        "aspera_connect_settings": {"use_absolute_destination_path": True},
    }
    status, answer = await client.post("transfers/start", {"transfer_specs": [absolute]})
    assert status == 406 and answer["error"]["code"] == 70
    status, folder = await client.post("windows/select-open-folder-dialog/")
    picked = folder["dataTransfer"]["files"][0]["name"]
    absolute["transfer_spec"]["destination_root"] = picked
    status, answer = await client.post("transfers/start", {"transfer_specs": [absolute]})
    assert status == 200, answer
    await client.wait(answer["transfer_specs"][0]["uuid"], lambda t: t["status"] == "completed")
    assert (Path(picked) / "d.txt").read_text() == "down\n"


async def test_return_paths_and_files_are_honoured(client: Client, server: ServerHandle) -> None:
    (server.docroot / "quiet.txt").write_text("q\n")
    entry = {
        "transfer_spec": server_spec(server, "receive", paths=[{"source": "/quiet.txt"}]),
        "aspera_connect_settings": {"return_paths": False, "return_files": False},
    }
    status, answer = await client.post("transfers/start", {"transfer_specs": [entry]})
    uuid = answer["transfer_specs"][0]["uuid"]
    done = await client.wait(uuid, lambda t: t["status"] == "completed")
    assert "paths" not in done["transfer_spec"] and "files" not in done
    assert done["transfer_spec"]["tags"]["aspera"]["xfer_id"] == uuid
    for field in ("add_time", "start_time", "end_time", "modify_time"):
        assert len(done[field]) == 19, field
    counts = {"attempted": 1, "completed": 1, "failed": 0, "skipped": 0, "excluded": 0}
    assert done["file_counts"] == counts
