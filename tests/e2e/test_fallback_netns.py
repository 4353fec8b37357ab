"""UDP blocked by a real firewall: transfers complete over HTTPS, and doctor says why.

A network namespace this module creates holds a quickstart server and an nftables rule
dropping its UDP data port; every client runs inside the namespace too (its loopback is the
only path to the server). Nothing touches the host's own network.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ServerHandle, connect_args, password_env, start_quickstart

# Runs inside the namespace: what a web backend does, upload_setup/download_setup.
SETUP_SCRIPT = """
import asyncio, json, sys
import aiohttp
from slipstream.server.tls import fingerprint_digest
info, kind, request = json.loads(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
async def main():
    auth = aiohttp.encode_basic_auth(info["api_user"], info["api_password"])
    ssl = aiohttp.Fingerprint(fingerprint_digest(info["api_fingerprint"]))
    body = {"transfer_requests": [{"transfer_request": request}]}
    async with aiohttp.ClientSession(headers={"Authorization": auth}) as http:
        url = f"{info['api_url']}/files/{kind}_setup"
        async with http.post(url, json=body, ssl=ssl) as resp:
            print(json.dumps((await resp.json())["transfer_specs"][0]["transfer_spec"]))
asyncio.run(main())
"""


@pytest.fixture(scope="module")
def blocked(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], ServerHandle]]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.fail("this test needs root, iproute2 and nftables (.ci/run installs them)")
    name = f"slipstream-fb-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    prefix = ["ip", "netns", "exec", name]
    handle: ServerHandle | None = None
    try:
        subprocess.run([*prefix, "ip", "link", "set", "lo", "up"], check=True)
        handle = start_quickstart(tmp_path_factory.mktemp("fb") / "server", prefix=prefix)
        port = handle.info["fasp_port"]
        rules = (
            "add table inet t; add chain inet t c { type filter hook input priority 0; }; "
            f"add rule inet t c udp dport {port} drop"
        )
        subprocess.run([*prefix, "nft", rules], check=True)
        yield prefix, handle
    finally:
        if handle is not None:
            handle.stop()
        subprocess.run(["ip", "netns", "delete", name], check=False)


def in_ns(
    prefix: list[str], args: list[str], cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_upload_falls_back_to_https(
    blocked: tuple[list[str], ServerHandle], tmp_path: Path
) -> None:
    prefix, server = blocked
    (tmp_path / "big.bin").write_bytes(os.urandom(12 * 1024 * 1024))
    (tmp_path / "small.txt").write_text("small")
    args = ["-m", "slipstream", "send", *connect_args(server), "--udp-timeout", "2"]
    args += ["--http-fallback", "on", "--json-events", "-d", "big.bin", "small.txt", "/fb-up"]
    result = in_ns(prefix, args, tmp_path, password_env(server))
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    fallback = next(e for e in events if e["type"] == "fallback")
    assert f"port {server.info['fasp_port']}" in fallback["reason"]
    assert events[-1]["type"] == "session_done" and events[-1]["transport"] == "http"
    target = server.docroot / "fb-up"
    assert (target / "big.bin").read_bytes() == (tmp_path / "big.bin").read_bytes()
    assert (target / "small.txt").read_text() == "small"
    assert not list(target.glob("*.partial"))


def test_token_download_falls_back_to_https(
    blocked: tuple[list[str], ServerHandle], tmp_path: Path
) -> None:
    prefix, server = blocked
    (server.docroot / "share").mkdir(exist_ok=True)
    (server.docroot / "share" / "data.bin").write_bytes(os.urandom(5 * 1024 * 1024))
    request = {"paths": [{"source": "/share/data.bin"}]}
    setup = in_ns(
        prefix,
        ["-c", SETUP_SCRIPT, json.dumps(server.info), "download", json.dumps(request)],
        tmp_path,
    )
    assert setup.returncode == 0, setup.stderr
    spec = json.loads(setup.stdout)
    assert spec["http_fallback"] is True and spec["authentication"] == "token"
    (tmp_path / "spec.json").write_text(json.dumps({**spec, "destination_root": "."}))
    args = [
        "-m",
        "slipstream",
        "recv",
        "--spec",
        "spec.json",
        "--udp-timeout",
        "2",
        "--json-events",
    ]
    result = in_ns(prefix, args, tmp_path)
    assert result.returncode == 0, result.stderr
    assert json_events(result.stdout)[-1]["transport"] == "http"
    assert (tmp_path / "data.bin").read_bytes() == (
        server.docroot / "share" / "data.bin"
    ).read_bytes()
    assert not (tmp_path / "data.bin.partial").exists()


def test_doctor_reports_the_block(blocked: tuple[list[str], ServerHandle], tmp_path: Path) -> None:
    prefix, server = blocked
    info = server.info
    args = ["-m", "slipstream", "doctor", f"slipstream@{info['host']}"]
    args += ["-P", str(info["ssh_port"]), "-O", str(info["fasp_port"])]
    args += ["--fallback-port", str(info["fallback_port"]), "--timeout", "2"]
    result = in_ns(prefix, args, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    text = result.stdout
    port = info["fasp_port"]
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    assert "OK" in lines["SSH"] and "BLOCKED" in lines["UDP"] and "OK" in lines["HTTPS"]
    assert f"a firewall drops UDP to port {port}" in text
    assert f"open udp/{port} inbound" in text and "HTTPS fallback" in text
    report = json.loads(in_ns(prefix, [*args, "--json"], tmp_path).stdout)
    assert [c["status"] for c in report["checks"]][:4] == ["ok", "blocked", "ok", "skipped"]
