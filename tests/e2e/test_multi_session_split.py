"""End to end over loopback: multi_session_threshold splits a big file over the sessions.

Every session carries one byte range of the big file into the one shared ``NAME.partial``;
the file ends byte-identical, counted once, with no sidecar left behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from slipstream.engine.multisession import split_ranges
from slipstream.engine.resume import read_checkpoint
from tests.conftest import (
    ServerHandle,
    cli,
    connect_args,
    password_env,
    start_quickstart,
    tree_digest,
)

BIG = 48 * 1024 * 1024
THRESHOLD = 8 * 1024 * 1024
SESSIONS = 3
AHEAD = 2 * 1024 * 1024  # each range's checkpoint is this far in before the kill


def _tree(root: Path) -> Path:
    """One big file and a few small ones (which go whole to one session each)."""
    (root / "small").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(BIG))
    for index in range(4):
        (root / "small" / f"f{index}.dat").write_bytes(os.urandom(30_000 + index))
    return root


def _spec_file(tmp_path: Path, direction: str, **fields: Any) -> Path:
    body = {
        "direction": direction,
        "create_dir": True,
        "multi_session": SESSIONS,
        "multi_session_threshold": THRESHOLD,
        **fields,
    }
    path = tmp_path / f"spec-{direction}.json"
    path.write_text(json.dumps(body))
    return path


def _run(server: ServerHandle, verb: str, spec: Path, cwd: Path) -> list[dict[str, Any]]:
    result = cli(
        verb,
        "--spec",
        str(spec),
        "--json-events",
        *connect_args(server),
        cwd=cwd,
        env=password_env(server),
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if ".partial" in p.name or "slipstream-ckpt" in p.name]


def _check_split(events: list[dict[str, Any]]) -> None:
    big = [e for e in events if e.get("path", "").endswith("big.bin")]
    ranges = [e for e in big if e["type"] == "range_done"]
    # Every session carried its own range; together they are the whole file.
    assert sorted(e["session_index"] for e in ranges) == list(range(SESSIONS))
    spans = sorted((e["offset"], e["length"]) for e in ranges)
    assert spans == [(i * BIG // SESSIONS, BIG // SESSIONS) for i in range(SESSIONS)]
    done = [e for e in big if e["type"] == "file_done"]
    assert len(done) == 1 and done[0]["size"] == BIG and done[0]["split"] is True
    summary = events[-1]
    assert summary["type"] == "session_done" and summary["sessions"] == SESSIONS
    assert summary["files_done"] == 5 and summary["files_failed"] == 0  # the big file once
    assert summary["bytes"] == BIG + sum(30_000 + i for i in range(4))


def test_split_upload(server: ServerHandle, tmp_path: Path) -> None:
    tree = _tree(tmp_path / "tree")
    spec = _spec_file(tmp_path, "send", paths=[{"source": "tree"}], destination_root="/up")
    events = _run(server, "send", spec, tmp_path)
    _check_split(events)
    assert tree_digest(server.docroot / "up" / "tree") == tree_digest(tree)
    assert _leftovers(server.docroot) == []
    # The server logged each range of the big file, and the file once.
    log = server.log()
    assert log.count("path=tree/big.bin result=range_done") == SESSIONS
    assert log.count("path=tree/big.bin result=file_done") == 1


def test_split_download(server: ServerHandle, tmp_path: Path) -> None:
    tree = _tree(server.docroot / "tree")
    spec = _spec_file(tmp_path, "receive", paths=[{"source": "/tree"}], destination_root="got")
    events = _run(server, "recv", spec, tmp_path)
    _check_split(events)
    assert tree_digest(tmp_path / "got" / "tree") == tree_digest(tree)
    assert _leftovers(tmp_path / "got") == []


def test_split_upload_interrupted_then_resumed(server: ServerHandle, tmp_path: Path) -> None:
    """kill -9 of the server (the receiver of every range) once each range is well under
    way; the same command again continues every range from its own checkpoint."""
    data = os.urandom(BIG)
    (tmp_path / "big.bin").write_bytes(data)
    slow = _spec_file(
        tmp_path,
        "send",
        paths=[{"source": "big.bin"}],
        destination_root="/",
        rate_policy="fixed",
        target_rate_kbps=60_000,  # 20 Mbit/s per session: about 6.5 s for the file
    )
    partial = server.docroot / "big.bin.partial"
    client = subprocess.Popen(
        [sys.executable, "-m", "slipstream", "send", "--spec", str(slow), *connect_args(server)],
        cwd=tmp_path,
        env={**os.environ, **password_env(server)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    offsets = [offset for offset, _ in split_ranges(BIG, SESSIONS)]

    def every_range_checkpointed() -> bool:
        records = [(read_checkpoint(partial, offset), offset) for offset in offsets]
        return all(r is not None and r.good > offset + AHEAD for r, offset in records)

    try:
        deadline = time.monotonic() + 60
        while not every_range_checkpointed():
            assert time.monotonic() < deadline and client.poll() is None, "no progress"
            time.sleep(0.02)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
        client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait()
    assert client.returncode == 1
    sidecars = sorted(p.name for p in server.docroot.iterdir() if p.name != "big.bin.partial")
    assert "big.bin.partial.ranges" in sidecars
    assert len([n for n in sidecars if n.startswith("big.bin.partial.slipstream-ckpt.")]) == 3
    server = start_quickstart(server.root)  # same docroot, keys and password; new ports
    try:
        spec = _spec_file(tmp_path, "send", paths=[{"source": "big.bin"}], destination_root="/")
        events = _run(server, "send", spec, tmp_path)
        ranges = [e for e in events if e["type"] == "range_done"]
        assert len(ranges) == SESSIONS
        assert all(e["resumed_from"] > e["offset"] for e in ranges)  # each range continued
        resent = sum(e["offset"] + e["length"] - e["resumed_from"] for e in ranges)
        assert resent < BIG - SESSIONS * AHEAD
        assert (server.docroot / "big.bin").read_bytes() == data
        assert _leftovers(server.docroot) == []
    finally:
        server.stop()
