"""End to end over loopback: every file-semantics field of the spec, against a real server.

One quickstart server serves the whole module (its docroot is shared; each test works in its
own folder). Transfers run through the Python API where many are needed (the resume x
overwrite matrix) and through the CLI where the flags themselves are under test.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.job import ClientOptions, TransferResult, transfer
from slipstream.engine.resume import CheckpointWriter, FileIdentity, checkpoint_path
from tests.conftest import (
    ServerHandle,
    cli,
    connect_args,
    connection_spec,
    over_https,
    password_env,
    start_quickstart,
)

RESUMES = ("none", "attributes", "sparse_checksum", "full_checksum")
OVERWRITES = ("never", "always", "diff", "older", "diff+older")
STATES = ("absent", "identical", "different", "older", "newer", "partial")
SIZE = 300_000
HALF = 150_000
T0 = 1_700_000_000 * 10**9  # every matrix source has this mtime


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_quickstart(tmp_path_factory.mktemp("semantics") / "server")
    try:
        yield handle
    finally:
        handle.stop()


def api(
    server: ServerHandle, cwd: Path, spec_for: Any = connection_spec, **fields: Any
) -> tuple[TransferResult, list[dict[str, Any]]]:
    """One transfer through the Python API; returns the result and every event."""
    spec = spec_for(server, **fields)
    events: list[dict[str, Any]] = []
    result = asyncio.run(transfer(spec, events.append, ClientOptions(cwd=cwd)))
    return result, events


def by_path(events: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {e["path"]: e for e in events if e["type"] == kind}


def send_cli(server: ServerHandle, *args: str, cwd: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return cli(
        "send", *connect_args(server), *args, cwd=cwd, env={**password_env(server), **(env or {})}
    )


def recv_cli(server: ServerHandle, *args: str, cwd: Path, env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return cli(
        "recv", *connect_args(server), *args, cwd=cwd, env={**password_env(server), **(env or {})}
    )


def json_events(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


# --- resume x overwrite --------------------------------------------------------------------------


def expected(overwrite: str, resume: str, state: str) -> str:
    """done or skipped, from the Aspera semantics (see tests/engine/test_resume.py)."""
    if state in ("absent", "partial"):
        return "done"
    older = state == "older"
    if overwrite == "never":
        return "skipped"
    if overwrite == "always":
        return "done"
    if overwrite == "older":
        return "done" if older else "skipped"
    if overwrite == "diff+older" and not older:
        return "skipped"
    if resume == "none" or state in ("older", "newer"):
        return "done"  # sizes differ, or resume none never finds two files the same
    if state == "identical":
        return "skipped"
    return "skipped" if resume == "attributes" else "done"  # "different": same size and time


def _matrix_sources(root: Path) -> dict[str, bytes]:
    root.mkdir(parents=True)
    contents = {}
    for state in STATES:
        data = os.urandom(SIZE)
        (root / f"{state}.bin").write_bytes(data)
        os.utime(root / f"{state}.bin", ns=(T0, T0))
        contents[state] = data
    return contents


def _matrix_destination(dest: Path, sources: dict[str, bytes]) -> dict[str, bytes]:
    """Build each destination state; returns what is there before the transfer."""
    dest.mkdir(parents=True)
    before = {
        "identical": sources["identical"],
        "different": os.urandom(SIZE),
        "older": os.urandom(SIZE - 1000),
        "newer": os.urandom(SIZE - 1000),
    }
    times = {"identical": T0, "different": T0, "older": T0 - 10**12, "newer": T0 + 10**12}
    for state, data in before.items():
        (dest / f"{state}.bin").write_bytes(data)
        os.utime(dest / f"{state}.bin", ns=(times[state], times[state]))
    partial = dest / "partial.bin.partial"
    partial.write_bytes(sources["partial"][:HALF] + os.urandom(SIZE - HALF))
    CheckpointWriter(partial, FileIdentity(SIZE, T0), HALF).close()
    return before


@pytest.mark.parametrize("transport", ["fasp", "http"])
@pytest.mark.parametrize(("overwrite", "resume"), list(itertools.product(OVERWRITES, RESUMES)))
def test_resume_overwrite_matrix(
    shared: ServerHandle, tmp_path: Path, overwrite: str, resume: str, transport: str
) -> None:
    """Every pair, over UDP and over the HTTPS fallback (the same rules, the same result;
    over HTTPS the checkpoint a UDP run left is honoured too)."""
    sources = _matrix_sources(tmp_path / "m")
    folder = f"matrix-{overwrite}-{resume}-{transport}"
    dest = shared.docroot / folder / "m"
    before = _matrix_destination(dest, sources)
    via = over_https if transport == "http" else connection_spec
    result, events = api(
        shared,
        tmp_path,
        spec_for=via,
        direction="send",
        paths=[{"source": "m"}],
        destination_root=f"/{folder}",
        overwrite=overwrite,
        resume=resume,
    )
    done, skipped = by_path(events, "file_done"), by_path(events, "file_skipped")
    for state in STATES:
        path, outcome = f"m/{state}.bin", expected(overwrite, resume, state)
        assert (path in done, path in skipped) == (outcome == "done", outcome == "skipped"), state
        on_disk = (dest / f"{state}.bin").read_bytes()
        assert on_disk == (sources[state] if outcome == "done" else before[state]), state
    resumed = done["m/partial.bin"].get("resumed_from")
    assert resumed == (None if resume == "none" else HALF)
    assert result.totals.files_skipped == len(skipped)
    assert result.totals.files_done == len(done) and result.ok
    assert result.transport == transport
    assert not list(dest.glob("*.partial*"))


def test_download_resumes_and_skips_on_the_client(shared: ServerHandle, tmp_path: Path) -> None:
    src = shared.docroot / "dl-resume"
    src.mkdir()
    data = os.urandom(2_000_000)
    (src / "big.bin").write_bytes(data)
    (src / "same.bin").write_bytes(b"same content")
    local = tmp_path / "got" / "dl-resume"
    local.mkdir(parents=True)
    (local / "same.bin").write_bytes(b"same content")
    partial = local / "big.bin.partial"
    partial.write_bytes(data[:1_000_000])
    mtime = (src / "big.bin").stat().st_mtime_ns
    CheckpointWriter(partial, FileIdentity(len(data), mtime), 1_000_000).close()
    result, events = api(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/dl-resume"}],
        destination_root="got",
    )
    assert result.ok
    assert by_path(events, "file_done")["dl-resume/big.bin"]["resumed_from"] == 1_000_000
    assert by_path(events, "file_skipped")["dl-resume/same.bin"]["reason"] == "identical"
    assert (local / "big.bin").read_bytes() == data
    assert not partial.exists() and not checkpoint_path(partial).exists()


def test_wrong_partial_is_not_resumed_by_checksums(shared: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(600_000)
    (tmp_path / "w.bin").write_bytes(data)
    mtime = (tmp_path / "w.bin").stat().st_mtime_ns
    dest = shared.docroot / "wrong-partial"
    dest.mkdir()
    partial = dest / "w.bin.partial"
    partial.write_bytes(os.urandom(300_000))  # claims to be the prefix, is not
    CheckpointWriter(partial, FileIdentity(len(data), mtime), 300_000).close()
    result, events = api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "w.bin"}],
        destination_root="/wrong-partial",
        resume="sparse_checksum",
    )
    assert result.ok and "resumed_from" not in by_path(events, "file_done")["w.bin"]
    assert (dest / "w.bin").read_bytes() == data


@pytest.fixture
def memory_dir() -> Iterator[Path]:
    """A folder in RAM when the machine has one: reading 2 x 4 GiB of holes from ext4 takes
    seconds, from tmpfs a fraction."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = Path(tempfile.mkdtemp(prefix="slipstream-test-", dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_resume_beyond_4_gib(memory_dir: Path) -> None:
    """Offsets past 2^32 in the checkpoint, READY, the block mapping and the digests."""
    server = start_quickstart(memory_dir / "server")
    try:
        _resume_beyond_4_gib(server, memory_dir)
    finally:
        server.stop()


