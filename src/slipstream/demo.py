"""`slipstream demo`: a quickstart server, sample files sent to it and fetched back, with rates.

The server runs as a child process (exactly `slipstream serve --quickstart`) so the demo
measures two processes talking over loopback, as a real transfer would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from slipstream.cli_transfer import summary_line
from slipstream.engine.blockio import file_digest
from slipstream.engine.job import ClientOptions, TransferResult, transfer_sync
from slipstream.errors import ChecksumMismatch, ConnectError, UsageError

SERVER_START_TIMEOUT = 60.0


def parse_size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1] if text and text[-1] in units else ""
    try:
        return int(float(text[: len(text) - len(unit)]) * units[unit])
    except ValueError:
        raise UsageError(f"size: cannot read {text!r}; use e.g. 64M or 1G") from None


def make_samples(root: Path, big_size: int) -> Path:
    samples = root / "samples"
    tree = samples / "tree"
    (tree / "empty").mkdir(parents=True, exist_ok=True)
    big = samples / "big.bin"
    if not big.exists() or big.stat().st_size != big_size:
        with open(big, "wb") as handle:
            left = big_size
            while left:
                chunk = os.urandom(min(left, 1 << 22))
                handle.write(chunk)
                left -= len(chunk)
    for index in range(50):
        (tree / f"note-{index:02d}.txt").write_text(f"sample file {index}\n" * (index + 1))
    return samples


def start_server(root: Path) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    command = [
        sys.executable,
        "-m",
        "slipstream",
        "serve",
        "--quickstart",
        str(root / "server"),
        "--ssh-port",
        "0",
        "--fasp-port",
        "0",
        "--api-port",
        "0",
        "--fallback-port",
        "0",
    ]
    log = open(root / "server.log", "w")  # noqa: SIM115 - the child keeps writing to it
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    line = process.stdout.readline()
    if not line or time.monotonic() > deadline:
        process.terminate()
        raise ConnectError(f"the demo server did not start; see {root / 'server.log'}")
    return process, json.loads(line)


def _spec(info: dict[str, Any], direction: str, paths: list[str], dest: str) -> dict[str, Any]:
    return {
        "direction": direction,
        "remote_host": info["host"],
        "remote_user": info["user"],
        "remote_password": info["password"],
        "ssh_port": info["ssh_port"],
        "fasp_port": info["fasp_port"],
        "sshfp": info["sshfp"],
        "paths": [{"source": p} for p in paths],
        "destination_root": dest,
        "create_dir": True,
        "overwrite": "always",
    }


def _run(spec: dict[str, Any], cwd: Path) -> TransferResult:
    result = transfer_sync(spec, None, ClientOptions(cwd=cwd))
    print(summary_line(result))
    return result


def run_demo(work_dir: Path | None, size: str) -> None:
    root = work_dir or Path(tempfile.mkdtemp(prefix="slipstream-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"demo folder: {root}")
    samples = make_samples(root, parse_size(size))
    server, info = start_server(root)
    try:
        print(
            f"server: {info['host']} ssh_port={info['ssh_port']} "
            f"fasp_port={info['fasp_port']} sshfp={info['sshfp']}"
        )
        print("upload (encrypted, aes-128):")
        _run(_spec(info, "send", ["big.bin", "tree"], "/demo"), samples)
        print("download:")
        back = root / "downloaded"
        _run(_spec(info, "receive", ["/demo/big.bin", "/demo/tree"], str(back)), root)
        if file_digest(back / "big.bin") != file_digest(samples / "big.bin"):
            raise ChecksumMismatch("the downloaded copy differs from the original")
        print("verified: the round trip is byte-identical")
    finally:
        server.terminate()
        server.wait(timeout=10)
