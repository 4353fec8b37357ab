"""The file-semantics fields over the HTTPS fallback (``http_fallback: "force"``), end to end.

The same expectations as tests/e2e/test_file_semantics.py (the UDP path), against a real
quickstart server over loopback: a user whose UDP is blocked must get exactly the same
files, skips, checksums and source removals, never an overwrite the spec forbids.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from slipstream.engine.job import ClientOptions, TransferResult, transfer
from slipstream.engine.resume import CheckpointWriter, FileIdentity, checkpoint_path
from slipstream.errors import SlipstreamError
from tests.conftest import ServerHandle, over_https, start_quickstart
from tests.e2e.test_file_semantics import (
    by_path,
)

PASSPHRASE = "correct horse battery staple"


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    handle = start_quickstart(tmp_path_factory.mktemp("fallback-semantics") / "server")
    try:
        yield handle
    finally:
        handle.stop()


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerHandle]:
    """A server that refuses overwrites and caps its user at 4 Mbit/s."""
    root = tmp_path_factory.mktemp("fallback-strict") / "server"
    start_quickstart(root).stop()  # creates the config, which quickstart then reuses
    config = root / "qs" / "server.toml"
    text = config.read_text().replace("[server]\n", "[server]\noverwrite = false\n", 1)
    text = text.replace("[[users]]\n", "[[users]]\ntarget_rate_cap_kbps = 4000\n", 1)
    config.write_text(text)
    handle = start_quickstart(root)
    try:
        yield handle
    finally:
        handle.stop()


def http(
    server: ServerHandle, cwd: Path, **fields: Any
) -> tuple[TransferResult, list[dict[str, Any]]]:
    """One transfer over the HTTPS fallback; returns the result and every event."""
    events: list[dict[str, Any]] = []
    spec = over_https(server, **fields)
    result = asyncio.run(transfer(spec, events.append, ClientOptions(cwd=cwd)))
    assert result.transport == "http"
    return result, events


def test_download_resumes_and_skips_on_the_client(shared: ServerHandle, tmp_path: Path) -> None:
    src = shared.docroot / "dl-resume"
    src.mkdir()
    data = os.urandom(2_000_000)
    (src / "big.bin").write_bytes(data)
    (src / "same.bin").write_bytes(b"same content")
    (src / "kept.bin").write_bytes(b"server version")
    local = tmp_path / "got" / "dl-resume"
    local.mkdir(parents=True)
    (local / "same.bin").write_bytes(b"same content")
    (local / "kept.bin").write_bytes(b"local version!")  # same size, other content
    partial = local / "big.bin.partial"
    partial.write_bytes(data[:1_000_000])
    mtime = (src / "big.bin").stat().st_mtime_ns
    CheckpointWriter(partial, FileIdentity(len(data), mtime), 1_000_000).close()
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/dl-resume"}],
        destination_root="got",
        overwrite="never",
    )
    assert result.ok
    assert by_path(events, "file_done")["dl-resume/big.bin"]["resumed_from"] == 1_000_000
    skipped = by_path(events, "file_skipped")
    assert {p: e["reason"] for p, e in skipped.items()} == {
        "dl-resume/same.bin": "exists",
        "dl-resume/kept.bin": "exists",
    }
    assert (local / "kept.bin").read_bytes() == b"local version!"
    assert (local / "big.bin").read_bytes() == data
    assert not partial.exists() and not checkpoint_path(partial).exists()
    # diff compares content through the server's checksums: identical skipped, other replaced.
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/dl-resume"}],
        destination_root="got",
        overwrite="diff",
        resume="full_checksum",
    )
    assert set(by_path(events, "file_skipped")) == {"dl-resume/same.bin", "dl-resume/big.bin"}
    assert set(by_path(events, "file_done")) == {"dl-resume/kept.bin"}
    assert (local / "kept.bin").read_bytes() == b"server version"


# --- the server's veto and its rate cap ---------------------------------------------------------


def test_server_may_deny_overwrite_over_https(strict: ServerHandle, tmp_path: Path) -> None:
    (strict.docroot / "old.txt").write_text("keep me")
    (tmp_path / "old.txt").write_text("new content")
    (tmp_path / "fresh.txt").write_text("fresh")
    result, events = http(
        strict,
        tmp_path,
        direction="send",
        paths=[{"source": "old.txt"}, {"source": "fresh.txt"}],
        destination_root="/",
        overwrite="always",
    )
    assert not result.ok and result.totals.files_failed == 1
    error = by_path(events, "file_error")["old.txt"]["error"]
    assert error["code"] == 48 and "does not allow overwriting" in error["user_message"]
    assert (strict.docroot / "old.txt").read_text() == "keep me"
    assert (strict.docroot / "fresh.txt").read_text() == "fresh"


def test_user_rate_cap_paces_a_download(strict: ServerHandle, tmp_path: Path) -> None:
    (strict.docroot / "capped.bin").write_bytes(os.urandom(1_000_000))
    started = time.monotonic()
    result, _ = http(
        strict,
        tmp_path,
        direction="receive",
        paths=[{"source": "/capped.bin"}],
        destination_root=".",
        target_rate_kbps=1_000_000,  # asks for far more: the user's cap (4 Mbit/s) holds
    )
    elapsed = time.monotonic() - started
    assert result.ok
    assert 1.5 < elapsed < 20, elapsed  # 1 MB at 4 Mbit/s is 2 s


def test_target_rate_paces_an_upload(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "paced.bin").write_bytes(os.urandom(1_000_000))
    (shared.docroot / "paced").mkdir()
    started = time.monotonic()
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "paced.bin"}],
        destination_root="/paced",
        target_rate_kbps=4000,
    )
    elapsed = time.monotonic() - started
    assert result.ok and (shared.docroot / "paced/paced.bin").stat().st_size == 1_000_000
    assert 1.5 < elapsed < 20, elapsed  # 1 MB at 4 Mbit/s is 2 s; unpaced, a fraction


# --- times, saving, checksums ---------------------------------------------------------------------


def test_preserve_times_and_save_before_overwrite(shared: ServerHandle, tmp_path: Path) -> None:
    atime, mtime = 1_500_000_000 * 10**9, 1_600_000_000 * 10**9
    (tmp_path / "both.txt").write_text("version 2")
    os.utime(tmp_path / "both.txt", ns=(atime, mtime))
    dest = shared.docroot / "times"
    dest.mkdir()
    (dest / "both.txt").write_text("version 1")
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "both.txt"}],
        destination_root="/times",
        preserve_times=True,
        overwrite="always",
        save_before_overwrite=True,
    )
    assert result.ok
    st = os.stat(dest / "both.txt")
    assert (st.st_atime_ns, st.st_mtime_ns) == (atime, mtime)
    assert (dest / "both.txt").read_text() == "version 2"
    saved = [p for p in dest.iterdir() if p.name != "both.txt"]
    assert len(saved) == 1 and saved[0].read_text() == "version 1"
    assert re.fullmatch(r"both\.\d{4}(\.\d\d){5}\.0\.txt", saved[0].name)
    # And back down, keeping the server's times.
    result, _ = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/times/both.txt"}],
        destination_root="back.txt",
        preserve_modification_time=True,
    )
    assert result.ok and (tmp_path / "back.txt").stat().st_mtime_ns == mtime


def test_file_checksum_on_both_ends(shared: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(700_000)
    (tmp_path / "c.bin").write_bytes(data)
    (shared.docroot / "sums").mkdir()
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "c.bin"}],
        destination_root="/sums",
        file_checksum="sha256",
    )
    assert result.ok
    done = by_path(events, "file_done")["c.bin"]
    assert done["file_checksum"] == hashlib.sha256(data).hexdigest()
    assert done["file_checksum_type"] == "sha256"
    assert f"checksum=sha256:{hashlib.sha256(data).hexdigest()}" in shared.log()
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/sums/c.bin"}],
        destination_root="back.bin",
        file_checksum="md5",
    )
    done = by_path(events, "file_done")["c.bin"]
    assert done["file_checksum"] == hashlib.md5(data).hexdigest()
    assert done["file_checksum_type"] == "md5"


# --- selection and source disposition -------------------------------------------------------------


def test_filters_and_time_windows(shared: ServerHandle, tmp_path: Path) -> None:
    tree = tmp_path / "ft"
    (tree / "docs" / "drafts").mkdir(parents=True)
    (tree / "docs" / "a.txt").write_text("a")
    (tree / "docs" / "b.bin").write_text("b")
    (tree / "docs" / "drafts" / "c.txt").write_text("c")
    (tree / "old.txt").write_text("old")
    os.utime(tree / "old.txt", (time.time() - 3600, time.time() - 3600))
    (tree / "to-old").symlink_to("old.txt")
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "ft"}],
        destination_root="/filtered",
        create_dir=True,
        filters=["- drafts/", "+ /**/", "+ *.txt", "- /**"],
        exclude_newer_than=-600,
        symlink_policy="skip",
    )
    assert result.ok
    root = shared.docroot / "filtered"
    got = sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
    assert got == ["ft", "ft/docs", "ft/old.txt"]
    excluded = {e["path"]: e["reason"] for e in events if e["type"] == "file_excluded"}
    assert excluded["ft/docs/drafts"] == "excluded by -E drafts/"
    assert excluded["ft/docs/b.bin"] == "excluded by -E /**"
    assert excluded["ft/docs/a.txt"] == "modified after exclude_newer_than"
    assert result.totals.files_excluded == len(excluded) == 3
    assert result.totals.files_skipped == 1  # the link, by symlink_policy skip
    assert events[-1]["type"] == "session_done" and events[-1]["files_excluded"] == 3


def test_remove_after_transfer(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "out" / "a" / "b").mkdir(parents=True)
    (tmp_path / "out" / "a" / "b" / "f1").write_text("1")
    (tmp_path / "out" / "a" / "f2").write_text("2")
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "out"}],
        destination_root="/removed",
        create_dir=True,
        remove_after_transfer=True,
        remove_empty_directories=True,
    )
    assert result.ok
    assert (shared.docroot / "removed/out/a/b/f1").read_text() == "1"
    assert os.listdir(tmp_path / "out") == []
    assert {e["path"] for e in events if e["type"] == "source_removed"} == {
        "out/a/b/f1",
        "out/a/f2",
    }


def test_download_removes_sources_and_mirrors(shared: ServerHandle, tmp_path: Path) -> None:
    outbox = shared.docroot / "dl-out" / "box"
    (outbox / "sub").mkdir(parents=True)
    (outbox / "a.csv").write_text("a")
    (outbox / "sub" / "b.csv").write_text("b")
    (outbox / "skip.tmp").write_text("t")
    local = tmp_path / "box"
    local.mkdir()
    (local / "stale.csv").write_text("not on the server any more")
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/dl-out/box"}],
        destination_root=".",
        exclude_patterns=["*.tmp"],
        remove_after_transfer=True,
        remove_empty_directories=True,
        delete_before_transfer=True,
    )
    assert result.ok
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*")) == [
        "a.csv",
        "sub",
        "sub/b.csv",
    ]
    assert sorted(p.name for p in outbox.rglob("*")) == ["skip.tmp"]
    assert "file_deleted" in {e["type"] for e in events}


# --- content protection -----------------------------------------------------------------------


def test_content_protection_round_trip(shared: ServerHandle, tmp_path: Path) -> None:
    data = os.urandom(1_500_000)
    (tmp_path / "vault").mkdir()
    (tmp_path / "vault" / "secret.bin").write_bytes(data)
    (tmp_path / "vault" / "small.txt").write_text("tiny secret")
    protect = {"content_protection_passphrase": PASSPHRASE}
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "vault"}],
        destination_root="/enc",
        create_dir=True,
        content_protection="encrypt",
        **protect,
    )
    assert result.ok, events
    stored = shared.docroot / "enc" / "vault"
    assert sorted(p.name for p in stored.iterdir()) == [
        "secret.bin.aspera-env",
        "small.txt.aspera-env",
    ]
    assert data[:64] not in (stored / "secret.bin.aspera-env").read_bytes()
    # Sent again: the server compares envelopes made under its stored headers.
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "vault"}],
        destination_root="/enc",
        create_dir=True,
        content_protection="encrypt",
        **protect,
    )
    assert {e["reason"] for e in by_path(events, "file_skipped").values()} == {"identical"}
    # Down again, decrypted; a wrong passphrase writes nothing.
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/enc/vault"}],
        destination_root="plain",
        content_protection="decrypt",
        **protect,
    )
    assert result.ok, events
    assert (tmp_path / "plain" / "secret.bin").read_bytes() == data
    assert (tmp_path / "plain" / "small.txt").read_text() == "tiny secret"
    result, events = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/enc/vault"}],
        destination_root="wrong",
        content_protection="decrypt",
        content_protection_passphrase="not the passphrase",
    )
    assert result.totals.files_failed == 2
    assert {e["error"]["code"] for e in by_path(events, "file_error").values()} == {49}
    assert not (tmp_path / "wrong").exists() or not list((tmp_path / "wrong").rglob("*.bin"))


def test_encrypted_upload_resumes_its_envelope(shared: ServerHandle, tmp_path: Path) -> None:
    """A cut encrypted upload continues under the stored envelope's own header."""
    data = os.urandom(3_000_000)
    (tmp_path / "big.bin").write_bytes(data)
    protect = {"content_protection": "encrypt", "content_protection_passphrase": PASSPHRASE}
    (shared.docroot / "enc-resume").mkdir()
    result, _ = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "big.bin"}],
        destination_root="/enc-resume",
        **protect,
    )
    assert result.ok
    stored = shared.docroot / "enc-resume" / "big.bin.aspera-env"
    envelope = stored.read_bytes()
    # Make it a half-received partial of the same source, then send again.
    stored.unlink()
    partial = stored.with_name(stored.name + ".partial")
    partial.write_bytes(envelope[:1_200_000])
    source = FileIdentity(len(envelope), (tmp_path / "big.bin").stat().st_mtime_ns)
    CheckpointWriter(partial, source, 1_200_000).close()
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "big.bin"}],
        destination_root="/enc-resume",
        **protect,
    )
    assert result.ok, events
    assert by_path(events, "file_done")["big.bin"]["resumed_from"] == 1_200_000
    assert stored.read_bytes() == envelope  # same header, same key: the same envelope
    result, _ = http(
        shared,
        tmp_path,
        direction="receive",
        paths=[{"source": "/enc-resume/big.bin.aspera-env"}],
        destination_root="plain.bin",
        content_protection="decrypt",
        content_protection_passphrase=PASSPHRASE,
    )
    assert (tmp_path / "plain.bin").read_bytes() == data


