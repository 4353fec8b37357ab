"""End to end over loopback: a receiver never writes through a symbolic link.

A user who can leave a link in their docroot named like one of the receiver's own files
(``X.partial``, its checkpoint sidecar, a split file's ``.ranges`` record) pointing outside
must not get the server to write there by uploading ``X``. The file fails with
DocrootViolation (41) naming the link, the link's target keeps every byte, and the other
files of the transfer arrive. The same holds for a client receiving a download, over UDP and
over the HTTPS fallback.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.job import ClientOptions, transfer
from slipstream.engine.resume import CheckpointWriter, FileIdentity
from slipstream.errors import DocrootViolation
from tests.conftest import ServerHandle, connection_spec, start_quickstart

SMALL = 100_000
BIG = (1 << 20) + 300_000  # keeps a checkpoint sidecar
T0 = 1_700_000_000 * 10**9
TRANSPORTS = ("udp", "https")
# What is planted as a link: the partial (of a small and of a big file), the partial
# together with a genuine checkpoint vouching for half of it (the resume path, which would
# otherwise extend and write into the partial in place), and the checkpoint sidecar alone.
CASES = {
    "partial-small": (SMALL, ".partial"),
    "partial-big": (BIG, ".partial"),
    "partial-resumable": (BIG, ".partial"),
    "checkpoint": (BIG, ".partial.slipstream-ckpt"),
}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_quickstart(tmp_path_factory.mktemp("receiver-links") / "server")
    try:
        yield handle
    finally:
        handle.stop()


def _run(
    server: ServerHandle, cwd: Path, transport: str, **fields: Any
) -> tuple[Any, list[dict[str, Any]]]:
    if transport == "https":
        info = server.info
        fields |= {
            "http_fallback": "force",
            "https_fallback_port": info["fallback_port"],
            "https_fallback_fingerprint": info["https_fallback_fingerprint"],
        }
    events: list[dict[str, Any]] = []
    spec = connection_spec(server, **fields)
    result = asyncio.run(transfer(spec, events.append, ClientOptions(cwd=cwd)))
    assert result.transport == ("http" if transport == "https" else "fasp")
    return result, events


def _sources(folder: Path, size: int) -> dict[str, bytes]:
    folder.mkdir(parents=True)
    contents = {"X.bin": os.urandom(size), "other.bin": os.urandom(5000)}
    for name, data in contents.items():
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(T0, T0))
    return contents


def _plant(dest: Path, case: str, outside: Path) -> bytes:
    """The link ``dest/X.bin<suffix>`` to ``outside``; returns the target's content."""
    size, suffix = CASES[case]
    dest.mkdir(parents=True, exist_ok=True)
    secret = os.urandom(SMALL)
    outside.write_bytes(secret)
    os.symlink(outside, dest / f"X.bin{suffix}")
    if case == "partial-resumable":
        # A genuine sidecar: the partial's first half is "known good" for this very source.
        CheckpointWriter(dest / "X.bin.partial", FileIdentity(size, T0), SMALL // 2).close()
    return secret


def _check(
    result: Any,
    events: list[dict[str, Any]],
    dest: Path,
    case: str,
    contents: dict[str, bytes],
    outside: Path,
    secret: bytes,
) -> None:
    assert outside.read_bytes() == secret  # not one byte written through the link
    assert (dest / "other.bin").read_bytes() == contents["other.bin"]
    assert not (dest / "X.bin").exists()
    errors = {e["path"]: e["error"] for e in events if e["type"] == "file_error"}
    assert list(errors) == ["d/X.bin"], events
    error = errors["d/X.bin"]
    assert error["code"] == DocrootViolation.code, error
    assert "symbolic link" in error["user_message"]
    assert f"X.bin{CASES[case][1]}" in error["user_message"]
    assert str(outside.parent) not in error["user_message"] + error["internal_message"]
    assert result.totals.files_failed == 1 and result.totals.files_done == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES))