def _resume_beyond_4_gib(shared: ServerHandle, tmp_path: Path) -> None:
    size, good = (4 << 30) + 3_000_000, (4 << 30) + 1_000_000
    tail = os.urandom(size - (4 << 30))
    source = tmp_path / "huge.bin"
    with open(source, "wb") as handle:  # sparse: 4 GiB of zeros, then random data
        handle.truncate(4 << 30)
        handle.seek(4 << 30)
        handle.write(tail)
    mtime = source.stat().st_mtime_ns
    dest = shared.docroot / "huge"
    dest.mkdir()
    partial = dest / "huge.bin.partial"
    with open(partial, "wb") as handle:
        handle.truncate(4 << 30)
        handle.seek(4 << 30)
        handle.write(tail[:1_000_000])
    CheckpointWriter(partial, FileIdentity(size, mtime), good).close()
    result, events = api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "huge.bin"}],
        destination_root="/huge",
        resume="attributes",
        rate_policy="fixed",
        target_rate_kbps=400_000,
    )
    assert result.ok, events
    assert by_path(events, "file_done")["huge.bin"]["resumed_from"] == good
    with open(dest / "huge.bin", "rb") as handle:
        assert handle.seek(0, 2) == size
        handle.seek(4 << 30)
        assert handle.read() == tail
        handle.seek((4 << 30) - 4096)
        assert handle.read(4096) == bytes(4096)


