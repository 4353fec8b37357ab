"""``--persist``: later transfers reuse one SSH login kept by a background master
(transport/shared.py, transport/master.py), over loopback with the real server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from slipstream.transport.rundir import UnsafeRunDir, private_runtime_dir
from slipstream.transport.shared import stop_master
from tests.conftest import ServerHandle, cli, connect_args, make_tree, password_env, tree_digest


@pytest.fixture
def run_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Short: a Unix socket path must fit in 108 bytes, which pytest's tmp_path may not.
    base = Path(tempfile.mkdtemp(prefix="ss-run-"))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    folder = base / f"slipstream-{os.getuid()}"
    yield folder
    for path in folder.glob("ssh-*.sock"):  # stop every master a test left running
        asyncio.run(stop_master(path))
    _wait_for(lambda: not list(folder.glob("ssh-*.sock")), 10)
    shutil.rmtree(base, ignore_errors=True)


def _wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def send(server: ServerHandle, tmp_path: Path, *args: str, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return transfer_cli("send", server, tmp_path, *args, env=env)


def transfer_cli(
    command: str,
    server: ServerHandle,
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
):  # type: ignore[no-untyped-def]
    return cli(
        command,
        *connect_args(server),
        "--json-events",
        *args,
        cwd=tmp_path,
        env={**password_env(server), **(env or {})},
    )


def logins(result) -> list[str]:  # type: ignore[no-untyped-def]
    assert result.returncode == 0, result.stderr
    events = [json.loads(line) for line in result.stdout.splitlines()]
    return [e["login"] for e in events if e["type"] == "session_start"]


def first_transfer_starts_a_master(
    server: ServerHandle, tmp_path: Path, run_dir: Path, persist: str = "30"
) -> None:
    (tmp_path / "f.txt").write_text("x")
    assert logins(send(server, tmp_path, "--persist", persist, "f.txt", "/")) == ["new"]
    assert _wait_for(lambda: sockets(run_dir), 15), "no master came up"


def sockets(folder: Path) -> list[Path]:
    return sorted(folder.glob("ssh-*.sock"))


def test_later_transfers_reuse_one_login(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    make_tree(tmp_path / "tree", files=40)
    assert logins(send(server, tmp_path, "--persist", "30", "-d", "tree", "/one")) == ["new"]
    assert _wait_for(lambda: sockets(run_dir), 15), "no master came up"
    before = server.log().count("auth ok")
    for name in ("two", "three"):
        result = send(server, tmp_path, "--persist", "30", "-d", "tree", f"/{name}")
        assert logins(result) == ["shared"]
        assert tree_digest(server.docroot / name / "tree") == tree_digest(tmp_path / "tree")
    assert server.log().count("auth ok") == before  # no login for either
    # The master's folder and socket are this user's only.
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(sockets(run_dir)[0].stat().st_mode) == 0o600


def test_logins_lists_and_closes_kept_logins(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    first_transfer_starts_a_master(server, tmp_path, run_dir)
    listed = cli("logins")
    assert listed.returncode == 0, listed.stderr
    port = server.info["ssh_port"]
    assert f"{server.info['user']}@127.0.0.1:{port}" in listed.stdout
    assert "idle limit 30 s" in listed.stdout
    closed = cli("logins", "--stop")
    assert "closed" in closed.stdout
    assert _wait_for(lambda: not sockets(run_dir), 10)
    assert cli("logins").stdout == ""


def test_relative_paths_mean_the_same_files_to_the_master(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    # The master runs in another folder: a relative known_hosts (or key file) must not
    # become another file there.
    (tmp_path / "f.txt").write_text("x")
    info = server.info
    args = ["--host", info["host"], "--user", info["user"], "-P", str(info["ssh_port"])]
    args += ["-O", str(info["fasp_port"]), "--accept-host-key", "--persist", "30"]
    env = {**password_env(server), "SLIPSTREAM_KNOWN_HOSTS": "kh"}
    first = cli("send", *args, "--json-events", "f.txt", "/", cwd=tmp_path, env=env)
    assert logins(first) == ["new"]
    assert _wait_for(lambda: sockets(run_dir), 15)
    second = cli("send", *args, "--json-events", "f.txt", "/g.txt", cwd=tmp_path, env=env)
    assert logins(second) == ["shared"]
    assert len((tmp_path / "kh").read_text().splitlines()) == 1  # known once, by the client
    assert not Path("/kh").exists()


def test_persist_from_the_environment_and_downloads(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    (server.docroot / "data.bin").write_bytes(os.urandom(300_000))
    env = {"SLIPSTREAM_PERSIST": "30"}
    first = transfer_cli("recv", server, tmp_path, "/data.bin", "a.bin", env=env)
    assert logins(first) == ["new"]
    assert _wait_for(lambda: sockets(run_dir), 15)
    second = transfer_cli("recv", server, tmp_path, "/data.bin", "b.bin", env=env)
    assert logins(second) == ["shared"]
    assert (tmp_path / "b.bin").read_bytes() == (server.docroot / "data.bin").read_bytes()


def test_without_persist_nothing_stays(server: ServerHandle, tmp_path: Path, run_dir: Path) -> None:
    (tmp_path / "f.txt").write_text("x")
    assert logins(send(server, tmp_path, "f.txt", "/")) == ["new"]
    time.sleep(1.0)
    assert not sockets(run_dir)


def test_the_master_leaves_when_idle(server: ServerHandle, tmp_path: Path, run_dir: Path) -> None:
    first_transfer_starts_a_master(server, tmp_path, run_dir, persist="1")
    assert _wait_for(lambda: not sockets(run_dir), 10), "the idle master did not leave"
    assert logins(send(server, tmp_path, "--persist", "1", "f.txt", "/again.txt")) == ["new"]


def test_a_stale_socket_means_a_login_and_a_new_master(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    first_transfer_starts_a_master(server, tmp_path, run_dir)
    path = sockets(run_dir)[0]
    asyncio.run(stop_master(path))
    assert _wait_for(lambda: not path.exists(), 10)
    # Its stream opened ahead for a next client closed unused: no error on the server.
    assert _wait_for(lambda: "closed a control stream unused" in server.log(), 10)
    assert "did not open a session" not in server.log()
    # What a killed master leaves: a socket file nobody listens on.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()
    assert logins(send(server, tmp_path, "--persist", "30", "f.txt", "/b.txt")) == ["new"]
    # The new master replaced the stale socket, and serves.
    assert _wait_for(lambda: _answers(path), 15)
    assert logins(send(server, tmp_path, "--persist", "30", "f.txt", "/c.txt")) == ["shared"]


def _answers(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_a_server_error_arrives_through_the_shared_login(
    server: ServerHandle, tmp_path: Path, run_dir: Path
) -> None:
    first_transfer_starts_a_master(server, tmp_path, run_dir)
    result = send(server, tmp_path, "--persist", "30", "f.txt", "/../outside")
    assert result.returncode != 0
    errors = [json.loads(line) for line in result.stdout.splitlines()]
    error = next(e for e in errors if e["type"] == "error")
    assert error["code"] == 41, error  # DocrootViolation, as over a login of its own


def test_an_unsafe_run_folder_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    base = Path(tempfile.mkdtemp(prefix="ss-run-"))
    try:
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
        folder = base / f"slipstream-{os.getuid()}"
        folder.mkdir(mode=0o777)
        folder.chmod(0o777)
        with pytest.raises(UnsafeRunDir, match="open to other users"):
            private_runtime_dir()
        folder.rmdir()
        folder.symlink_to(base)
        with pytest.raises(UnsafeRunDir, match="not a folder"):
            private_runtime_dir()
    finally:
        shutil.rmtree(base, ignore_errors=True)
