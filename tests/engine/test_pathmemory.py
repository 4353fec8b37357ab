"""The path memory between sessions (careful resume): storage rules and the round trip."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from slipstream.engine.job import ClientOptions, transfer_sync
from slipstream.engine.pathmemory import MAX_AGE, MAX_ENTRIES, PathMemory
from slipstream.protocol.rate import PathEstimate
from slipstream.protocol.rate.fair import FairRateController
from tests.conftest import ServerHandle, connection_spec

ESTIMATE = PathEstimate(rate=12.5e6, min_rtt=0.1)


def test_remembered_across_instances(tmp_path: Path) -> None:
    file = tmp_path / "cache" / "paths.json"
    PathMemory(file).remember("10.0.0.2", ESTIMATE, now=1000.0)
    assert PathMemory(file).recall("10.0.0.2", now=1000.0 + MAX_AGE - 1) == ESTIMATE
    assert PathMemory(file).recall("10.0.0.3", now=1000.0) is None


def test_old_memories_are_forgotten(tmp_path: Path) -> None:
    memory = PathMemory(tmp_path / "paths.json")
    memory.remember("peer", ESTIMATE, now=1000.0)
    assert memory.recall("peer", now=1000.0 + MAX_AGE + 1) is None
    assert memory.recall("peer", now=999.0) is None  # a clock that went back: not trusted


def test_nothing_learned_keeps_the_old_memory(tmp_path: Path) -> None:
    memory = PathMemory(tmp_path / "paths.json")
    memory.remember("peer", ESTIMATE, now=1000.0)
    memory.remember("peer", None, now=1001.0)  # a session too short to know the path
    assert memory.recall("peer", now=1002.0) == ESTIMATE


def test_switched_off_by_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = tmp_path / "paths.json"
    PathMemory(file).remember("peer", ESTIMATE, now=1000.0)
    monkeypatch.setenv("SLIPSTREAM_PATH_MEMORY", "0")
    assert PathMemory(file).recall("peer", now=1000.0) is None
    PathMemory(file).remember("other", ESTIMATE, now=1000.0)
    assert "other" not in json.loads(file.read_text())


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"peer": {"rate": -1, "min_rtt": 0.1, "at": 1}}', '{"p": 3}']
)
def test_a_damaged_file_is_a_cold_start(tmp_path: Path, content: str) -> None:
    file = tmp_path / "paths.json"
    file.write_text(content)
    memory = PathMemory(file)
    assert memory.recall("peer", now=1000.0) is None
    memory.remember("peer", ESTIMATE, now=1000.0)  # and it heals on the next write
    assert PathMemory(file).recall("peer", now=1000.0) == ESTIMATE


def test_an_unwritable_cache_never_fails(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    memory = PathMemory(blocker / "paths.json")  # its folder is a file
    memory.remember("peer", ESTIMATE)
    assert memory.recall("peer") == ESTIMATE  # still remembered in memory


def test_bounded_number_of_paths(tmp_path: Path) -> None:
    memory = PathMemory(tmp_path / "paths.json")
    for index in range(MAX_ENTRIES + 10):
        memory.remember(f"peer{index}", ESTIMATE, now=1000.0 + index)
    stored = json.loads((tmp_path / "paths.json").read_text())
    assert len(stored) == MAX_ENTRIES
    assert "peer0" not in stored and f"peer{MAX_ENTRIES + 9}" in stored


def test_an_upload_recalls_and_records_its_path(
    server: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wiring, in process: the sender gets the remembered hint and its estimate is kept.
    (Loopback has no bottleneck to find, so the estimate itself is stubbed.)"""
    host = server.info["host"]
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "slipstream" / "paths.json"
    PathMemory(cache).remember(host, ESTIMATE)
    hints: list[tuple[float, float]] = []
    learned = PathEstimate(rate=40e6, min_rtt=0.02)
    monkeypatch.setattr(FairRateController, "resume_path", lambda _c, *hint: hints.append(hint))
    monkeypatch.setattr(FairRateController, "path_estimate", lambda _c: learned)
    (tmp_path / "a.bin").write_bytes(os.urandom(1 << 20))
    spec = connection_spec(server, direction="send", paths=[{"source": "a.bin"}])
    transfer_sync(spec, options=ClientOptions(cwd=tmp_path))
    assert hints == [(ESTIMATE.rate, ESTIMATE.min_rtt)]
    assert PathMemory(cache).recall(host) == learned