# --- overwrite: the server's veto, save before overwrite -------------------------------------


def test_server_may_deny_overwrite(tmp_path: Path) -> None:
    root = tmp_path / "denying"
    start_quickstart(root).stop()  # creates the config, which quickstart then reuses
    config = root / "qs" / "server.toml"
    config.write_text(config.read_text().replace("[server]\n", "[server]\noverwrite = false\n", 1))
    server = start_quickstart(root)
    try:
        (server.docroot / "old.txt").write_text("keep me")
        (tmp_path / "old.txt").write_text("new content")
        (tmp_path / "fresh.txt").write_text("fresh")
        result = send_cli(
            server, "--overwrite", "always", "old.txt", "fresh.txt", "/", cwd=tmp_path
        )
        assert result.returncode == 1
        assert "does not allow overwriting" in result.stderr and "code 48" not in result.stdout
        assert (server.docroot / "old.txt").read_text() == "keep me"
        assert (server.docroot / "fresh.txt").read_text() == "fresh"
    finally:
        server.stop()


def test_save_before_overwrite(shared: ServerHandle, tmp_path: Path) -> None:
    dest = shared.docroot / "saving"
    dest.mkdir()
    (dest / "report.txt").write_text("version 1")
    (tmp_path / "report.txt").write_text("version 2")
    result = send_cli(
        shared,
        "--json-events",
        "--overwrite",
        "always",
        "--save-before-overwrite",
        "report.txt",
        "/saving",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (dest / "report.txt").read_text() == "version 2"
    saved = [p for p in dest.iterdir() if p.name != "report.txt"]
    assert len(saved) == 1 and saved[0].read_text() == "version 1"
    assert re.fullmatch(r"report\.\d{4}(\.\d\d){5}\.0\.txt", saved[0].name)


# --- preserve times -------------------------------------------------------------------------------


def test_preserve_times(shared: ServerHandle, tmp_path: Path) -> None:
    for name in ("both.txt", "mtime.txt", "none.txt"):
        (tmp_path / name).write_text(name)
        os.utime(tmp_path / name, ns=(1_500_000_000 * 10**9, 1_600_000_000 * 10**9))
    dest = shared.docroot / "times"
    dest.mkdir()
    assert send_cli(shared, "-p", "both.txt", "/times", cwd=tmp_path).returncode == 0
    assert (
        send_cli(
            shared, "--preserve-modification-time", "mtime.txt", "/times", cwd=tmp_path
        ).returncode
        == 0
    )
    assert send_cli(shared, "none.txt", "/times", cwd=tmp_path).returncode == 0
    both, mtime_only, plain = (os.stat(dest / n) for n in ("both.txt", "mtime.txt", "none.txt"))
    assert (both.st_atime_ns, both.st_mtime_ns) == (1_500_000_000 * 10**9, 1_600_000_000 * 10**9)
    assert mtime_only.st_mtime_ns == 1_600_000_000 * 10**9
    assert mtime_only.st_atime_ns != 1_500_000_000 * 10**9
    assert plain.st_mtime_ns > 1_700_000_000 * 10**9


# --- symbolic links ------------------------------------------------------------------------------


def _link_tree(root: Path) -> Path:
    (root / "lt" / "sub").mkdir(parents=True)
    (root / "lt" / "sub" / "real.txt").write_text("real")
    (root / "lt" / "to-real").symlink_to("sub/real.txt")
    return root / "lt"


def test_symlink_policies_on_upload(shared: ServerHandle, tmp_path: Path) -> None:
    _link_tree(tmp_path)
    for policy in ("follow", "skip", "copy"):
        (shared.docroot / policy).mkdir()
        result, events = api(
            shared,
            tmp_path,
            direction="send",
            paths=[{"source": "lt"}],
            destination_root=f"/{policy}",
            symlink_policy=policy,
        )
        assert result.ok
    assert (shared.docroot / "follow/lt/to-real").read_text() == "real"
    assert not (shared.docroot / "follow/lt/to-real").is_symlink()
    assert not os.path.lexists(shared.docroot / "skip/lt/to-real")
    assert os.readlink(shared.docroot / "copy/lt/to-real") == "sub/real.txt"
    # copy leaves a regular file alone; copy+force replaces it with the link.
    (shared.docroot / "copy/lt/to-real").unlink()
    (shared.docroot / "copy/lt/to-real").write_text("a file in the way")
    _, events = api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "lt"}],
        destination_root="/copy",
        symlink_policy="copy",
    )
    assert by_path(events, "file_skipped")["lt/to-real"]["reason"] == "exists"
    api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "lt"}],
        destination_root="/copy",
        symlink_policy="copy+force",
    )
    assert os.readlink(shared.docroot / "copy/lt/to-real") == "sub/real.txt"


