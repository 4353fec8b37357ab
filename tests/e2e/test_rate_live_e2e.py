"""End to end over loopback: live rate changes, locks, multi_session and the path MTU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ServerHandle, cli, connect_args, make_tree, password_env, tree_digest


def _spec_file(tmp_path: Path, direction: str, **fields: object) -> Path:
    body = {"direction": direction, "create_dir": True, **fields}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(body))
    return path


def _start(server: ServerHandle, args: list[str], cwd: Path) -> subprocess.Popen[str]:
    env = {**os.environ, **password_env(server)}
    return subprocess.Popen(
        [sys.executable, "-m", "slipstream", *args, *connect_args(server)],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


def _wait_active(sock: Path, proc: subprocess.Popen[str]) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if sock.exists():
            status = cli("modify", "--socket", str(sock))
            if status.returncode == 0 and json.loads(status.stdout).get("active"):
                return dict(json.loads(status.stdout))
        time.sleep(0.1)
    raise AssertionError(f"transfer never became active: {proc.communicate()}")


@pytest.mark.parametrize("direction", ["send", "receive"])
def test_modify_a_running_transfer(server: ServerHandle, tmp_path: Path, direction: str) -> None:
    data = os.urandom(6_000_000)  # 6 s at the first 8 Mbit/s
    if direction == "send":
        (tmp_path / "big.bin").write_bytes(data)
        paths = [{"source": "big.bin"}]
        fields = {"paths": paths, "destination_root": "/live"}
    else:
        (server.docroot / "big.bin").write_bytes(data)
        fields = {"paths": [{"source": "/big.bin"}], "destination_root": "got"}
    spec = _spec_file(
        tmp_path,
        direction,
        target_rate_kbps=8000,
        rate_policy="fixed",
        lock_min_rate=True,
        **fields,
    )
    sock = tmp_path / "ctl.sock"
    verb = "send" if direction == "send" else "recv"
    started = time.monotonic()
    proc = _start(server, [verb, "--spec", str(spec), "--control-socket", str(sock)], tmp_path)
    try:
        status = _wait_active(sock, proc)
        assert status["target_rate_kbps"] == 8000 and status["rate_policy"] == "fixed"
        locked = cli("modify", "--socket", str(sock), "-m", "1M")
        assert locked.returncode == 1 and "code 55" in locked.stderr
        changed = cli("modify", "--socket", str(sock), "-l", "1g", "--policy", "fair")
        assert changed.returncode == 0, changed.stderr
        assert json.loads(changed.stdout)["target_rate_kbps"] == 1_000_000
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 5.5  # the faster rate took over well before 6 s
    got = (server.docroot / "live" if direction == "send" else tmp_path / "got") / "big.bin"
    assert got.read_bytes() == data
    assert not sock.exists()  # cleaned up after the transfer


def test_multi_session_upload_splits_the_files(server: ServerHandle, tmp_path: Path) -> None:
    tree = make_tree(tmp_path / "tree", files=24, size=40_000)
    spec = _spec_file(
        tmp_path, "send", paths=[{"source": "tree"}], destination_root="/multi", multi_session=3
    )
    result = cli(
        "send",
        "--spec",
        str(spec),
        "--json-events",
        *connect_args(server),
        cwd=tmp_path,
        env=password_env(server),
    )
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    starts = [e for e in events if e["type"] == "session_start"]
    assert sorted(e["session_index"] for e in starts) == [0, 1, 2]
    assert len({e["session_id"] for e in starts}) == 3  # three sessions, three UDP sockets
    done = [e for e in events if e["type"] == "file_done"]
    assert len({e["session_index"] for e in done}) == 3  # every session carried files
    assert tree_digest(server.docroot / "multi" / "tree") == tree_digest(tree)


def test_loopback_path_mtu_picks_jumbo_datagrams(server: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(os.urandom(2_000_000))
    result = cli(
        "send",
        "--json-events",
        *connect_args(server),
        "f.bin",
        "/",
        cwd=tmp_path,
        env=password_env(server),
    )
    assert result.returncode == 0, result.stderr
    start = next(json.loads(x) for x in result.stdout.splitlines() if '"session_start"' in x)
    assert start["dgram_size"] == 9000  # lo's MTU is 65536: capped at 9000
    explicit = cli(
        "send",
        "--json-events",
        "-Z",
        "1500",
        *connect_args(server),
        "f.bin",
        "/again/",
        cwd=tmp_path,
        env=password_env(server),
    )
    start = next(json.loads(x) for x in explicit.stdout.splitlines() if '"session_start"' in x)
    assert start["dgram_size"] == 1500
