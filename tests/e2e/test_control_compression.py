"""The control stream's ``zlib`` feature end to end: used when both ends offer it, and a
client that does not offer it (an older one) still gets an uncompressed session."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine import wiring
from slipstream.engine.job import ClientOptions, transfer
from tests.conftest import ServerHandle, connection_spec, tree_digest

OLD_FEATURES = tuple(f for f in wiring.FEATURES if f != "zlib")


def many_files(root: Path, count: int = 300) -> Path:
    for index in range(count):
        folder = root / f"d{index % 7}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{index:04d}.bin").write_bytes(os.urandom(index * 37 % 5000))
    return root


def run(server: ServerHandle, cwd: Path, **fields: Any) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    spec = connection_spec(server, **fields)
    result = asyncio.run(transfer(spec, events.append, ClientOptions(cwd=cwd)))
    assert result.ok, [e for e in events if e["type"] in ("error", "file_error")]
    return events


@pytest.mark.parametrize("offered", ["zlib", "none"])
def test_uploads_and_downloads_with_and_without_compression(
    server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offered: str
) -> None:
    if offered == "none":
        monkeypatch.setattr(wiring, "FEATURES", OLD_FEATURES)
    many_files(tmp_path / "tree")
    up = run(server, tmp_path, direction="send", paths=[{"source": "tree"}], destination_root="/")
    start = next(e for e in up if e["type"] == "session_start")
    assert start["control_compression"] == offered
    assert tree_digest(server.docroot / "tree") == tree_digest(tmp_path / "tree")

    down = run(
        server,
        tmp_path,
        direction="receive",
        create_dir=True,
        paths=[{"source": "/tree"}],
        destination_root="back",
    )
    start = next(e for e in down if e["type"] == "session_start")
    assert start["control_compression"] == offered
    assert tree_digest(tmp_path / "back" / "tree") == tree_digest(tmp_path / "tree")
    assert sum(e["type"] == "file_done" for e in down) == 300