# --- links and names ---------------------------------------------------------------------------


def test_links_and_obfuscated_names(shared: ServerHandle, tmp_path: Path) -> None:
    (tmp_path / "lt" / "sub").mkdir(parents=True)
    (tmp_path / "lt" / "sub" / "real.txt").write_text("real")
    (tmp_path / "lt" / "to-real").symlink_to("sub/real.txt")
    (tmp_path / "lt" / "escape").symlink_to("/etc/passwd")
    (shared.docroot / "links").mkdir()
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "lt"}],
        destination_root="/links",
        symlink_policy="copy",
    )
    assert result.totals.links == 1 and result.totals.files_failed == 1
    assert by_path(events, "file_error")["lt/escape"]["error"]["code"] == 41
    assert os.readlink(shared.docroot / "links/lt/to-real") == "sub/real.txt"
    assert not os.path.lexists(shared.docroot / "links/lt/escape")
    (shared.docroot / "hidden").mkdir()
    result, events = http(
        shared,
        tmp_path,
        direction="send",
        paths=[{"source": "lt/sub"}],
        destination_root="/hidden",
        obfuscate_file_names=True,
    )
    assert result.ok
    stored = by_path(events, "file_done")["sub/real.txt"]["stored_path"]
    assert (shared.docroot / "hidden" / stored).read_text() == "real"
    assert "real" not in {p.name for p in (shared.docroot / "hidden").rglob("*")}


def test_too_old_a_server_is_refused(
    shared: ServerHandle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fallback that does not say it applies the file rules is never used silently."""
    from slipstream.transport import http_fallback

    original = http_fallback.FallbackClient.open_session

    async def old_server(self: Any, spec: dict[str, Any]) -> dict[str, Any]:
        answer = await original(self, spec)
        answer.pop("semantics", None)
        return answer

    monkeypatch.setattr(http_fallback.FallbackClient, "open_session", old_server)
    (tmp_path / "f.txt").write_text("f")
    with pytest.raises(SlipstreamError) as caught:
        http(shared, tmp_path, direction="send", paths=[{"source": "f.txt"}], destination_root="/")
    assert caught.value.code == 31 and "too old" in caught.value.user_message
    assert not (shared.docroot / "f.txt").exists()
