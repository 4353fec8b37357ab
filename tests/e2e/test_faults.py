"""Faults a user can hit: a peer killed mid-transfer, UDP blocked by a firewall, a full disk.

Each must end with a clear error, a non-zero exit, and nothing half-written under a final
name (only NAME.partial may remain).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, connect_args, password_env, start_quickstart

BIG = 60 * 1024 * 1024


def _cli_popen(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream", *args],
        cwd=cwd,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def _wait_for(predicate, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_server_killed_mid_upload(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "big.bin").write_bytes(os.urandom(BIG))
    # A modest fixed rate keeps the transfer running long enough to be interrupted.
    client = _cli_popen(
        ["send", *connect_args(server), "--policy", "fixed", "-l", "40M", "big.bin", "/"],
        tmp_path,
        password_env(server),
    )
    partial = server.docroot / "big.bin.partial"
    assert _wait_for(lambda: partial.exists() and partial.stat().st_blocks > 0, 30)
    server.process.send_signal(signal.SIGKILL)
    server.process.wait()
    out, err = client.communicate(timeout=60)
    assert client.returncode == 1, err
    assert "code 16" in err or "code 15" in err
    assert not (server.docroot / "big.bin").exists()
    assert partial.exists()


def test_client_killed_mid_download(server: ServerHandle, tmp_path: Path) -> None:
    (server.docroot / "big.bin").write_bytes(os.urandom(BIG))
    client = _cli_popen(
        ["recv", *connect_args(server), "--policy", "fixed", "-l", "40M", "/big.bin", "."],
        tmp_path,
        password_env(server),
    )
    partial = tmp_path / "big.bin.partial"
    assert _wait_for(lambda: partial.exists() and partial.stat().st_blocks > 0, 30)
    client.send_signal(signal.SIGKILL)
    client.wait()
    assert not (tmp_path / "big.bin").exists()
    assert partial.exists()
    # The server notices and keeps serving others.
    assert _wait_for(lambda: "result=" in server.log(), 30), server.log()
    assert server.process.poll() is None


# --- a firewall that drops the UDP port, in a network namespace this test creates -----------


@pytest.fixture
def netns() -> Iterator[str]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.fail("this test needs root, iproute2 and nftables (.ci/run installs them)")
    name = f"slipstream-test-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


def test_udp_blocked_is_reported_with_the_port(netns: str, tmp_path: Path) -> None:
    prefix = ["ip", "netns", "exec", netns]
    handle = start_quickstart(tmp_path / "server", prefix=prefix)
    try:
        port = handle.info["fasp_port"]
        rules = (
            f"add table inet t; add chain inet t c {{ type filter hook input priority 0; }}; "
            f"add rule inet t c udp dport {port} drop"
        )
        subprocess.run([*prefix, "nft", rules], check=True)
        (tmp_path / "f.txt").write_text("x")
        result = subprocess.run(
            [
                *prefix,
                sys.executable,
                "-m",
                "slipstream",
                "send",
                *connect_args(handle),
                "--udp-timeout",
                "3",
                "f.txt",
                "/",
            ],
            cwd=tmp_path,
            env={**os.environ, **password_env(handle)},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 1
        assert "code 14" in result.stderr and f"port {port}" in result.stderr
        assert not (handle.docroot / "f.txt").exists()
    finally:
        handle.stop()


# --- a full disk: the server's docroot is a 2 MiB tmpfs in a private mount namespace --------


def test_disk_full_on_the_server(tmp_path: Path) -> None:
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("this test needs root and util-linux unshare")
    docroot = tmp_path / "server" / "qs" / "docroot"
    docroot.mkdir(parents=True)
    prefix = [
        "unshare",
        "-m",
        "sh",
        "-c",
        f'mount -t tmpfs -o size=2m tmpfs \'{docroot}\' && exec "$0" "$@"',
    ]
    handle = start_quickstart(tmp_path / "server", prefix=prefix)
    try:
        (tmp_path / "big.bin").write_bytes(os.urandom(5 * 1024 * 1024))
        result = subprocess.run(
            [sys.executable, "-m", "slipstream", "send", *connect_args(handle), "big.bin", "/"],
            cwd=tmp_path,
            env={**os.environ, **password_env(handle)},
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
        assert result.returncode == 1
        assert "No space left" in result.stderr, result.stderr
        assert handle.process.poll() is None  # the server survives
    finally:
        handle.stop()
    assert not (docroot / "big.bin").exists()
