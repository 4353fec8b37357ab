"""kill -9 of the sender, the receiver or the server mid-file, then the same command again:
it continues from the checkpoint, sends only the rest, and ends byte-identical."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from slipstream.engine.resume import read_checkpoint
from tests.conftest import ServerHandle, connect_args, password_env, start_quickstart

SIZE = 40 * 1024 * 1024
SLOW = ["--policy", "fixed", "-l", "80M"]  # ~4 s for the file: time to interrupt it
KILL_AFTER = 8 * 1024 * 1024  # bytes on disk in the partial before the kill


def popen(server: ServerHandle, verb: str, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream", verb, *connect_args(server), *args],
        cwd=cwd,
        env={**os.environ, **password_env(server)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def wait_for(predicate: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def written(partial: Path) -> int:
    """Bytes the receiver has put into the (sparse) partial so far."""
    try:
        return partial.stat().st_blocks * 512
    except FileNotFoundError:
        return 0


def finish(server: ServerHandle, verb: str, args: list[str], cwd: Path) -> dict[str, object]:
    """Run the same transfer again to the end; returns its file_done event."""
    process = popen(server, verb, ["--json-events", *args], cwd)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    return next(e for e in events if e["type"] == "file_done")


def restart(server: ServerHandle) -> ServerHandle:
    """The same server folder (docroot, keys, password) on new ports."""
    server.stop()
    return start_quickstart(server.root)


@pytest.mark.parametrize("victim", ["client", "server"])
def test_upload_killed_then_resumed(server: ServerHandle, tmp_path: Path, victim: str) -> None:
    data = os.urandom(SIZE)
    (tmp_path / "big.bin").write_bytes(data)
    partial = server.docroot / "big.bin.partial"
    client = popen(server, "send", [*SLOW, "big.bin", "/"], tmp_path)
    wait_for(lambda: written(partial) > KILL_AFTER)
    target = client if victim == "client" else server.process
    target.send_signal(signal.SIGKILL)
    target.wait()
    if victim == "server":
        client.communicate(timeout=60)
        server = restart(server)
    try:
        if victim == "client":
            wait_for(lambda: "result=" in server.log())  # the server noticed, checkpointed
        on_disk = written(partial)
        record = read_checkpoint(partial)
        assert record is not None and record.good > 0
        done = finish(server, "send", ["big.bin", "/"], tmp_path)
        assert done["resumed_from"] == record.good
        # The checkpoint trails what was written by at most a few megabytes.
        assert on_disk - record.good < 6 * 1024 * 1024
        assert (server.docroot / "big.bin").read_bytes() == data
        assert not partial.exists()
    finally:
        server.stop()


@pytest.mark.parametrize("victim", ["client", "server"])
def test_download_killed_then_resumed(server: ServerHandle, tmp_path: Path, victim: str) -> None:
    data = os.urandom(SIZE)
    (server.docroot / "big.bin").write_bytes(data)
    partial = tmp_path / "big.bin.partial"
    client = popen(server, "recv", [*SLOW, "/big.bin", "."], tmp_path)
    wait_for(lambda: written(partial) > KILL_AFTER)
    target = client if victim == "client" else server.process
    target.send_signal(signal.SIGKILL)
    target.wait()
    if victim == "server":
        _, err = client.communicate(timeout=60)
        assert client.returncode == 1 and ("code 16" in err or "code 15" in err)
        server = restart(server)
    else:
        client.communicate(timeout=10)
    try:
        on_disk = written(partial)
        record = read_checkpoint(partial)
        assert record is not None and record.good > 0
        assert not (tmp_path / "big.bin").exists()
        done = finish(server, "recv", ["/big.bin", "."], tmp_path)
        assert done["resumed_from"] == record.good
        assert on_disk - record.good < 6 * 1024 * 1024
        if victim == "server":  # the receiver lived on and recorded every byte it had
            assert on_disk - record.good < 1024 * 1024
        assert (tmp_path / "big.bin").read_bytes() == data
    finally:
        server.stop()


@pytest.mark.slow
def test_cut_network_then_resumed(tmp_path: Path) -> None:
    """UDP dropped mid-file (a cut network) until both ends time out; then the same command
    continues where the receiver stopped. Slow: the idle timeout is 20 s."""
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"):
        pytest.fail("this test needs root, iproute2 and nftables")
    namespace = f"slipstream-cut-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    inside = ["ip", "netns", "exec", namespace]
    try:
        subprocess.run([*inside, "ip", "link", "set", "lo", "up"], check=True)
        server = start_quickstart(tmp_path / "server", prefix=inside)
        try:
            _cut_and_resume(server, tmp_path, inside)
        finally:
            server.stop()
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)


def _cut_and_resume(server: ServerHandle, tmp_path: Path, inside: list[str]) -> None:
    data = os.urandom(SIZE)
    (tmp_path / "big.bin").write_bytes(data)
    partial = server.docroot / "big.bin.partial"
    command = [sys.executable, "-m", "slipstream", "send", *connect_args(server)]
    env = {**os.environ, **password_env(server)}
    client = subprocess.Popen(
        [*inside, *command, *SLOW, "big.bin", "/"],
        cwd=tmp_path,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    wait_for(lambda: written(partial) > KILL_AFTER)
    # Dropped on input: silently lost, as on a cut network (an output drop fails sendmsg).
    cut = "add table inet cut; add chain inet cut c { type filter hook input priority 0; }; "
    subprocess.run([*inside, "nft", cut + "add rule inet cut c meta l4proto udp drop"], check=True)
    _, err = client.communicate(timeout=90)
    assert client.returncode == 1 and "code 15" in err, err
    wait_for(lambda: "result=" in server.log(), timeout=60)
    record = read_checkpoint(partial)
    assert record is not None and written(partial) - record.good < 1024 * 1024
    subprocess.run([*inside, "nft", "delete table inet cut"], check=True)
    again = subprocess.run(
        [*inside, *command, "--json-events", "big.bin", "/"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    done = next(json.loads(x) for x in again.stdout.splitlines() if '"file_done"' in x)
    assert done["resumed_from"] == record.good
    assert (server.docroot / "big.bin").read_bytes() == data