def test_symlink_escapes_are_refused(shared: ServerHandle, tmp_path: Path) -> None:
    tree = _link_tree(tmp_path)
    (tree / "escape").symlink_to("../../../../../../etc/passwd")
    (tree / "absolute").symlink_to("/etc/passwd")
    (shared.docroot / "esc").mkdir()
    result, events = api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "lt"}],
        destination_root="/esc",
        symlink_policy="copy",
    )
    assert result.totals.files_failed == 2 and not result.ok
    errors = by_path(events, "file_error")
    assert {errors[p]["error"]["code"] for p in ("lt/escape", "lt/absolute")} == {41}
    assert not os.path.lexists(shared.docroot / "esc/lt/escape")
    assert os.readlink(shared.docroot / "esc/lt/to-real") == "sub/real.txt"
    # Downloading part of a tree: a link valid on the server but leading out of the
    # client's destination is refused by the client.
    (shared.docroot / "share/sub").mkdir(parents=True)
    (shared.docroot / "top.txt").write_text("top")
    (shared.docroot / "share/sub/up").symlink_to("../../top.txt")  # inside the docroot
    (tmp_path / "dl").mkdir()
    result, events = api(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/share/sub"}],
        destination_root="dl",
        symlink_policy="copy",
    )
    assert by_path(events, "file_error")["sub/up"]["error"]["code"] == 41
    assert not os.path.lexists(tmp_path / "dl/sub/up")


# --- filters and time windows ------------------------------------------------------------------


