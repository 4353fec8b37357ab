"""Shared fixtures: a real quickstart server in a child process, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SERVER_START_TIMEOUT = 60


@dataclass
class ServerHandle:
    process: subprocess.Popen[str]
    info: dict[str, Any]
    root: Path
    log_path: Path

    @property
    def docroot(self) -> Path:
        return Path(self.info["docroot"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_quickstart(
    root: Path, extra_args: list[str] | None = None, prefix: list[str] | None = None
) -> ServerHandle:
    """`slipstream serve --quickstart ROOT` as a child; returns once it printed its JSON line."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "server.log"
    command = [
        *(prefix or []),
        sys.executable,
        "-m",
        "slipstream",
        "serve",
        "--quickstart",
        str(root / "qs"),
        "--ssh-port",
        "0",
        "--fasp-port",
        "0",
        "--api-port",
        "0",
        "--fallback-port",
        "0",
        *(extra_args or []),
    ]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=SERVER_START_TIMEOUT)
        raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
    return ServerHandle(process, json.loads(line), root, log_path)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerHandle]:
    handle = start_quickstart(tmp_path / "server")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(autouse=True)
def _private_known_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Never read or write the real user's known_hosts from tests.
    monkeypatch.setenv("SLIPSTREAM_KNOWN_HOSTS", str(tmp_path / "known_hosts"))
    # Nor the real cache (the client's path memory, engine/pathmemory.py): each test
    # starts cold and leaves nothing behind.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Shared logins (transport/shared.py) only where a test asks for them.
    monkeypatch.delenv("SLIPSTREAM_PERSIST", raising=False)


def cli(
    *args: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m slipstream ARGS` and capture its output."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "slipstream", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def connect_args(server: ServerHandle) -> list[str]:
    info = server.info
    return [
        "--host",
        info["host"],
        "--user",
        info["user"],
        "-P",
        str(info["ssh_port"]),
        "-O",
        str(info["fasp_port"]),
        "--sshfp",
        info["sshfp"],
    ]


def connection_spec(server: ServerHandle, **fields: Any) -> dict[str, Any]:
    """A TransferSpec dict reaching ``server`` with its quickstart password, plus ``fields``."""
    info = server.info
    return {
        "remote_host": info["host"],
        "remote_user": info["user"],
        "remote_password": info["password"],
        "ssh_port": info["ssh_port"],
        "fasp_port": info["fasp_port"],
        "sshfp": info["sshfp"],
        **fields,
    }


def over_https(server: ServerHandle, **fields: Any) -> dict[str, Any]:
    """``connection_spec`` forced onto the server's HTTPS fallback."""
    info = server.info
    return connection_spec(
        server,
        http_fallback="force",
        https_fallback_port=info["fallback_port"],
        https_fallback_fingerprint=info["https_fallback_fingerprint"],
        **fields,
    )


def password_env(server: ServerHandle) -> dict[str, str]:
    return {"SLIPSTREAM_PASSWORD": server.info["password"]}


def make_tree(root: Path, files: int = 20, size: int = 3000) -> Path:
    """A small tree with nested folders, an empty folder, a zero-byte file and unicode names."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "empty-dir").mkdir(exist_ok=True)
    (root / "zero.bin").write_bytes(b"")
    (root / "héllo wörld ✓.txt").write_text("unicode name\n")
    for index in range(files):
        sub = root / f"sub{index % 3}" / "deeper"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"file{index}.dat").write_bytes(os.urandom(size + index * 101))
    return root


def tree_digest(root: Path) -> dict[str, Any]:
    """Relative path -> content (files) or 'dir', for comparing two trees exactly."""
    result: dict[str, Any] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        result[rel] = "dir" if path.is_dir() else path.read_bytes()
    return result