def test_upload_never_writes_through_a_link(
    shared: ServerHandle, tmp_path: Path, case: str, transport: str
) -> None:
    size, _ = CASES[case]
    contents = _sources(tmp_path / "src" / "d", size)
    folder = f"up-{case}-{transport}"
    dest = shared.docroot / folder / "d"
    outside = tmp_path / "outside.bin"
    secret = _plant(dest, case, outside)
    result, events = _run(
        shared,
        tmp_path / "src",
        transport,
        direction="send",
        paths=[{"source": "d"}],
        destination_root=f"/{folder}",
        resume="attributes",
    )
    _check(result, events, dest, case, contents, outside, secret)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("case", list(CASES))
def test_download_never_writes_through_a_link(
    shared: ServerHandle, tmp_path: Path, case: str, transport: str
) -> None:
    size, _ = CASES[case]
    folder = f"dl-{case}-{transport}"
    contents = _sources(shared.docroot / folder / "d", size)
    dest = tmp_path / "got" / "d"
    outside = tmp_path / "outside.bin"
    secret = _plant(dest, case, outside)
    result, events = _run(
        shared,
        tmp_path,
        transport,
        direction="receive",
        paths=[{"source": f"/{folder}/d"}],
        destination_root="got",
        resume="attributes",
    )
    _check(result, events, dest, case, contents, outside, secret)


@pytest.mark.parametrize("sidecar", [".partial.ranges", ".partial.slipstream-ckpt.1048576"])
def test_split_file_never_writes_through_a_link(
    shared: ServerHandle, tmp_path: Path, sidecar: str
) -> None:
    """multi_session_threshold: the range record and a range's checkpoint are refused too."""
    src = tmp_path / "src" / "d"
    src.mkdir(parents=True)
    (src / "X.bin").write_bytes(os.urandom(2 << 20))
    (src / "other.bin").write_bytes(other := os.urandom(5000))
    folder = f"split{sidecar.replace('.', '-')}"
    dest = shared.docroot / folder / "d"
    dest.mkdir(parents=True)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(secret := os.urandom(SMALL))
    os.symlink(outside, dest / f"X.bin{sidecar}")
    result, events = _run(
        shared,
        tmp_path / "src",
        "udp",
        direction="send",
        paths=[{"source": "d"}],
        destination_root=f"/{folder}",
        multi_session=2,
        multi_session_threshold=1 << 20,
    )
    assert outside.read_bytes() == secret
    assert (dest / "other.bin").read_bytes() == other
    assert not (dest / "X.bin").exists()
    failed = [e for e in events if e["type"] in ("file_error", "range_error")]
    assert failed and all(e["path"] == "d/X.bin" for e in failed), events
    codes = {e["error"]["code"] for e in failed}
    assert DocrootViolation.code in codes, failed
    assert any(f"X.bin{sidecar}" in e["error"]["user_message"] for e in failed), failed
    assert result.totals.files_failed == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_upload_into_a_linked_folder_stays_in_the_docroot(
    shared: ServerHandle, tmp_path: Path, transport: str
) -> None:
    """A folder link leading out of the docroot is refused; one staying inside is followed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(data := os.urandom(3000))
    folder = shared.docroot / f"dirs-{transport}"
    (folder / "inside").mkdir(parents=True)
    outside = tmp_path / "outside-dir"
    outside.mkdir()
    os.symlink(outside, folder / "out")
    os.symlink("inside", folder / "in")
    pairs = [
        {"source": "a.bin", "destination": f"/dirs-{transport}/out/a.bin"},
        {"source": "a.bin", "destination": f"/dirs-{transport}/in/a.bin"},
    ]
    result, events = _run(shared, src, transport, direction="send", paths=pairs)
    assert list(outside.iterdir()) == []
    assert (folder / "inside" / "a.bin").read_bytes() == data
    errors = [e for e in events if e["type"] == "file_error"]
    assert [e["error"]["code"] for e in errors] == [DocrootViolation.code], events
    assert result.totals.files_failed == 1 and result.totals.files_done == 1