def test_filters_and_time_windows(shared: ServerHandle, tmp_path: Path) -> None:
    tree = tmp_path / "ft"
    (tree / "docs" / "drafts").mkdir(parents=True)
    (tree / "docs" / "a.txt").write_text("a")
    (tree / "docs" / "b.bin").write_text("b")
    (tree / "docs" / "drafts" / "c.txt").write_text("c")
    (tree / "growing.txt").write_text("still being written")
    (tree / "old.txt").write_text("old")
    os.utime(tree / "old.txt", (time.time() - 3600, time.time() - 3600))
    result = send_cli(
        shared,
        "--json-events",
        "-d",
        "-E",
        "drafts/",
        "-N",
        "/**/",
        "-N",
        "*.txt",
        "-E",
        "/**",
        "--exclude-newer-than",
        "-600",  # negative: seconds before now
        "ft",
        "/filtered",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    got = sorted(
        p.relative_to(shared.docroot / "filtered").as_posix()
        for p in (shared.docroot / "filtered").rglob("*")
    )
    assert got == ["ft", "ft/docs", "ft/old.txt"]
    events = json_events(result.stdout)
    excluded = {e["path"]: e["reason"] for e in events if e["type"] == "file_excluded"}
    assert excluded["ft/docs/drafts"] == "excluded by -E drafts/"
    assert excluded["ft/docs/b.bin"] == "excluded by -E /**"
    assert excluded["ft/docs/a.txt"] == "modified after exclude_newer_than"
    assert events[-1]["files_excluded"] == len(excluded)


# --- source disposition and mirror deletion -------------------------------------------------------


def test_remove_after_transfer(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "out" / "a" / "b").mkdir(parents=True)
    (tmp_path / "out" / "a" / "b" / "f1").write_text("1")
    (tmp_path / "out" / "a" / "f2").write_text("2")
    result = send_cli(
        shared,
        "-d",
        "--remove-after-transfer",
        "--remove-empty-directories",
        "out",
        "/removed",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert (shared.docroot / "removed/out/a/b/f1").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []


def test_move_after_transfer_stays_in_the_docroot(shared: ServerHandle, tmp_path: Path) -> None:
    (shared.docroot / "outbox").mkdir()
    (shared.docroot / "outbox/r1.csv").write_text("r1")
    result = recv_cli(
        shared, "--move-after-transfer", "/archive", "/outbox/r1.csv", ".", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "r1.csv").read_text() == "r1"
    assert (shared.docroot / "archive/r1.csv").read_text() == "r1"
    assert not (shared.docroot / "outbox/r1.csv").exists()
    (shared.docroot / "outbox/r2.csv").write_text("r2")
    escape = recv_cli(
        shared, "--move-after-transfer", "/../escape", "/outbox/r2.csv", ".", cwd=tmp_path
    )
    assert escape.returncode == 1 and "code 41" in escape.stderr
    assert (shared.docroot / "outbox/r2.csv").exists() and not (tmp_path / "r2.csv").exists()


def test_delete_before_transfer_mirrors(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "mir" / "sub").mkdir(parents=True)
    (tmp_path / "mir" / "keep.txt").write_text("keep")
    (tmp_path / "mir" / "sub" / "s.txt").write_text("s")
    dest = shared.docroot / "mirror" / "mir"
    (dest / "sub").mkdir(parents=True)
    (dest / "stale.txt").write_text("stale")
    (dest / "notes.log").write_text("excluded: protected")
    (dest / "sub" / "old-dir").mkdir()
    (dest / "sub" / "old-dir" / "x").write_text("x")
    result = send_cli(
        shared,
        "--json-events",
        "--delete-before-transfer",
        "-E",
        "*.log",
        "mir",
        "/mirror",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == [
        "keep.txt",
        "notes.log",
        "sub",
        "sub/s.txt",
    ]


# --- checksums, metadata, names ------------------------------------------------------------------


def test_file_checksum_on_both_ends(shared: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    (tmp_path / "c.bin").write_bytes(data)
    (shared.docroot / "sums").mkdir()
    result = send_cli(
        shared, "--json-events", "--file-checksum", "sha-256", "c.bin", "/sums", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    done = by_path(json_events(result.stdout), "file_done")["c.bin"]
    assert done["file_checksum"] == hashlib.sha256(data).hexdigest()
    assert done["file_checksum_type"] == "sha256"
    got = recv_cli(
        shared, "--json-events", "--file-checksum", "md5", "/sums/c.bin", "back.bin", cwd=tmp_path
    )
    assert got.returncode == 0, got.stderr
    done = by_path(json_events(got.stdout), "file_done")["c.bin"]  # stored as back.bin
    assert done["file_checksum"] == hashlib.md5(data).hexdigest()
    assert f"checksum=sha256:{hashlib.sha256(data).hexdigest()}" in shared.log()


def test_cookie_and_tags_reach_the_server(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("t")
    (shared.docroot / "tagged").mkdir()
    result = send_cli(
        shared,
        "--json-events",
        "--cookie",
        "order-42\nforged line",
        "--tags",
        '{"app": {"job": 7}}',
        "t.txt",
        "/tagged",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    start = json_events(result.stdout)[0]
    assert start["cookie"] == "order-42\nforged line" and start["tags"] == {"app": {"job": 7}}
    line = next(ln for ln in shared.log().splitlines() if "cookie=" in ln)
    assert 'cookie="order-42\\nforged line"' in line and 'tags={"app": {"job": 7}}' in line


def test_obfuscate_file_names(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "secret-plans" / "q3").mkdir(parents=True)
    (tmp_path / "secret-plans" / "q3" / "merger.doc").write_text("m")
    (tmp_path / "secret-plans" / "budget.xls").write_text("b")
    (shared.docroot / "hidden").mkdir()
    result, events = api(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "secret-plans"}],
        destination_root="/hidden",
        obfuscate_file_names=True,
    )
    assert result.ok
    done = by_path(events, "file_done")
    stored = {path: event["stored_path"] for path, event in done.items()}
    assert set(stored) == {"secret-plans/q3/merger.doc", "secret-plans/budget.xls"}
    for original, name in stored.items():
        assert (shared.docroot / "hidden" / name).read_text() == Path(original).name[0]
    names = [p.name for p in (shared.docroot / "hidden").rglob("*")]
    assert not any("secret" in n or "merger" in n or "budget" in n for n in names)
    assert "merger" not in shared.log() and "secret-plans" not in shared.log()


def test_everything_through_spec(shared: ServerHandle, tmp_path: Path) -> None:
    """The same fields from a --spec file (the Connect spellings included) as from flags."""
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "keep.txt").write_text("keep")
    (tmp_path / "sp" / "skip.tmp").write_text("skip")
    os.utime(tmp_path / "sp" / "keep.txt", ns=(1_600_000_000 * 10**9, 1_600_000_000 * 10**9))
    (shared.docroot / "via-spec").mkdir()
    (shared.docroot / "via-spec" / "sp").mkdir()
    (shared.docroot / "via-spec" / "sp" / "keep.txt").write_text("older copy")
    os.utime(shared.docroot / "via-spec/sp/keep.txt", ns=(10**18, 10**18))
    spec = {
        "direction": "send",
        "paths": [{"source": "sp"}],
        "destination_root": "/via-spec",
        "overwrite_policy": "always",  # the Connect alias
        "resume": "full_csum",  # the ascli spelling
        "save-before-overwrite": True,
        "filters": ["- *.tmp"],
        "preserve_times": True,
        "file_checksum": "sha-1",
        "cookie": "from-spec",
        "tags": {"source": "spec"},
    }
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = send_cli(shared, "--json-events", "--spec", "spec.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = json_events(result.stdout)
    done = by_path(events, "file_done")["sp/keep.txt"]
    assert done["file_checksum_type"] == "sha1"
    assert by_path(events, "file_excluded")["sp/skip.tmp"]["reason"] == "excluded by -E *.tmp"
    dest = shared.docroot / "via-spec" / "sp"
    assert (dest / "keep.txt").read_text() == "keep"
    assert (dest / "keep.txt").stat().st_mtime_ns == 1_600_000_000 * 10**9
    assert [p.read_text() for p in dest.iterdir() if p.name != "keep.txt"] == ["older copy"]
    assert 'cookie="from-spec"' in shared.log()


def test_download_direction_semantics(shared: ServerHandle, tmp_path: Path) -> None:
    """The server sends: its filters, its source removal; the client mirrors and keeps times."""
    outbox = shared.docroot / "dl-out" / "box"
    (outbox / "sub").mkdir(parents=True)
    (outbox / "a.csv").write_text("a")
    (outbox / "sub" / "b.csv").write_text("b")
    (outbox / "skip.tmp").write_text("t")
    os.utime(outbox / "a.csv", ns=(1_500_000_000 * 10**9, 1_600_000_000 * 10**9))
    local = tmp_path / "box"
    local.mkdir()
    (local / "stale.csv").write_text("not on the server any more")
    result = recv_cli(
        shared,
        "--json-events",
        "-p",
        "-E",
        "*.tmp",
        "--remove-after-transfer",
        "--remove-empty-directories",
        "--delete-before-transfer",
        "/dl-out/box",
        ".",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*")) == [
        "a.csv",
        "sub",
        "sub/b.csv",
    ]
    assert (local / "a.csv").stat().st_mtime_ns == 1_600_000_000 * 10**9
    # On the server: sent files removed, the excluded one kept, the emptied folder gone.
    assert sorted(p.name for p in outbox.rglob("*")) == ["skip.tmp"]
    kinds = [e["type"] for e in json_events(result.stdout)]
    assert "file_deleted" in kinds
